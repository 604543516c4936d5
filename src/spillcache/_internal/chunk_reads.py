"""One chunk file in, at the device's speed, checked: its size against what its metadata
says and, where it carries one, its CRC-32C (chunkio.py writes it).

Reads fill a 1-D uint8 CPU tensor (with O_DIRECT: a page-aligned one from the read
buffers) or map the file (``map_file``). Like chunkio, this module starts no threads
and takes no lock: every I/O thread of the cache calls it at once.

A checked direct read is queued in pieces with native AIO (aio.py) where the kernel has
it, and the CRC of the pieces that have landed is computed while the device reads the
rest, instead of after the whole chunk.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import torch

from ..errors import StoreCorruptError
from . import aio
from .buffers import PAGE, aligned_empty, round_up
from .chunkio import check_bytes
from .store_format import CRC32C_BYTES, chunk_bytes, crc32c_extend

__all__ = ["CHECKED_PIECE", "check_crc", "map_file", "read_file"]


def _open_checked(path: Path, nbytes: int, flags: int) -> int:
    """Open a chunk file that must hold exactly ``nbytes``; StoreCorruptError otherwise."""
    try:
        fd = os.open(path, flags | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StoreCorruptError(f"chunk file {path} is missing") from None
    try:
        size = os.fstat(fd).st_size  # of the file we opened, whatever is renamed over it later
        if size != nbytes:
            raise StoreCorruptError(f"chunk file {path} holds {size} bytes, expected {nbytes}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _shrank(path: Path, got: int, nbytes: int) -> StoreCorruptError:
    return StoreCorruptError(f"chunk file {path} ended after {got} bytes, expected {nbytes}")


def _read_direct(fd: int, out: torch.Tensor, path: Path, trailer: int, start: int = 0) -> bytes:
    """Read the file from ``start`` (a page boundary) into ``out[start:]``, then the
    trailer; return the trailer's bytes."""
    nbytes = out.numel()
    total = nbytes + trailer
    whole = nbytes - nbytes % PAGE
    view = memoryview(out.numpy())
    # The last partial page (and the trailer) lands in pages of its own, not in ``out``'s
    # storage past its end: ``out`` may be a view whose next bytes belong to someone
    # else. One preadv fills both, and the kernel stops it at EOF.
    tail = aligned_empty(round_up(total - whole)) if whole < total else None
    position = start
    while position < total:
        buffers = [view[position:whole]] if position < whole else []
        if tail is not None:
            buffers.append(memoryview(tail.numpy()))
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


# A checked direct read is queued in pieces of CHECKED_PIECE, CHECKED_DEPTH of them in
# flight: few enough that they land one after another (all queued at once, they land
# together, and the checksum would wait for the last), enough to keep the device busy
# (docs/benchmarks.md, "What checksums cost").
CHECKED_PIECE = 2 * 2**20
CHECKED_DEPTH = 3


def _read_queued_checked(ctx: aio.Context, fd: int, out: torch.Tensor, path: Path) -> int:
    """Queue the whole pages of the file into ``out`` in pieces and, while the device
    reads the later ones, extend the CRC-32C over those that have landed, in order.
    Returns the CRC of ``out``'s whole pages; the caller reads the rest."""
    whole = out.numel() - out.numel() % PAGE
    address = out.data_ptr()
    offsets = iter(range(0, whole, CHECKED_PIECE))
    landed: set[int] = set()
    crc, checked = 0, 0  # the CRC of out[:checked]

    def submit_next() -> None:
        offset = next(offsets, None)
        if offset is not None:
            nbytes = min(CHECKED_PIECE, whole - offset)
            ctx.submit_read(fd, address + offset, nbytes, offset, offset)

    for _ in range(CHECKED_DEPTH):
        submit_next()
    while ctx.in_flight:
        for offset, result in ctx.wait(1):
            nbytes = min(CHECKED_PIECE, whole - offset)
            if result < 0:
                raise OSError(-result, f"read at offset {offset}: {os.strerror(-result)}")
            if result < nbytes:  # short: the rest synchronously (EOF: the file shrank)
                expected = chunk_bytes(out.numel(), checksum=True)
                _read_range(fd, out, path, offset + result, offset + nbytes, expected, True)
            landed.add(offset)
            submit_next()
        while checked in landed:
            landed.discard(checked)
            nbytes = min(CHECKED_PIECE, whole - checked)
            crc = crc32c_extend(crc, out[checked : checked + nbytes])
            checked += nbytes
    return crc


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
    StagingBuffers buffer or an arena slot), or ValueError. A checked direct read of
    several pieces is queued with native AIO where the kernel has it, and checksums
    what has landed while the rest is read.
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
    fd = _open_checked(path, nbytes + trailer, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        whole = nbytes - nbytes % PAGE
        if direct and checksum and whole > CHECKED_PIECE:
            with aio.context() as ctx:
                if ctx is not None:
                    crc = _read_queued_checked(ctx, fd, out, path)
                    stored = _read_direct(fd, out, path, trailer, start=whole)
                    _check_crc(path, stored, crc32c_extend(crc, out[whole:]))
                    return
        if direct:
            stored = _read_direct(fd, out, path, trailer)
        else:
            _read_range(fd, out, path, 0, nbytes, nbytes + trailer, direct=False)
            stored = os.pread(fd, trailer, nbytes) if trailer else b""
            if len(stored) != trailer:
                raise _shrank(path, nbytes + len(stored), nbytes + trailer)
        if checksum:
            check_crc(path, stored, out)
    finally:
        os.close(fd)


def check_crc(path: Path, stored: bytes, data: torch.Tensor) -> None:
    """StoreCorruptError unless ``stored`` (a chunk file's trailer) is the CRC-32C of
    ``data`` (its bytes)."""
    _check_crc(path, stored, crc32c_extend(0, data))


def _check_crc(path: Path, stored: bytes, crc: int) -> None:
    if stored != crc.to_bytes(CRC32C_BYTES, "little"):
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
    fd = _open_checked(path, nbytes, os.O_RDONLY)
    try:
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)  # mmap refuses an empty mapping
        mapping = mmap.mmap(fd, nbytes, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return torch.frombuffer(mapping, dtype=torch.uint8)  # keeps ``mapping`` alive
