"""Background work: the only module that starts threads.

A ``Worker`` runs submitted callables on one thread, in order, and hands results back
through Futures (no polling). Its thread starts on first use and is joined by
``close()``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Worker"]


class Worker:
    """One background thread for a cache's prefetch reads."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name} worker is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            return self._executor.submit(fn, *args)

    def close(self) -> None:
        """Cancel queued work, finish the running item and join the thread."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is None:
            return
        # close() can run on the worker itself (a garbage-collection finalizer fired
        # there); joining one's own thread would deadlock, so that one case only cancels.
        on_worker = threading.current_thread().name.startswith(self._name)
        executor.shutdown(wait=not on_worker, cancel_futures=True)
