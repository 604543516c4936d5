"""One chunk file out, at the device's speed (chunk_reads.py reads it back in).

store_format.py decides which files hold what; this module moves the bytes of a 1-D
uint8 CPU tensor into one file on the disk, and says whether a directory takes
O_DIRECT. It starts no threads, takes no module-wide lock and does not import zarr, so
every I/O thread of the cache can call it at once.

Why O_DIRECT: buffered I/O pays a page-cache copy and writeback on the caller's cores
(measured in docs/benchmarks.md, "Why the chunk I/O is built as it is"), and the cache
would only fill the page cache with data it already holds. O_DIRECT moves bytes
straight between the tensor and the device, but then the memory address, file offset
and length of every request must be multiples of the device's logical block size (else
EINVAL): hence the aligned buffers, the staging copies and the last partial page
written buffered. Every write goes to a ``.partial`` name that
is renamed into place, so a reader (or a crash) sees the old file or the whole new one.

Staged pieces are queued with native AIO (aio.py) where the kernel has it: a writer
copies the next piece while the device writes the last ones, instead of leaving the
device without its requests for every copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import aio
from .buffers import PAGE, StagingBuffers, aligned_empty, round_up

__all__ = [
    "check_bytes",
    "direct_io_supported",
    "fsync_directory",
    "fsync_file",
    "publish",
    "write_file",
    "write_partial",
]


def check_bytes(tensor: torch.Tensor, what: str) -> None:
    """TypeError or ValueError unless ``tensor`` is a 1-D contiguous uint8 CPU tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, not {type(tensor).__name__}")
    if tensor.dtype != torch.uint8 or tensor.dim() != 1 or not tensor.is_contiguous():
        raise ValueError(f"{what} must be a 1-D contiguous uint8 tensor (see dtypes.byte_view)")
    if tensor.device.type != "cpu":
        raise ValueError(f"{what} must be on the CPU, not {tensor.device}")


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _open_new(path: Path, flags: int, mode: int) -> int:
    """os.open(O_CREAT | O_EXCL); removes the file if open created it and then failed.

    Kernels before 6.6 create the file on tmpfs and only then refuse O_DIRECT (EINVAL).
    """
    try:
        return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    except OSError as error:
        if error.errno != errno.EEXIST:  # EEXIST: someone else's file; leave it alone
            _unlink_quietly(path)
        raise


def direct_io_supported(directory: str | os.PathLike[str]) -> bool:
    """Whether the filesystem at ``directory`` accepts O_DIRECT I/O.

    Opens, writes and reads back one page in a probe file, then removes it: some
    filesystems accept the open flag and refuse only the I/O. False on EINVAL or
    EOPNOTSUPP; any other error (no such directory, no permission) is raised.
    Note: tmpfs refuses O_DIRECT before Linux 6.6 and accepts it (as a plain copy) since.
    """
    probe = Path(directory) / f".spillcache-direct-probe.{secrets.token_hex(4)}.partial"
    refused = (errno.EINVAL, errno.EOPNOTSUPP)
    try:
        fd = _open_new(probe, os.O_RDWR | os.O_DIRECT, 0o600)
    except OSError as error:
        if error.errno in refused:
            return False
        raise
    try:
        page = aligned_empty(PAGE)
        page.fill_(0xA5)
        view = memoryview(page.numpy())
        try:
            return os.pwrite(fd, view, 0) == PAGE and os.preadv(fd, [view], 0) == PAGE
        except OSError as error:
            if error.errno in refused:
                return False
            raise
    finally:
        os.close(fd)
        _unlink_quietly(probe)


def _pwrite_all(fd: int, view: memoryview, offset: int, *, direct: bool) -> None:
    """pwrite all of ``view`` at ``offset``, looping on short writes."""
    done = 0
    stalls = 0  # writes in a row that ended inside the page they started
    while done < len(view):
        written = os.pwrite(fd, view[done:], offset + done)
        if direct:
            # O_DIRECT can only go on from a page boundary: rewrite a partial page (a
            # write that stopped inside its first page made progress: try it again).
            written -= written % PAGE
            stalls = stalls + 1 if written <= 0 else 0
        if written < 0 or (written == 0 and (not direct or stalls > 3)):
            raise OSError(errno.EIO, f"write made no progress at offset {offset + done}")
        done += written


@contextlib.contextmanager
def _bounce(staging: StagingBuffers | None, nbytes: int) -> Iterator[torch.Tensor]:
    """A staging buffer, or (without one) a temporary aligned buffer of at most 8 MiB."""
    if staging is not None:
        with staging.acquire() as buffer:
            yield buffer
    else:
        yield aligned_empty(min(round_up(nbytes), 8 << 20))


# A staging buffer is cut into this many pieces when writes can be queued (aio): each is
# queued as soon as it is copied, and the thread copies the next while the device writes.
QUEUED_PIECES = 4


def _write_staged(
    fd: int, source: memoryview, whole: int, buffer: torch.Tensor, alongside: Callable[[], object]
) -> None:
    """Write ``source[:whole]`` (whole pages) at offset 0 through the aligned ``buffer``.

    An unaligned source goes through a staging buffer, piece by piece. The copies are
    memoryview assignments (one memcpy on this thread), not Tensor.copy_: torch splits
    copy_ over its intra-op threads, which on a few busy cores is several times slower
    than a plain memcpy. With native AIO the pieces are queued (see
    ``_write_queued``); without it each is written with pwrite before the next is copied.
    ``alongside()`` runs once, while the last writes are in flight where they can be.
    """
    staged = memoryview(buffer.numpy())
    piece = max(PAGE, len(staged) // QUEUED_PIECES // PAGE * PAGE)
    slots = min(len(staged) // piece, aio.DEPTH)
    if whole > piece and slots > 1:
        with aio.context() as ctx:
            if ctx is not None:
                address = buffer.data_ptr()
                _write_queued(ctx, fd, source, whole, staged, piece, slots, address, alongside)
                return
    for offset in range(0, whole, len(staged)):
        nbytes = min(len(staged), whole - offset)
        staged[:nbytes] = source[offset : offset + nbytes]
        _pwrite_all(fd, staged[:nbytes], offset, direct=True)
    alongside()


def _load_fallocate():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


def _allocate(fd: int, nbytes: int) -> None:
    """Give a new, empty file its size, with its blocks allocated in one go where the
    filesystem can (fallocate): one contiguous extent, rather than one allocation per
    queued piece as the writes land (pieces of several writers interleave on disk, and
    such files read back slower: docs/benchmarks.md). Elsewhere a sparse file of that
    size (ftruncate). Running out of space fails here, before any byte is written."""
    if _fallocate is not None:
        if _fallocate(fd, 0, 0, nbytes) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EINTR):
            raise OSError(code, os.strerror(code))
    os.ftruncate(fd, nbytes)


# What follows a chunk's data: its bytes, or a function giving them (a checksum computed
# while the data's writes are in flight).
Trailer = bytes | Callable[[], bytes]


def _finish_queued_write(fd: int, piece: memoryview, offset: int, result: int) -> None:
    """A queued direct write of ``piece`` at ``offset`` came back with ``result`` (bytes
    written, or -errno): an error raises; a short write's rest is written synchronously,
    from the page boundary at or before where it stopped."""
    if result < 0:
        raise OSError(-result, f"write at offset {offset}: {os.strerror(-result)}")
    if result < len(piece):
        resume = result - result % PAGE
        _pwrite_all(fd, piece[resume:], offset + resume, direct=True)


def _resolved(trailer: Trailer) -> bytes:
    """The trailer's bytes, computed now if it is a function."""
    return trailer() if callable(trailer) else trailer


def _write_queued(
    ctx: aio.Context,
    fd: int,
    source: memoryview,
    whole: int,
    staged: memoryview,
    piece: int,
    slots: int,
    address: int,
    alongside: Callable[[], object],
) -> None:
    """Copy a piece into a free slot of ``staged``, queue its write, copy the next...

    The thread keeps up to ``slots`` writes queued while it copies, so the device never
    waits for a memcpy (or for this thread to get a core back). A slot is reused only
    once its write is done; ``aio.context`` waits for writes still queued if this fails.
    Once the last piece is queued, ``alongside()`` runs while the device writes.
    """
    # ext4 makes a direct write past the end of the file wait for its own completion,
    # queued or not (an "extending" write). Sized first, the file takes every piece
    # inside its end.
    _allocate(fd, whole)
    free = list(range(slots))[::-1]
    pieces: dict[int, tuple[int, int]] = {}  # slot -> (file offset, bytes) in flight

    def finished(done: list[tuple[int, int]]) -> None:
        for slot, result in done:
            offset, nbytes = pieces.pop(slot)
            free.append(slot)
            start = slot * piece
            _finish_queued_write(fd, staged[start : start + nbytes], offset, result)

    for offset in range(0, whole, piece):
        if not free:
            finished(ctx.wait(1))
        slot = free.pop()
        nbytes = min(piece, whole - offset)
        start = slot * piece
        staged[start : start + nbytes] = source[offset : offset + nbytes]
        ctx.submit_write(fd, address + start, nbytes, offset, slot)
        pieces[slot] = (offset, nbytes)
    alongside()
    while ctx.in_flight:
        finished(ctx.wait(ctx.in_flight))


# A page-aligned source's whole pages are queued in pieces of this size where native
# AIO is available: the trailer (a checksum) is computed while the device writes them.
IN_PLACE_PIECE = 4 << 20


def _write_in_place(
    fd: int, data: torch.Tensor, whole: int, trailer: Trailer, alongside: Callable[[], object]
) -> Trailer:
    """Write ``data``'s whole pages straight from its memory (page-aligned: no copy).
    Where they can be queued (native AIO, more than one piece) they are, and the
    trailer is computed and ``alongside()`` run while they are written; the trailer
    is returned, computed or still to be."""
    source = memoryview(data.numpy())
    if whole > IN_PLACE_PIECE:
        with aio.context() as ctx:
            if ctx is not None:
                _allocate(fd, whole)  # see _write_queued: no extending writes
                return _write_in_place_queued(ctx, fd, data, whole, trailer, alongside)
    _pwrite_all(fd, source[:whole], 0, direct=True)
    alongside()
    return trailer


def _write_in_place_queued(
    ctx: aio.Context,
    fd: int,
    data: torch.Tensor,
    whole: int,
    trailer: Trailer,
    alongside: Callable[[], object],
) -> bytes:
    source = memoryview(data.numpy())
    address = data.data_ptr()
    pending = list(range(0, whole, IN_PLACE_PIECE))[::-1]  # offsets, the next one last
    queued: dict[int, int] = {}  # offset -> bytes, in flight

    def finished(done: list[tuple[int, int]]) -> None:
        for offset, result in done:
            nbytes = queued.pop(offset)
            _finish_queued_write(fd, source[offset : offset + nbytes], offset, result)

    def queue_more() -> None:
        while pending and len(queued) < aio.DEPTH:
            offset = pending.pop()
            nbytes = min(IN_PLACE_PIECE, whole - offset)
            ctx.submit_write(fd, address + offset, nbytes, offset, offset)
            queued[offset] = nbytes

    queue_more()
    computed = _resolved(trailer)  # while the device writes
    alongside()
    while queued:
        finished(ctx.wait(1))
        queue_more()
    return computed


def _write_direct(
    fd: int,
    data: torch.Tensor,
    staging: StagingBuffers | None,
    trailer: Trailer,
    alongside: Callable[[], object],
) -> None:
    nbytes = data.numel()
    whole = nbytes - nbytes % PAGE
    source = memoryview(data.numpy())
    if data.data_ptr() % PAGE == 0:
        # Zero copy: the whole pages go straight from the tensor's memory to the device.
        trailer = _write_in_place(fd, data, whole, trailer, alongside)
    elif whole:
        with _bounce(staging, whole) as buffer:
            _write_staged(fd, source, whole, buffer, alongside)
    else:
        alongside()
    trailer = _resolved(trailer)
    if whole < nbytes or trailer:
        # The last partial page (and the trailer) is written buffered: clear O_DIRECT on
        # this descriptor and write the < PAGE remaining bytes from the source. The
        # alternative, a zero-padded direct page and ftruncate(nbytes), makes ext4 read
        # that block back from disk (synchronously) to zero its end: one extra disk read
        # per file (docs/benchmarks.md). The one dirty page is flushed by writeback or fsync, and
        # a later O_DIRECT read of the file writes it back first, so readers see it.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        _pwrite_all(fd, memoryview(bytes(source[whole:]) + trailer), whole, direct=False)


def fsync_directory(directory: Path) -> None:
    """fsync a directory: the entries made, renamed or removed in it are durable (a
    file's own fsync does not make its new name durable)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """fsync a file written earlier (and closed): its bytes and size are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(
    path: Path,
    data: torch.Tensor,
    *,
    direct: bool,
    staging: StagingBuffers | None,
    durable: bool = False,
    trailer: Trailer = b"",
    alongside: Callable[[], object] = lambda: None,
) -> None:
    """Write the bytes of ``data`` (1-D contiguous uint8, CPU), then ``trailer`` (a
    checksum, say; or a function returning it, called once, while the data's writes are
    in flight where they are queued), to ``path`` atomically.

    The bytes go to ``<name>.<random>.partial`` beside ``path`` and are renamed into
    place; on any error the partial file is removed, ``path`` keeps what it held, and
    the error propagates. ``direct`` uses O_DIRECT (see direct_io_supported); a source
    that is not PAGE-aligned is copied through a ``staging`` buffer (a temporary one if
    None). ``durable`` fsyncs the file before the rename and the directory after it.

    ``alongside()`` is called once before the rename, while the data's last writes are
    still in flight where they are queued (direct writes of a staged source with native
    AIO), else after them: other work (another file's metadata) then costs the device
    no idle time. An error it raises fails the write like any other.
    """
    check_bytes(data, "data")
    path = Path(path)
    partial = path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial")
    fd = _open_new(partial, os.O_WRONLY | (os.O_DIRECT if direct else 0), 0o666)
    try:
        try:
            if direct:
                _write_direct(fd, data, staging, trailer, alongside)
            else:
                _pwrite_all(fd, memoryview(data.numpy()), 0, direct=False)
                _pwrite_all(fd, memoryview(_resolved(trailer)), data.numel(), direct=False)
                alongside()
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except BaseException:
        _unlink_quietly(partial)
        raise
    if durable:
        fsync_directory(path.parent)


def write_partial(path: Path, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` (buffered) under a new ``<name>.<random>.partial`` beside ``path``
    and return that name, for ``publish`` to rename into place later (a file that must
    appear only after another one). On error nothing is left behind."""
    path = Path(path)
    partial = path.with_name(f"{path.name}.{secrets.token_hex(4)}.partial")
    fd = _open_new(partial, os.O_WRONLY, 0o666)
    try:
        try:
            _pwrite_all(fd, memoryview(data), 0, direct=False)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(partial)
        raise
    return partial


def publish(partial: Path, path: Path, *, durable: bool = False) -> None:
    """Rename a ``write_partial`` file into place (then fsync its directory if ``durable``);
    on error the partial file is removed."""
    try:
        os.replace(partial, path)
    except BaseException:
        _unlink_quietly(partial)
        raise
    if durable:
        fsync_directory(Path(path).parent)
