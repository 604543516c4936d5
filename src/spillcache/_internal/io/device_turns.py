"""Large direct reads take turns on their device: one at a time per file system.

Two large O_DIRECT reads in flight on one disk share its bandwidth and end at about the
same time; then both threads checksum what they read while the device has nothing to
do. One large read at a time, each a single ``preadv`` of the whole chunk (which the
kernel already splits into as many device requests as the queue takes), keeps the device
reading while the thread that has just read checksums and hands its value on, as long as
the next read is already waiting for its turn (``iter_prefetch`` at its default depth
of 2 keeps one waiting; docs/benchmarks.md, "Disk throughput").

Reads below ``TURN_BYTES`` do not take turns: one of them does not fill a device's queue
by itself, and several in parallel is how a device is kept busy with small values. Nor
do reads from network file systems (NFS, Lustre, GPFS, ...), whose servers and stripes
serve several requests at once: turns were measured on a local disk only.

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

from ..sysinfo import filesystem_type

__all__ = ["NETWORK_FILESYSTEMS", "TURN_BYTES", "turn"]

TURN_BYTES = 4 * 2**20

# File systems whose reads do not take turns (as /proc/mounts names them).
NETWORK_FILESYSTEMS = frozenset(
    ["nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "ceph", "beegfs", "9p", "fuse.glusterfs"]
)

_turns: dict[int, threading.Lock | None] = {}  # st_dev -> its turn; None: takes none
_turns_lock = threading.Lock()


def _turn_of(device: int, path: str | os.PathLike[str]) -> threading.Lock | None:
    with _turns_lock:
        if device in _turns:
            return _turns[device]
    # The file system's type, once per device: outside the lock (it reads /proc/mounts).
    network = filesystem_type(str(path)) in NETWORK_FILESYSTEMS
    with _turns_lock:
        return _turns.setdefault(device, None if network else threading.Lock())


@contextmanager
def turn(device: int, nbytes: int, path: str | os.PathLike[str]) -> Iterator[None]:
    """Wait for ``device``'s turn (``st_dev`` of the file at ``path``) if a read of
    ``nbytes`` is large enough to need one, and hold it for the ``with`` block."""
    lock = _turn_of(device, path) if nbytes >= TURN_BYTES else None
    if lock is None:
        yield
        return
    with lock:
        yield
    # Let the thread woken for the turn run now: Linux tends to queue it on this core,
    # behind this thread's checksum, and the device would wait that long (about 2 ms a
    # 16 MiB chunk here; docs/benchmarks.md, "Disk throughput"). If nobody was woken
    # this returns at once.
    os.sched_yield()
