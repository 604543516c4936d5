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
the thread that flushes or closes; so do flush and close for what they write themselves.
Where the I/O threads fsync each write as it lands (``Store.syncs_background_writes``),
only flush's and close's own writes are listed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..io.chunkio import fsync_directory, fsync_file
from .store_format import BATCHES, TENSORS, tensors_dir

__all__ = ["Unsynced"]


class Unsynced:
    """The arrays of one store written since they were last made durable, and whether
    its skeleton has been. Thread-safe: I/O threads add, the flushing thread syncs."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._arrays: set[str] = set()  # guarded by _lock
        # The directories not yet fsync'd since the store was made (the syncing thread's)
        self._skeleton = True

    def written(self, name: str) -> None:
        """Array ``name`` was written (whole, renamed into place) without an fsync."""
        with self._lock:
            self._arrays.add(name)

    def sync(self) -> None:
        """fsync every array written since the last call (its files, then its
        directory), then ``tensors/``, and the skeleton the first time. On an error the
        arrays stay listed for the next call."""
        with self._lock:
            arrays, self._arrays = self._arrays, set()
        try:
            for name in sorted(arrays):
                _sync_array(tensors_dir(self._path) / name)
            if self._skeleton:
                _sync_skeleton(self._path)  # tensors/ among the rest
                self._skeleton = False
            else:
                fsync_directory(tensors_dir(self._path))
        except BaseException:
            with self._lock:
                self._arrays |= arrays
            raise


def _sync_array(directory: Path) -> None:
    """fsync one array's files, then its directory (their entries); nothing if it is
    gone (deleted since: no structure names it)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(".partial"):  # a write cut short: no structure names it
            try:
                fsync_file(directory / name)
            except FileNotFoundError:
                continue
    fsync_directory(directory)


def _sync_skeleton(path: Path) -> None:
    """fsync the groups' ``zarr.json``, the group directories, the store root, and the
    directories above it on the same file system (the store's own entry and those of
    the run and rank directories made for it)."""
    for group in (TENSORS, BATCHES):
        fsync_file(path / group / "zarr.json")
        fsync_directory(path / group)
    fsync_directory(path)
    device = os.stat(path).st_dev
    directory = path.parent
    while True:
        try:
            if os.stat(directory).st_dev != device:
                return  # above the mount point: not this file system's entries
            fsync_directory(directory)
        except PermissionError:
            return  # a directory this user cannot open was not made for the store
        if directory.parent == directory:
            return
        directory = directory.parent
