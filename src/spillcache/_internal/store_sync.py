"""What of a kept store has not reached the disk yet, and fsyncing it.

A file written and renamed into place lives in the page cache until it is fsync'd
(with O_DIRECT its bytes are on the device, but its size and blocks are only in the
file system's journal), and a directory's entries likewise until the directory is
fsync'd: a power loss undoes whatever was not. A kept store's flush commits batch
structures that name arrays, so before it writes them, every file those structures
name, every ``zarr.json``, and every directory entry on the way to them must be
durable: each array's chunk, ``zarr.json`` and directory, ``tensors/``, and once per
store its skeleton (the ``tensors`` and ``batches`` groups, the store root, the
store's entry in its parent and the parents made for it, up to the file system's
mount point).

``Unsynced`` keeps that list for one store: the background writes add the arrays
they land (``written``, from any I/O thread), and ``sync`` fsyncs what is listed, from
the thread that flushes or closes. A store that fsyncs each write as it lands (see
``Store.sync_on_write``) lists nothing but its skeleton.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .chunkio import fsync_directory, fsync_file
from .store_format import BATCHES, TENSORS, tensors_dir

__all__ = ["Unsynced"]


class Unsynced:
    """The arrays of one store written since they were last made durable, and whether
    its skeleton has been. Thread-safe: I/O threads add, the flushing thread syncs."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._arrays: set[str] = set()  # guarded by _lock
        self._skeleton = True  # the directories not yet fsync'd since the store was made

    def written(self, name: str) -> None:
        """Array ``name`` was written (whole, renamed into place) without an fsync."""
        with self._lock:
            self._arrays.add(name)

    def sync(self) -> int:
        """fsync every array written since the last call (its chunk, its ``zarr.json``,
        its directory), then ``tensors/``, and the skeleton the first time; how many
        fsyncs that took. On an error the arrays stay listed for the next call."""
        with self._lock:
            arrays, self._arrays = self._arrays, set()
        done = 0
        try:
            for name in sorted(arrays):
                done += _sync_array(tensors_dir(self._path) / name)
            if self._skeleton:
                done += sum(1 for _ in _sync_skeleton(self._path))
                self._skeleton = False
            else:
                fsync_directory(tensors_dir(self._path))
                done += 1
        except BaseException:
            with self._lock:
                self._arrays |= arrays
            raise
        return done


def _sync_array(directory: Path) -> int:
    """fsync one array's files, then its directory (their entries); 0 if it is gone
    (deleted since: no structure names it)."""
    count = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        if not name.endswith(".partial"):  # a write cut short: no structure names it
            try:
                fsync_file(directory / name)
            except FileNotFoundError:
                continue
            count += 1
    fsync_directory(directory)
    return count + 1


def _sync_skeleton(path: Path) -> Iterator[Path]:
    """fsync the groups' ``zarr.json``, the group directories, the store root, and the
    directories above it on the same file system (the store's own entry and those of
    the run and rank directories made for it), yielding each path synced."""
    for group in (TENSORS, BATCHES):
        fsync_file(path / group / "zarr.json")
        yield path / group / "zarr.json"
        fsync_directory(path / group)
        yield path / group
    fsync_directory(path)
    yield path
    device = os.stat(path).st_dev
    directory = path.parent
    while True:
        try:
            if os.stat(directory).st_dev != device:
                return  # above the mount point: not this file system's entries
            fsync_directory(directory)
        except PermissionError:
            return  # a directory this user cannot open was not made for the store
        yield directory
        if directory.parent == directory:
            return
        directory = directory.parent
