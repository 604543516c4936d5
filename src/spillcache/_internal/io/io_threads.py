"""Background work: the only module of the cache that starts threads (``spillcache
plan``'s disk probe, a command-line measurement, runs its own).

An ``IOPool`` runs submitted callables on a few threads and hands results back through
Futures (no polling). Work has a priority: reads (the prefetch of batches the caller
is about to ask for) overtake write-back, which only has to finish before its buffer
is needed again. Within a priority, work runs in the order it was submitted. Threads
start on first use and are joined by ``close()``.

A pool has one *lane* per disk: each lane is a queue with threads of its own, so work
for one drive never waits behind work for another and bandwidth adds up across drives.
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
    """``lanes`` priority queues, each with ``threads`` background threads of its own."""

    def __init__(self, name: str, threads: int, lanes: int = 1) -> None:
        if threads < 1:
            raise ValueError(f"an IOPool needs at least one thread, got {threads}")
        if lanes < 1:
            raise ValueError(f"an IOPool needs at least one lane, got {lanes}")
        self._name = name
        self._size = threads
        self._lock = threading.Lock()
        self._queues: list[queue.PriorityQueue] = [queue.PriorityQueue() for _ in range(lanes)]
        self._order = itertools.count()  # ties within a priority: first submitted, first run
        self._threads: list[threading.Thread] = []
        self._running = threading.local()  # .job: the Future a pool thread is running
        self._closed = False

    @property
    def lanes(self) -> int:
        return len(self._queues)

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any, lane: int = 0) -> Future:
        """Run ``fn(*args)`` on one of ``lane``'s threads; its outcome goes to the Future."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} is closed")
            if not self._threads:
                self._start_threads()
            self._queues[lane].put((priority, next(self._order), future, fn, args))
        return future

    def _start_threads(self) -> None:
        for lane, work in enumerate(self._queues):
            for index in range(self._size):
                suffix = f"{index}" if len(self._queues) == 1 else f"{lane}.{index}"
                thread = threading.Thread(
                    target=self._run, args=(work,), name=f"{self._name}-{suffix}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _run(self, work: queue.PriorityQueue) -> None:
        while True:
            priority, _, future, fn, args = work.get()
            try:
                if priority == _STOP:
                    return
                if future.set_running_or_notify_cancel():
                    self._running.job = future
                    self._call(future, fn, args)
            finally:
                self._running.job = None
                # Drop the job before waiting for the next one: its arguments (a tensor
                # being written, say) must not stay alive while this thread is idle.
                future = fn = args = None
                work.task_done()

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
        for work in self._queues:
            work.join()

    def on_pool_thread(self) -> bool:
        return threading.current_thread() in self._threads

    def current_job(self) -> Future | None:
        """The work this thread is running, if it is one of the pool's threads."""
        return getattr(self._running, "job", None)

    def close(self) -> None:
        """Cancel queued work, let running work finish, and join the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
        for work in self._queues:
            while True:
                try:
                    item = work.get_nowait()
                except queue.Empty:
                    break
                item[2].cancel()
                work.task_done()
            if threads:  # one stop for each of the lane's threads
                for _ in range(self._size):
                    work.put((_STOP, next(self._order), None, None, None))
        # close() can run on a pool thread (a garbage-collection finalizer fired there);
        # joining one's own thread would deadlock, so that thread is left to stop itself.
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join()
