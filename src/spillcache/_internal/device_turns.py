"""Large direct reads take turns on their device: one at a time per file system.

Two large O_DIRECT reads in flight on one disk share its bandwidth and end at about the
same time; then both threads checksum what they read while the device has nothing to
do. One large read at a time, each a single ``preadv`` of the whole chunk (which the
kernel already splits into as many device requests as the queue takes), keeps the device
reading while the thread that has just read checksums and hands its value on, as long as
the next read is already waiting for its turn (``prefetch_depth`` >= 3 for a value read
by ``iter_prefetch``; docs/benchmarks.md, "Disk throughput").

Reads below ``TURN_BYTES`` do not take turns: one of them does not fill a device's queue
by itself, and several in parallel is how a device is kept busy with small values.

A thread gives up its core for a moment as it hands a turn on, so that the next
reader starts at once rather than after the checksum that follows.

The turns are the process's (every cache, pool and thread reading from one file system
waits for the same one), keyed by the ``st_dev`` of the file being read. A turn is held
only around the read system calls, and nothing else is taken while it is held.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["TURN_BYTES", "turn"]

TURN_BYTES = 4 * 2**20

_turns: dict[int, threading.Lock] = {}
_turns_lock = threading.Lock()


def _turn_of(device: int) -> threading.Lock:
    with _turns_lock:
        lock = _turns.get(device)
        if lock is None:
            lock = _turns[device] = threading.Lock()
        return lock


@contextmanager
def turn(device: int, nbytes: int) -> Iterator[None]:
    """Wait for ``device``'s turn (``st_dev``) if a read of ``nbytes`` is large enough
    to need one, and hold it for the ``with`` block."""
    if nbytes < TURN_BYTES:
        yield
        return
    with _turn_of(device):
        yield
    # Let the thread woken for the turn run now: Linux tends to queue it on this core,
    # behind this thread's checksum, and the device would wait that long (about 2 ms a
    # 16 MiB chunk here; docs/benchmarks.md, "Disk throughput"). If nobody was woken
    # this returns at once.
    os.sched_yield()
