"""The on-disk format (docs/format.md): the only module that knows the store's layout.

A store is a zarr v3 hierarchy on the local filesystem::

    <store>/zarr.json                   group; attributes["spillcache"]: format version, state
    <store>/tensors/zarr.json           group
    <store>/tensors/<id>/zarr.json      array, bytes codec, one chunk; attributes["spillcache"]
    <store>/tensors/<id>/c.0.0          the chunk: the tensor's raw little-endian bytes
    <store>/batches/zarr.json           group
    <store>/batches/<index>/zarr.json   group; attributes["spillcache"]["entries"]: structures

Stores are made directly under ``disk_path``, or, for rank R of a torchrun job, under
``<disk_path>/<run>/rank<R>/`` (a *run directory* holds ``rank<R>`` directories only).

The hot path writes and reads chunk files itself rather than through zarr-python
(whose per-array overhead is milliseconds), and the result stays plain zarr: any
zarr v3 reader opens the store. User keys never become paths: they live only as JSON
strings inside attributes, so no key can escape the store or collide with another.

Every file is written to a ``.partial`` name and renamed into place, and an array's
``zarr.json`` is written after its chunk, so a reader (or a crash) never sees half
an array.

A store's small files (its ``zarr.json`` files) are read as data (``read_small_file``):
never through a symbolic link (which could lead anywhere, /dev/zero included), never a
file that is not a regular one, never more bytes than the format writes there.

What of a kept store has not reached the disk yet (``Unsynced``). A file written and
renamed into place lives in the page cache until it is fsync'd (with O_DIRECT its bytes
are on the device, but its size and blocks are only in the file system's journal), and
a directory's entries likewise until the directory is fsync'd: a power loss undoes
whatever was not. A kept store's flush commits batch structures that name arrays, so
before it writes them, every file those structures name, every ``zarr.json``, and
every directory entry on the way to them must be durable: each array's chunk,
``zarr.json`` and directory, ``tensors/``, and once per store its skeleton (the
``tensors`` and ``batches`` groups, the store root, the store's entry in its parent and
the parents made for it, up to the file system's mount point). ``Unsynced`` keeps that
list for one store: the background writes add the arrays they land (``written``, from
any I/O thread), and ``sync`` fsyncs what is listed, from the thread that flushes or
closes; so do flush and close for what they write themselves. Where the I/O threads
fsync each write as it lands (``Store.syncs_background_writes``), only flush's and
close's own writes are listed.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from spillcache.errors import StoreCorruptError, StoreFormatError, StoreNotFoundError

from .. import dtypes
from ..io.chunk_reads import CRC32C_BYTES
from ..io.chunkio import fsync_directory, fsync_file

__all__ = [
    "ARRAY_NAME",
    "ARRAY_PREFIX",
    "ATTRS_KEY",
    "BATCHES",
    "BATCH_NAME",
    "FORMAT_VERSION",
    "PARTIAL_NAME",
    "STORED_NAME",
    "STORE_PREFIX",
    "SUPPORTED_VERSIONS",
    "TENSORS",
    "NotPlainFile",
    "Unsynced",
    "array_metadata",
    "array_metadata_text",
    "array_ref",
    "batch_attributes",
    "batch_dir",
    "chunk_bytes",
    "chunk_name",
    "deletion_cut_short",
    "group",
    "read_root_attributes",
    "read_small_file",
    "stored_tensor_node",
    "tensors_dir",
    "unstored_tensor_node",
]

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
STORE_PREFIX = "spillcache-"
_ROOT_BYTES = 1 << 20  # a root zarr.json is a few hundred bytes
ATTRS_KEY = "spillcache"
# The store's two groups: arrays under TENSORS, batch structures under BATCHES.
TENSORS = "tensors"
BATCHES = "batches"
ARRAY_PREFIX = f"{TENSORS}/"  # how a batch structure names an array
_COUNT = r"(?:0|[1-9][0-9]{0,17})"  # a decimal number below 10**18: an int64
_LATER = r"(?:\.(?:[2-9]|[1-9][0-9]{1,17}))?"
# The writer's array names: a record number, with ".<n>" (n >= 2) for a later write of
# the same record, or "i<n>" for a small tensor written when the store is kept.
ARRAY_NAME = re.compile(rf"{_COUNT}{_LATER}|i{_COUNT}")
# The array names read from a store: record numbers below 10**17. A reopened cache
# numbers its records past the largest (records.skip), and their names must be ones the
# writer takes: 9 * 10**17 are left, more than any run makes (10**18 - 1 would leave none).
STORED_NAME = re.compile(rf"(?:0|[1-9][0-9]{{0,16}}){_LATER}|i{_COUNT}")
BATCH_NAME = re.compile(_COUNT)
PARTIAL_NAME = re.compile(r".+\.[0-9a-f]{8}\.partial")  # chunkio's temporary names


def tensors_dir(store_path: str | os.PathLike[str]) -> Path:
    return Path(store_path) / TENSORS


def deletion_cut_short(store_path: str | os.PathLike[str], name: str) -> bool:
    """Whether array ``name`` holds its ``zarr.json`` alone: what a deletion cut short
    leaves where it took the chunk first (`spillcache gc` removes an array's files in any
    order). No value reads from it: a leftover for `gc`, not damage."""
    try:
        with os.scandir(tensors_dir(store_path) / name) as entries:
            held = [(entry.name, entry.is_file(follow_symlinks=False)) for entry in entries]
    except OSError:  # not a directory one can list: not what a deletion leaves
        return False
    return held == [("zarr.json", True)]


def batch_dir(store_path: str | os.PathLike[str], index: int | None = None) -> Path:
    """The batches group, or batch ``index``'s group in it."""
    batches = Path(store_path) / BATCHES
    return batches if index is None else batches / str(index)


def array_ref(name: str) -> str:
    """How a batch structure names array ``name``."""
    return ARRAY_PREFIX + name


# A batch's structures (docs/format.md, "Batches"): its group's attributes hold
# {"entries": {key: structure}, "flush": n, "before": {"flush": m, "entries": ...}},
# each structure as tree.spec_to_json writes it, with these tensor nodes inside.


def stored_tensor_node(name: str, device: torch.device, requires_grad: bool) -> dict:
    """A structure's node for a tensor stored as array ``name``."""
    return {"array": array_ref(name), "device": str(device), "requires_grad": requires_grad}


def unstored_tensor_node(device: torch.device) -> dict:
    """A structure's node for a tensor its run kept in RAM only (read back as None)."""
    return {"array": None, "device": str(device), "note": "kept in RAM only; not stored"}


def batch_attributes(
    entries: dict[str, dict], flush: int | None, before: tuple[int, dict] | None
) -> dict:
    """A batch group's spillcache attributes: its structures as of flush ``flush``,
    keeping the ones of the last completed flush (``before``) until the root says
    this flush completed."""
    own: dict[str, Any] = {"entries": entries}
    if flush is not None:
        own["flush"] = flush
    if before is not None:
        own["before"] = {"flush": before[0], "entries": before[1]}
    return own


if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError(
        "spillcache stores raw little-endian bytes; big-endian hosts are not supported"
    )


def _fill_value(data_type: str) -> Any:
    if data_type == "bool":
        return False
    if data_type.startswith("complex"):
        return [0.0, 0.0]
    if data_type.startswith("float"):
        return 0.0
    return 0


CRC32C_CODEC = {"name": "crc32c"}


def array_metadata(shape: tuple[int, ...], dtype: torch.dtype, checksum: bool = False) -> dict:
    """zarr v3 metadata for one tensor stored as a single uncompressed chunk (with a
    CRC32C of the chunk appended, zarr's ``crc32c`` codec, when ``checksum``)."""
    data_type = dtypes.storage_dtype_name(dtype)
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": data_type,
        # zarr chunks must have a positive size; an empty dimension has no chunks.
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [max(1, n) for n in shape]},
        },
        # "." keeps the chunk a single file beside zarr.json: no directory per dimension.
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": _fill_value(data_type),
        "codecs": [bytes_codec, CRC32C_CODEC] if checksum else [bytes_codec],
        "attributes": {ATTRS_KEY: {"torch_dtype": dtypes.dtype_name(dtype)}},
    }


def array_metadata_text(
    shape: tuple[int, ...], dtype: torch.dtype, checksum: bool, owner: tuple[int, str] | None
) -> bytes:
    """An array's zarr.json, encoded, with the (batch, key) it was stored under."""
    head, tail = _array_metadata_parts(shape, dtype, checksum)
    if owner is None:
        return head + tail
    batch, key = owner
    return head + b',\n   "batch": %d,\n   "key": %s' % (batch, json.dumps(key).encode()) + tail


@functools.lru_cache(maxsize=256)
def _array_metadata_parts(shape: tuple, dtype: torch.dtype, checksum: bool) -> tuple[bytes, bytes]:
    """An array's zarr.json (the same for every tensor of a shape and dtype), split
    after its torch_dtype: where the owner goes."""
    text = json.dumps(array_metadata(shape, dtype, checksum), indent=1).encode()
    marker = b'"torch_dtype": ' + json.dumps(dtypes.dtype_name(dtype)).encode()
    cut = text.rindex(marker) + len(marker)
    return text[:cut], text[cut:]


def chunk_name(ndim: int) -> str:
    """The key of the only chunk of an ndim-dimensional array ('c' for 0-d)."""
    return ".".join(["c"] + ["0"] * ndim)


def group(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def chunk_bytes(nbytes: int, checksum: bool) -> int:
    """The size of the chunk file of an array of ``nbytes`` (with its CRC32C, if any)."""
    return nbytes + (CRC32C_BYTES if checksum else 0)


# ---------------------------------------------------------------- small files


class NotPlainFile(ValueError):
    """A path where a store keeps a small regular file holds something else."""


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``; FileNotFoundError if there is none,
    NotPlainFile (saying what is there instead) for a link, a directory or a device, or
    a file of more than ``limit`` bytes; OSError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotPlainFile("is a symbolic link; a store holds none") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPlainFile("is not a regular file")
        if info.st_size > limit:
            raise NotPlainFile(f"holds {info.st_size} bytes, more than spillcache writes there")
        return handle.read(limit + 1)


def read_root_attributes(path: str | os.PathLike[str]) -> dict:
    """The spillcache attributes of the store at ``path``, or a clear error: for a
    directory laid out as a store (it holds the ``tensors`` group) whose root cannot be
    read (missing, not a regular file, not a JSON object: cut short, overwritten), a
    StoreCorruptError naming the root's file and what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"no store at {path}: the path does not exist")
    if not path.is_dir():
        raise StoreFormatError(f"{path} is not a spillcache store (not a directory)")
    root = path / "zarr.json"
    try:
        metadata: Any = json.loads(read_small_file(root, _ROOT_BYTES))  # never through a link
    except (OSError, ValueError, RecursionError) as error:
        metadata = error
    if not isinstance(metadata, dict) and (path / TENSORS).is_dir():
        raise StoreCorruptError(f"{root} {_root_damage(metadata)}")
    if isinstance(metadata, FileNotFoundError):
        raise StoreFormatError(f"{path} is not a spillcache store (no zarr.json)")
    attributes = metadata.get("attributes") if isinstance(metadata, dict) else None
    attributes = attributes.get(ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(attributes, dict):
        raise StoreFormatError(f"{path} is not a spillcache store (no spillcache attributes)")
    return attributes


def _root_damage(found: Any) -> str:
    """What is wrong with a store's root zarr.json, given what reading it gave."""
    if isinstance(found, FileNotFoundError):
        return "is missing: the store's root metadata (format version, state) is gone"
    if isinstance(found, NotPlainFile):
        return str(found)
    if isinstance(found, OSError):
        return f"cannot be read ({found.strerror or found})"
    if isinstance(found, (ValueError, RecursionError)):  # cut short, or overwritten
        return f"is not valid JSON ({found}): the store's root metadata is damaged"
    return "is not a JSON object: the store's root metadata is damaged"


# ----------------------------------------------------------------- durability


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
