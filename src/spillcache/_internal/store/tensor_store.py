"""A cache's store as the cache uses it: tensors written, read and deleted as chunk
files, batch structures and the root written, the directory made and removed.

``TensorStore`` is the surface the cache's machinery (pool, tenants, reads, persist)
uses; ``Store`` implements it over a zarr v3 directory laid out as store_format.py
says, moving each chunk file's bytes with chunkio.py. Tests run the cache against an
in-memory implementation (tests/memory_store.py).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import math
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from spillcache.errors import StoreCorruptError, StoreError, StoreFormatError

from .. import dtypes
from ..io import chunk_reads, chunkio
from ..io.arena import SharedBuffers
from ..io.buffers import PAGE, STAGING_BYTES, BufferPool, StagingBuffers
from ..io.chunk_reads import crc32c
from . import failures, store_dirs
from .store_format import (
    ATTRS_KEY,
    BATCHES,
    FORMAT_VERSION,
    STORE_PREFIX,
    SUPPORTED_VERSIONS,
    TENSORS,
    Unsynced,
    array_metadata_text,
    batch_attributes,
    batch_dir,
    chunk_bytes,
    chunk_name,
    group,
    read_root_attributes,
    tensors_dir,
)

__all__ = ["Store", "TensorStore", "resolve_direct_io", "write_root_json"]


@runtime_checkable
class TensorStore(Protocol):
    """What the cache asks of a store. Tensor calls may come from several I/O threads
    at once, each for its own array; the rest come from the cache's owner thread."""

    path: Path
    keep: bool  # a kept store (keep_store): no signal, sweep or plain gc removes it
    # The root's spillcache attributes as last read or written; a kept store's flush
    # sets its note here, written with the root
    attributes: dict
    # An I/O thread's write is fsync'd as it lands (pool passes durable=True)
    syncs_background_writes: bool

    def write_tensor(
        self,
        name: str,
        tensor: torch.Tensor,
        *,
        durable: bool = False,
        owner: tuple[int, str] | None = None,
    ) -> None:
        """Store a compact CPU tensor as array ``name``, whole or not at all."""

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
        """Array ``name``'s bits as a new CPU tensor of ``shape`` and ``dtype``."""

    def delete_tensor(self, name: str) -> None:
        """Forget array ``name`` (no error if it is gone)."""

    def write_batch(
        self,
        index: int,
        entries: dict[str, dict],
        *,
        durable: bool = False,
        flush: int | None = None,
        before: tuple[int, dict] | None = None,
    ) -> None:
        """Record batch ``index``'s structures (a kept store's flush and close)."""

    def write_root_attributes(
        self, *, complete: bool, num_batches: int, durable: bool = False, flush: int | None = None
    ) -> None:
        """Record the store's state; written last, it completes a flush."""

    def sync_written(self) -> None:
        """Make what was written so far durable before structures name it (a kept
        store's flush and close)."""

    def close(self) -> None:
        """Free the store's memory; what it holds stays."""

    def remove(self) -> None:
        """Delete the store and everything in it."""


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
        staging: StagingBuffers | None = None,
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
        self._shared_staging: tuple[SharedBuffers, int] | None = None
        self.unsynced = Unsynced(path)  # a kept store's writes not yet fsync'd

    keep = False  # made for keep_store: no signal, sweep or plain gc removes it
    # Where a kept store pays for the durability of its background writes
    # (docs/benchmarks.md, "What durable flushes cost", compares the two): True, each
    # fsyncs its files and its directory as it lands, on its I/O thread, behind the
    # caller's compute; False, they land without an fsync and the next flush() or close
    # fsyncs them all (``sync_written``), which makes flush() itself take longer. What
    # flush() and close write themselves is synced together by ``sync_written``.
    sync_on_write = True

    @property
    def syncs_background_writes(self) -> bool:
        """Whether an I/O thread's write into this store is fsync'd as it lands."""
        return self.keep and self.sync_on_write

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
        root: str | os.PathLike[str] | None = None,
    ) -> Store:
        """Make a new private store directory under ``parent``.

        ``direct_io`` is True, False or "auto" (O_DIRECT where the filesystem takes it);
        ``writers`` is how many threads may write at once (one staging buffer each);
        ``read_buffer_bytes`` bounds the memory kept for reuse by reads. With
        ``shared``, the store uses those buffers (several caches' stores share them)
        instead of making its own (left alone on close). Unless ``keep``, a signal removes
        it, and the directories it leaves empty up to ``root`` (disk_path; else ``parent``).
        """
        parent = Path(parent)
        try:
            path = parent / f"{STORE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
            _make_store_dir(path)
            if not keep:
                store_dirs.register(path, root)
            # mkdir's mode is filtered by the umask; make "private" exact.
            os.chmod(path, 0o700)
            if shared is not None:
                store = cls._sharing(path, shared, direct_io, writers, checksum=checksum)
            else:
                store = cls._configured(path, direct_io, writers, read_buffer_bytes, checksum)
            store.keep = keep
            for name in (TENSORS, BATCHES):
                (path / name).mkdir()
                _write_json(path / name / "zarr.json", group())
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
    def _sharing(
        cls, path: Path, shared: SharedBuffers, direct_io: bool | str, writers: int, checksum: bool
    ) -> Store:
        """A store over a pool's buffers (``shared``), which its close leaves alone."""
        direct = resolve_direct_io(path.parent, direct_io)
        store = cls(path, direct=direct, checksum=checksum)
        store._buffers = shared.reads
        store._owns_buffers = False
        # Staging buffers only once an unaligned tensor is written (values in the
        # pool's arena are page-aligned and need none).
        store._shared_staging = (shared, writers) if direct else None
        return store

    @classmethod
    def _configured(
        cls, path: Path, direct_io: bool | str, writers: int, buffer_bytes: int, checksum: bool
    ) -> Store:
        direct = resolve_direct_io(path.parent, direct_io)
        staging = StagingBuffers(writers, STAGING_BYTES) if direct else None
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
        shared: SharedBuffers | None = None,
    ) -> Store:
        """Open an existing store, checking that it is one and that its version is known.

        Its arrays' checksum setting is left False: read each array's from its checked
        metadata (``store_checks.read_array``; reopening sets the store's from them). The
        other settings are as for ``create`` (``shared``: a pool's buffers, used instead
        of buffers of its own).
        """
        path = Path(path)
        attributes = read_root_attributes(path)
        version = attributes.get("format_version")
        if type(version) is not int:  # each spillcache writes a number: none newer lacks one
            said = "is missing" if version is None else f"{repr(version)[:40]} is not a number"
            raise StoreCorruptError(
                f"{path / 'zarr.json'}: its format_version {said}: the store's root metadata "
                "is damaged"
            )
        if version not in SUPPORTED_VERSIONS:
            raise StoreFormatError(
                f"{path} has store format version {version!r}; this spillcache reads "
                f"version(s) {', '.join(map(str, SUPPORTED_VERSIONS))}: upgrade spillcache"
            )
        if shared is not None:
            store = cls._sharing(path, shared, direct_io, writers, checksum=False)
        else:
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
            **store_dirs.owner_identity(),  # start time, boot and pid namespace: pid reuse shows
        }
        if flush is not None:  # the last flush (or close) whose structures are all written
            state["flush"] = flush
        note = self.attributes.get("note")
        if note is not None:  # the owner's, committed with the flush (a checkpoint's)
            state["note"] = note
        if "note_before" in self.attributes:  # the flush before is kept (persist.py)
            state["note_before"] = self.attributes["note_before"]
        write_root_json(self.path, state, durable)

    def sync_written(self) -> None:
        """A kept store's flush or close, before it commits structures: fsync every
        array written since the last call without an fsync, and the store's directories
        the first time (``store_format.Unsynced``). A failed fsync is a StoreError naming the store
        (what it could not sync is synced again by the next call)."""
        try:
            self.unsynced.sync()
        except OSError as error:
            what = f"cannot make what was written to {self.path} durable (fsync)"
            raise failures.io_error(error, what, self.path) from error

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        store_dirs.unregister(self.path)

    def close(self) -> None:
        """Free the staging and read buffers (the files stay), unless they are shared."""
        if not self._owns_buffers:
            return
        if self._staging is not None:
            self._staging.close()
        self._buffers.clear()

    # ------------------------------------------------------------- tensors

    def _staging_for(self, data: torch.Tensor) -> StagingBuffers | None:
        """The staging buffers a direct write of ``data`` goes through, if it needs them."""
        if self._staging is None and self._shared_staging is not None:
            if data.data_ptr() % PAGE:
                shared, writers = self._shared_staging
                self._staging = shared.staging(writers)
        return self._staging

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
        that the array says what it is even where no batch structure names it.
        ``durable``: its files and directory fsync'd now; else, in a kept store, listed
        for the next ``sync_written``."""
        directory = self._array_dir(name)
        metadata_path = directory / "zarr.json"
        shape = tuple(tensor.shape)
        metadata = array_metadata_text(shape, tensor.dtype, self.checksum, owner)
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
                    staging=self._staging_for(data),
                    durable=durable,
                    # Computed while the device writes, where the writes are queued.
                    trailer=(lambda: crc32c(data)) if self.checksum else b"",
                    alongside=write_metadata,
                )
            else:
                write_metadata()
            chunkio.publish(partial[0], metadata_path, durable=durable)
            if self.keep and not durable:
                self.unsynced.written(name)
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
        checked = self.checksum if checksum is None else checksum
        try:
            if nbytes == 0:
                raw = torch.empty(0, dtype=torch.uint8)
            elif mapped:
                mapping = chunk_reads.map_file(path, chunk_bytes(nbytes, checked))
                raw = mapping[:nbytes]
                if checked:
                    chunk_reads.check_crc(path, bytes(mapping[nbytes:].numpy()), raw)
            else:
                raw = self._buffers.take(nbytes, pin=pin)
                chunk_reads.read_file(path, raw, direct=self.direct, checksum=checked)
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

    # ------------------------------------------------------------- batches

    def write_batch(
        self,
        index: int,
        entries: dict[str, dict],
        *,
        durable: bool = False,
        flush: int | None = None,
        before: tuple[int, dict] | None = None,
    ) -> None:
        """Record the structures of one batch's entries (key -> JSON spec), atomically,
        as flush ``flush``, keeping ``before`` (store_format.batch_attributes)."""
        directory = batch_dir(self.path, index)
        directory.mkdir(exist_ok=True)
        own = batch_attributes(entries, flush, before)
        _write_json(directory / "zarr.json", group({ATTRS_KEY: own}), durable)


def write_root_json(path: Path, attributes: dict, durable: bool = True) -> None:
    """Replace the root ``zarr.json`` of the store at ``path``, atomically: it carries
    ``attributes`` as the store's spillcache attributes."""
    _write_json(path / "zarr.json", group({ATTRS_KEY: attributes}), durable)


def _write_json(path: Path, value: dict, durable: bool = False) -> None:
    text = bytearray(json.dumps(value, indent=1).encode())
    chunkio.write_file(
        path, torch.frombuffer(text, dtype=torch.uint8), direct=False, staging=None, durable=durable
    )


def resolve_direct_io(parent: Path, direct_io: bool | str) -> bool:
    if direct_io is False:
        return False
    supported = chunkio.direct_io_supported(parent)
    if direct_io is True and not supported:
        raise StoreError(
            f"direct_io = true, but the filesystem at {parent} refuses O_DIRECT; "
            'set direct_io = "auto" (buffered I/O there) or false'
        )
    return supported


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
