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
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import google_crc32c
import torch

from ..errors import StoreCorruptError, StoreError, StoreFormatError, StoreNotFoundError
from . import chunkio, dtypes, failures, owners
from .buffers import BufferPool
from .small_files import read_small_file

__all__ = [
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "SharedBuffers",
    "Store",
    "find_runs",
    "find_stores",
    "owner_alive",
    "rank_dirs",
    "ARRAY_PREFIX",
    "BATCHES",
    "TENSORS",
    "array_ref",
    "batch_dir",
    "read_root_attributes",
    "tensors_dir",
    "remove_empty_dirs",
    "run_store_parent",
    "store_bytes",
]

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
STORE_PREFIX = "spillcache-"
_ROOT_BYTES = 1 << 20  # a root zarr.json is a few hundred bytes
RANK_PREFIX = "rank"
_RANK_NAME = re.compile(rf"{RANK_PREFIX}(0|[1-9][0-9]*)")
ATTRS_KEY = "spillcache"
# The store's two groups: arrays under TENSORS, batch structures under BATCHES.
TENSORS = "tensors"
BATCHES = "batches"
ARRAY_PREFIX = f"{TENSORS}/"  # how a batch structure names an array


def tensors_dir(store_path: str | os.PathLike[str]) -> Path:
    return Path(store_path) / TENSORS


def batch_dir(store_path: str | os.PathLike[str], index: int | None = None) -> Path:
    """The batches group, or batch ``index``'s group in it."""
    batches = Path(store_path) / BATCHES
    return batches if index is None else batches / str(index)


def array_ref(name: str) -> str:
    """How a batch structure names array ``name``."""
    return ARRAY_PREFIX + name


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


def _array_metadata_text(
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


def _write_json(path: Path, value: dict, durable: bool = False) -> None:
    text = bytearray(json.dumps(value, indent=1).encode())
    chunkio.write_file(
        path, torch.frombuffer(text, dtype=torch.uint8), direct=False, staging=None, durable=durable
    )


def _group(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


STAGING_BYTES = 8 * 2**20  # per buffer: smaller pieces lose the disk's queue depth


class SharedBuffers:
    """Buffers that the stores of several caches share: one read-buffer pool, and one
    set of staging buffers for direct writes (made when a store first needs them).
    Thread-safe; ``close`` frees them once no store uses them."""

    def __init__(self, read_buffer_bytes: int) -> None:
        self.reads = BufferPool(read_buffer_bytes)
        self._lock = threading.Lock()
        self._staging: chunkio.StagingBuffers | None = None

    def staging(self, writers: int) -> chunkio.StagingBuffers:
        with self._lock:
            if self._staging is None:
                self._staging = chunkio.StagingBuffers(writers, STAGING_BYTES)
            return self._staging

    def close(self) -> None:
        with self._lock:
            staging, self._staging = self._staging, None
        if staging is not None:
            staging.close()
        self.reads.clear()


class Store:
    """One cache's directory of tensors and batch structures.

    Tensor reads and writes may run on several threads at once (each touches only its
    own array's files); creating, removing and batch structures are the owner's.

    :param direct: chunk files are read and written with O_DIRECT
    :param staging: page-aligned buffers for direct writes of unaligned tensors
    :param buffers: where reads get their memory (reused once nobody holds it)
    """

    def __init__(
        self,
        path: Path,
        *,
        direct: bool = False,
        staging: chunkio.StagingBuffers | None = None,
        buffers: BufferPool | None = None,
        checksum: bool = False,
    ) -> None:
        self.path = path
        self.direct = direct
        self.checksum = checksum
        self.attributes: dict = {}  # the root's spillcache attributes, as ``open`` read them
        self._staging = staging
        self._buffers = buffers or BufferPool(0)
        self._owns_buffers = True  # False: shared with other stores (SharedBuffers)

    keep = False  # made for keep_store: no signal, sweep or plain gc removes it

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def create(
        cls,
        parent: str | os.PathLike[str],
        *,
        direct_io: bool | str = False,
        writers: int = 1,
        read_buffer_bytes: int = 0,
        checksum: bool = False,
        shared: SharedBuffers | None = None,
        keep: bool = False,
    ) -> Store:
        """Make a new private store directory under ``parent``.

        ``direct_io`` is True, False or "auto" (O_DIRECT where the filesystem takes it);
        ``writers`` is how many threads may write at once (one staging buffer each);
        ``read_buffer_bytes`` bounds the memory kept for reuse by reads. With
        ``shared``, the store uses those buffers (several caches' stores share them)
        instead of making its own (left alone on close). Unless ``keep``, a signal removes it.
        """
        parent = Path(parent)
        try:
            path = parent / f"{STORE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
            _make_store_dir(path)
            if not keep:
                owners.register(path)
            # mkdir's mode is filtered by the umask; make "private" exact.
            os.chmod(path, 0o700)
            if shared is not None:
                direct = _resolve_direct_io(parent, direct_io)
                staging = shared.staging(writers) if direct else None
                store = cls(path, direct=direct, staging=staging, checksum=checksum)
                store._buffers = shared.reads
                store._owns_buffers = False
            else:
                store = cls._configured(path, direct_io, writers, read_buffer_bytes, checksum)
            store.keep = keep
            for group in (TENSORS, BATCHES):
                (path / group).mkdir()
                _write_json(path / group / "zarr.json", _group())
            # The root's metadata last: until it exists the directory is no store.
            store.write_root_attributes(complete=False, num_batches=0)
        except OSError as error:  # StoreError included: nothing half-made stays behind
            if "path" in locals():
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(error, StoreError):
                raise
            raise StoreError(
                error.errno,
                f"cannot create a store under {str(parent)!r} ({error.strerror}); "
                + (
                    "free space there or set disk_path to a disk with room"
                    if error.errno == errno.ENOSPC
                    else "set disk_path to a writable directory on a local disk"
                ),
            ) from error
        return store

    @classmethod
    def _configured(
        cls, path: Path, direct_io: bool | str, writers: int, buffer_bytes: int, checksum: bool
    ) -> Store:
        direct = _resolve_direct_io(path.parent, direct_io)
        staging = chunkio.StagingBuffers(writers, STAGING_BYTES) if direct else None
        buffers = BufferPool(buffer_bytes)
        return cls(path, direct=direct, staging=staging, buffers=buffers, checksum=checksum)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        direct_io: bool | str = False,
        writers: int = 1,
        read_buffer_bytes: int = 0,
    ) -> Store:
        """Open an existing store, checking that it is one and that its version is known.

        Its arrays' checksum setting is left False: read each array's from its checked
        metadata (``store_checks.read_array``; reopening sets the store's from them). The
        other settings are as for ``create``.
        """
        path = Path(path)
        attributes = read_root_attributes(path)
        version = attributes.get("format_version")
        if type(version) is not int or version not in SUPPORTED_VERSIONS:
            raise StoreFormatError(
                f"{path} has store format version {version!r}; this spillcache reads "
                f"version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade spillcache"
            )
        store = cls._configured(path, direct_io, writers, read_buffer_bytes, False)
        store.attributes = attributes
        return store

    def write_root_attributes(
        self, *, complete: bool, num_batches: int, durable: bool = False, flush: int | None = None
    ) -> None:
        state = {
            "format_version": FORMAT_VERSION,
            "complete": complete,
            "num_batches": num_batches,
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
            "keep": complete or self.keep or any(map(self.attributes.get, ("keep", "complete"))),
            **owners.identity(),  # start time, boot and pid namespace: pid reuse shows
        }
        if flush is not None:  # the last flush (or close) whose structures are all written
            state["flush"] = flush
        _write_json(self.path / "zarr.json", _group({ATTRS_KEY: state}), durable)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        owners.unregister(self.path)

    def close(self) -> None:
        """Free the staging and read buffers (the files stay), unless they are shared."""
        if not self._owns_buffers:
            return
        if self._staging is not None:
            self._staging.close()
        self._buffers.clear()

    # ------------------------------------------------------------- tensors

    def _array_dir(self, name: str) -> Path:
        return tensors_dir(self.path) / name

    def write_tensor(
        self,
        name: str,
        tensor: torch.Tensor,
        *,
        durable: bool = False,
        owner: tuple[int, str] | None = None,
    ) -> None:
        """Store a CPU tensor as array ``tensors/<name>``.
        ``owner``: the (batch, key) it was stored under, recorded in its attributes so
        that the array says what it is even where no batch structure names it."""
        directory = self._array_dir(name)
        metadata_path = directory / "zarr.json"
        shape = tuple(tensor.shape)
        metadata = _array_metadata_text(shape, tensor.dtype, self.checksum, owner)
        partial: list[Path] = []  # zarr.json under its .partial name, once written

        def write_metadata() -> None:
            partial.append(chunkio.write_partial(metadata_path, metadata, durable=durable))

        try:
            directory.mkdir(exist_ok=True)
            if tensor.numel():
                data = dtypes.byte_view(tensor.contiguous())
                # zarr.json is written while the chunk's last pieces are still on their
                # way to the device, and renamed into place after the chunk.
                chunkio.write_file(
                    directory / chunk_name(tensor.dim()),
                    data,
                    direct=self.direct,
                    staging=self._staging,
                    durable=durable,
                    trailer=_crc32c(data) if self.checksum else b"",
                    alongside=write_metadata,
                )
            else:
                write_metadata()
            chunkio.publish(partial[0], metadata_path, durable=durable)
        except OSError as error:
            shutil.rmtree(directory, ignore_errors=True)
            what = f"cannot write tensor {name} ({tensor.nbytes} bytes) to {self.path}"
            raise failures.io_error(error, what, self.path) from error

    def read_tensor(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        *,
        pin: bool = False,
        mapped: bool = False,
        checksum: bool | None = None,
    ) -> torch.Tensor:
        """Read array ``tensors/<name>`` into a new CPU tensor, checking its size (and its
        CRC32C where the store keeps one: ``checksum``, default the store's own setting).

        ``pin`` reads into pinned memory (for a copy to an accelerator); ``mapped``
        maps the chunk file instead (zero-copy, read-only use, through the page cache).
        """
        nbytes = math.prod(shape) * dtype.itemsize
        path = self._array_dir(name) / chunk_name(len(shape))
        trailer = 4 if (self.checksum if checksum is None else checksum) else 0
        try:
            if nbytes == 0:
                raw = torch.empty(0, dtype=torch.uint8)
            elif mapped:
                mapping = chunkio.map_file(path, nbytes + trailer)
                raw, stored = mapping[:nbytes], bytes(mapping[nbytes:].numpy())
            else:
                raw = self._buffers.take(nbytes, pin=pin)
                stored = chunkio.read_file(path, raw, direct=self.direct, trailer=trailer)
            if nbytes and trailer and stored != _crc32c(raw):
                raise StoreCorruptError(
                    f"chunk file {path} fails its CRC32C check: its bytes changed after "
                    "they were written"
                )
        except StoreCorruptError as error:
            raise failures.io_error(error, f"tensor {name}", self.path) from None
        except OSError as error:
            what = f"cannot read tensor {name} from {path}"
            raise failures.io_error(error, what, self.path) from error
        return raw.view(dtypes.raw_dtype(dtype)).view(shape).view(dtype)

    def delete_tensor(self, name: str) -> None:
        # zarr.json first: an array cut short by a crash is then half-written, never
        # an array whose chunk is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._array_dir(name) / "zarr.json")
        shutil.rmtree(self._array_dir(name), ignore_errors=True)

    def array_names(self) -> list[str]:
        """Every complete array in the store (an array's zarr.json is written last);
        never one reached through a symbolic link."""
        found = []
        with os.scandir(tensors_dir(self.path)) as entries:
            for entry in entries:
                metadata = os.path.join(entry.path, "zarr.json")
                if entry.is_dir(follow_symlinks=False) and os.path.isfile(metadata):
                    found.append(entry.name)
        return sorted(found)

    # ------------------------------------------------------------- batches

    def write_batch(
        self, index: int, entries: dict[str, dict], *, durable: bool = False, **flushed: Any
    ) -> None:
        """Record the structures of one batch's entries (key -> JSON spec), atomically;
        ``flushed``: ``flush`` and ``before`` (docs/format.md, "Batches"; ``persist``)."""
        directory = batch_dir(self.path, index)
        directory.mkdir(exist_ok=True)
        own = {"entries": entries, **flushed}
        _write_json(directory / "zarr.json", _group({ATTRS_KEY: own}), durable)

    def read_batch(self, index: int) -> dict[str, dict]:
        path = batch_dir(self.path, index) / "zarr.json"
        try:
            return json.loads(path.read_text())["attributes"][ATTRS_KEY]["entries"]
        except FileNotFoundError:
            return {}


def _crc32c(data: torch.Tensor) -> bytes:
    """zarr's crc32c codec: CRC-32C of the chunk's bytes, 4 bytes little-endian."""
    return google_crc32c.value(data.numpy()).to_bytes(4, "little")


def _resolve_direct_io(parent: Path, direct_io: bool | str) -> bool:
    if direct_io is False:
        return False
    supported = chunkio.direct_io_supported(parent)
    if direct_io is True and not supported:
        raise StoreError(
            f"direct_io = true, but the filesystem at {parent} refuses O_DIRECT; "
            'set direct_io = "auto" (buffered I/O there) or false'
        )
    return supported


def read_root_attributes(path: str | os.PathLike[str]) -> dict:
    """The spillcache attributes of the store at ``path``, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"no store at {path}: the path does not exist")
    if not path.is_dir():
        raise StoreFormatError(f"{path} is not a spillcache store (not a directory)")
    try:
        text = read_small_file(path / "zarr.json", _ROOT_BYTES)  # never through a link
        attributes = json.loads(text)["attributes"][ATTRS_KEY]
    except FileNotFoundError:
        raise StoreFormatError(f"{path} is not a spillcache store (no zarr.json)") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        attributes = None
    if not isinstance(attributes, dict):
        raise StoreFormatError(f"{path} is not a spillcache store (no spillcache attributes)")
    return attributes


def _make_store_dir(path: Path, attempts: int = 3) -> None:
    """mkdir ``path`` (mode 0700) and its parents. An empty run or rank directory may be
    removed (by ``spillcache gc`` or another rank's ``remove_empty_dirs``) between making
    the parent and the store: then the parent is made again."""
    for attempt in range(attempts):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o700)
            return
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise


# ------------------------------------------------------------------ finding stores


def find_stores(directory: str | os.PathLike[str]) -> dict[Path, dict]:
    """The spillcache stores directly under ``directory`` (any format version), by name,
    each with its root attributes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreNotFoundError(f"no directory {directory}")
    found = {}
    for path in sorted(directory.glob(f"{STORE_PREFIX}*")):
        try:
            found[path] = read_root_attributes(path)
        except (StoreError, PermissionError):
            continue  # not a store, one being created right now, or another user's
    return found


# Run directories (torchrun): every rank's stores under <disk_path>/<run>/rank<R>/.


def run_store_parent(disk_dir: str | os.PathLike[str], run_id: str, rank: int) -> Path:
    """Where rank ``rank`` of run ``run_id`` creates its stores (``run_id`` is already a
    safe directory name: see ``ranks.run_id``)."""
    return Path(disk_dir) / run_id / f"{RANK_PREFIX}{rank}"


def rank_dirs(directory: str | os.PathLike[str]) -> dict[int, Path]:
    """The ``rank<R>`` directories of a run directory, by rank; ``{}`` if ``directory``
    is no run directory: one is a directory holding ``rank<R>`` directories and nothing
    else (so that no other directory, in the temp directory say, is taken for one)."""
    found: dict[int, Path] = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _RANK_NAME.fullmatch(entry.name)
                if match is None or not entry.is_dir(follow_symlinks=False):
                    return {}
                found[int(match.group(1))] = Path(entry.path)
    except OSError:  # gone, not a directory, or not ours to read
        return {}
    return dict(sorted(found.items()))


def find_runs(directory: str | os.PathLike[str]) -> dict[Path, dict[int, Path]]:
    """The run directories at ``directory`` itself or directly under it, each with its
    rank directories (``find_stores`` lists a rank directory's stores)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreNotFoundError(f"no directory {directory}")
    own = rank_dirs(directory)
    if own:
        return {directory: own}
    runs = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() and not path.is_symlink() and (ranks := rank_dirs(path)):
            runs[path] = ranks
    return runs


def remove_empty_dirs(path: str | os.PathLike[str], stop: str | os.PathLike[str]) -> list[Path]:
    """Remove ``path`` and then its parents while they are empty, never ``stop`` or a
    directory outside it (rmdir only: nothing that holds a file or a store goes). For
    a rank directory and its run directory once their last store is gone; returns the
    directories removed."""
    path, stop = Path(path), Path(stop)
    removed = []
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:  # not empty (another rank's store, one being made), or gone
            break
        removed.append(path)
        path = path.parent
    return removed


def store_bytes(path: Path) -> int:
    """Bytes of every file in the store (what deleting it frees)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # deleted by its cache meanwhile
    return total


def owner_alive(attributes: dict) -> bool | None:
    """Whether the process that wrote the store still runs (``owners.alive``: a zombie
    or a reused pid is dead; None, never dead, for another host's store)."""
    return owners.alive(attributes)
