"""One chunk file in, at the device's speed, checked: its size against what its metadata
says and, where it carries one, its CRC-32C; and that checksum itself.

CRC-32C is the checksum of zarr's ``crc32c`` codec: a chunk file's last
``CRC32C_BYTES`` bytes, after its data (little-endian; the store computes it as it
writes, ``crc32c``). It is computed by google_crc32c's own library called through
ctypes where it can be found: that lets other threads run while it computes (see
``_load_crc32c_extend``).

Reads fill a 1-D uint8 CPU tensor (with O_DIRECT: a page-aligned one from the read
buffers) or map the file (``map_file``). Like chunkio, this module starts no threads:
every I/O thread of the cache calls it at once, and the only lock a read takes is its
device's turn.

Large direct reads take turns on their device (``turn``): one at a time per file
system. Two large O_DIRECT reads in flight on one disk share its bandwidth and end at
about the same time; then both threads checksum what they read while the device has
nothing to do. One large read at a time, each a single ``preadv`` of the whole chunk
(which the kernel already splits into as many device requests as the queue takes),
keeps the device reading while the thread that has just read checksums and hands its
value on, as long as the next read is already waiting for its turn (``iter_prefetch``
at its default depth of 2 keeps one waiting; docs/benchmarks.md, "Disk throughput").
So a read's CRC is computed after its turn is handed on, while the next read has the
device.

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

import ctypes
import ctypes.util
import mmap
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import google_crc32c
import torch

from spillcache.errors import StoreCorruptError

from ..sysinfo import filesystem_type
from .buffers import PAGE, aligned_empty, round_up
from .chunkio import check_bytes

__all__ = [
    "CRC32C_BYTES",
    "NETWORK_FILESYSTEMS",
    "TURN_BYTES",
    "check_crc",
    "crc32c",
    "crc32c_extend",
    "map_file",
    "read_file",
    "turn",
]

# ---------------------------------------------------------------------- turns

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


# ---------------------------------------------------------------------- reads


def _open_checked(path: Path, nbytes: int, flags: int) -> tuple[int, int]:
    """Open a chunk file that must hold exactly ``nbytes``, StoreCorruptError otherwise;
    return its descriptor and its file system's ``st_dev``."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StoreCorruptError(f"chunk file {path} is missing") from None
    try:
        status = os.fstat(fd)  # of the file we opened, whatever is renamed over it later
        size = status.st_size
        if size != nbytes:
            raise StoreCorruptError(f"chunk file {path} holds {size} bytes, expected {nbytes}")
    except BaseException:
        os.close(fd)
        raise
    return fd, status.st_dev


def _shrank(path: Path, got: int, nbytes: int) -> StoreCorruptError:
    return StoreCorruptError(f"chunk file {path} ended after {got} bytes, expected {nbytes}")


def _read_direct(fd: int, out: torch.Tensor, path: Path, trailer: int, device: int) -> bytes:
    """Read the file into ``out``, then its trailer, in the device's turn (a large
    read); return the trailer's bytes."""
    nbytes = out.numel()
    total = nbytes + trailer
    whole = nbytes - nbytes % PAGE
    view = memoryview(out.numpy())
    # The last partial page (and the trailer) lands in pages of its own, not in ``out``'s
    # storage past its end: ``out`` may be a view whose next bytes belong to someone
    # else. One preadv fills both, and the kernel stops it at EOF.
    tail = aligned_empty(round_up(total - whole)) if whole < total else None
    position = 0
    with turn(device, nbytes, path):
        while position < total:
            buffers = [view[position:whole]] if position < whole else []
            if tail is not None:  # from where ``position`` falls in it (a short read)
                buffers.append(memoryview(tail.numpy())[max(position - whole, 0) :])
            end = position + os.preadv(fd, buffers, position)
            if end >= total:
                break
            if end == position or end % PAGE:  # EOF before the size fstat reported
                raise _shrank(path, end, total)
            position = end
    if tail is None:
        return b""
    tail_bytes = memoryview(tail.numpy())
    view[whole:] = tail_bytes[: nbytes - whole]
    return bytes(tail_bytes[nbytes - whole : total - whole])


def _read_range(
    fd: int, out: torch.Tensor, path: Path, start: int, end: int, expected: int, direct: bool
) -> None:
    """Read bytes ``start:end`` of the file (of ``expected`` bytes) into ``out``; a direct
    read goes on from the page boundary at or before ``start`` (the bytes before it are
    read again)."""
    view = memoryview(out.numpy())
    position = start - start % PAGE if direct else start
    while position < end:
        got = os.preadv(fd, [view[position:end]], position)  # readinto: no bytes object
        if got == 0:
            raise _shrank(path, position, expected)
        position += got
        if direct and position % PAGE and position < end:  # EOF before the size fstat said
            raise _shrank(path, position, expected)


def read_file(path: Path, out: torch.Tensor, *, direct: bool, checksum: bool = False) -> None:
    """Fill ``out`` (1-D uint8, CPU) with the bytes of ``path``, which must hold exactly
    that many (plus, with ``checksum``, their CRC-32C: 4 bytes, little-endian).

    A missing, shorter or longer file raises StoreCorruptError naming the path and the
    sizes, and so does a checksum that does not match. With ``direct``, ``out`` must
    start on a PAGE boundary if it holds a page or more (use aligned_empty, a
    StagingBuffers buffer or an arena slot), or ValueError. A large direct read waits
    for its device's turn (``turn``).
    """
    check_bytes(out, "out")
    path = Path(path)
    nbytes = out.numel()
    trailer = CRC32C_BYTES if checksum else 0
    # Less than a page is all tail: read into a page of its own, then copied.
    if direct and nbytes >= PAGE and out.data_ptr() % PAGE:
        raise ValueError(
            f"read_file(direct=True) needs a {PAGE}-byte aligned tensor; "
            "allocate it with buffers.aligned_empty"
        )
    fd, device = _open_checked(path, nbytes + trailer, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        if direct:
            stored = _read_direct(fd, out, path, trailer, device)
        else:
            _read_range(fd, out, path, 0, nbytes, nbytes + trailer, direct=False)
            stored = os.pread(fd, trailer, nbytes) if trailer else b""
            if len(stored) != trailer:
                raise _shrank(path, nbytes + len(stored), nbytes + trailer)
    finally:
        os.close(fd)
    if checksum:  # after the turn: the next read has the device meanwhile
        check_crc(path, stored, out)


def check_crc(path: Path, stored: bytes, data: torch.Tensor) -> None:
    """StoreCorruptError unless ``stored`` (a chunk file's trailer) is the CRC-32C of
    ``data`` (its bytes)."""
    if stored != crc32c_extend(0, data).to_bytes(CRC32C_BYTES, "little"):
        raise StoreCorruptError(
            f"chunk file {path} fails its CRC32C check: its bytes changed after they were written"
        )


def map_file(path: Path, nbytes: int) -> torch.Tensor:
    """A zero-copy uint8 tensor over the ``nbytes`` of ``path`` (mmap, copy-on-write).

    Pages are read on first touch. The mapping is private (MAP_PRIVATE): writing to the
    tensor never reaches the file, and it stays valid after the file is unlinked or
    replaced by a rename (the inode lives while mapped). Truncating the file in place
    would make its pages fault (SIGBUS); write_file never does that. mmap of the fd we
    checked, not torch.from_file(name), so the size check and the mapping see one file.
    """
    path = Path(path)
    fd, _ = _open_checked(path, nbytes, os.O_RDONLY)
    try:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # mmap refuses an empty mapping
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # keeps ``mapping`` alive


CRC32C_BYTES = 4  # the codec's trailer: a chunk file's last bytes, after the data


def crc32c(data: torch.Tensor) -> bytes:
    """zarr's crc32c codec: CRC-32C of the chunk's bytes (1-D uint8, CPU, contiguous),
    4 bytes little-endian."""
    return crc32c_extend(0, data).to_bytes(CRC32C_BYTES, "little")


def crc32c_extend(crc: int, data: torch.Tensor) -> int:
    """The CRC-32C of the bytes ``crc`` covers followed by ``data`` (1-D uint8, CPU,
    contiguous); ``crc`` 0 starts one."""
    if _crc32c_extend is None or not data.numel():
        return google_crc32c.extend(crc, data.numpy())
    return _crc32c_extend(crc, data.data_ptr(), data.numel())


def _load_crc32c_extend():
    """google_crc32c's own library called through ctypes, which lets other threads run
    while it computes: google_crc32c's module holds the interpreter's lock for anything
    but a ``bytes`` object, so one I/O thread's checksum would stall every other
    thread (the other reads and writes, and the caller). None where the library cannot
    be found (a build linked to a system library elsewhere): then google_crc32c's
    function, holding the lock."""
    package = Path(google_crc32c.__file__).parent
    candidates = sorted(package.parent.glob("google_crc32c.libs/libcrc32c*.so*"))
    if (found := ctypes.util.find_library("crc32c")) is not None:
        candidates.append(Path(found))
    for candidate in candidates:
        try:
            function = ctypes.CDLL(str(candidate)).crc32c_extend
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        function.restype = ctypes.c_uint32
        return function
    return None


_crc32c_extend = _load_crc32c_extend()
