"""Background work: the only module that starts threads.

An ``IOPool`` runs submitted callables on a few threads and hands results back through
Futures (no polling). Work has a priority: reads (the prefetch of batches the caller
is about to ask for) overtake write-back, which only has to finish before its buffer
is needed again. Within a priority, work runs in the order it was submitted. Threads
start on first use and are joined by ``close()``.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

__all__ = ["READ", "WRITE", "IOPool"]

READ = 0
WRITE = 1
_STOP = -1  # below every priority: a thread stops before taking more work


class IOPool:
    """``threads`` background threads taking work from one priority queue."""

    def __init__(self, name: str, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"an IOPool needs at least one thread, got {threads}")
        self._name = name
        self._size = threads
        self._lock = threading.Lock()
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # ties within a priority: first submitted, first run
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if not self._threads:
                self._start_threads()
            self._queue.put((priority, next(self._order), future, fn, args))
        return future

    def _start_threads(self) -> None:
        for index in range(self._size):
            thread = threading.Thread(target=self._run, name=f"{self._name}-{index}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        while True:
            priority, _, future, fn, args = self._queue.get()
            try:
                if priority == _STOP:
                    return
                if future.set_running_or_notify_cancel():
                    self._call(future, fn, args)
            finally:
                # Drop the job before waiting for the next one: its arguments (a tensor
                # being written, say) must not stay alive while this thread is idle.
                future = fn = args = None
                self._queue.task_done()

    @staticmethod
    def _call(future: Future, fn: Callable[..., Any], args: tuple) -> None:
        try:
            result = fn(*args)
        except BaseException as error:  # handed to whoever waits on the future
            future.set_exception(error)
        else:
            future.set_result(result)

    def wait_idle(self) -> None:
        """Return once all work submitted so far (and any it submitted) has finished."""
        self._queue.join()

    def on_pool_thread(self) -> bool:
        return threading.current_thread() in self._threads

    def close(self) -> None:
        """Cancel queued work, let running work finish, and join the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            item[2].cancel()
            self._queue.task_done()
        for _ in threads:
            self._queue.put((_STOP, next(self._order), None, None, None))
        # close() can run on a pool thread (a garbage-collection finalizer fired there);
        # joining one's own thread would deadlock, so that thread is left to stop itself.
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join()
