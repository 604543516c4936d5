"""Linux native AIO (``io_submit``): requests that stay queued while their thread works.

chunkio writes an unaligned tensor through page-aligned staging memory, one piece at a
time. With ``pwrite`` the thread has nothing queued at the device while it copies the
next piece (or waits for a core); with ``io_submit`` it queues each piece as soon as it
is copied and copies the next while the device writes, so one writer keeps several
requests queued all the time; a page-aligned value is queued in pieces straight from
its memory while its checksum is computed. Reads do not use it (chunk_reads.py reads a
chunk in one ``preadv``, in its device's turn). This module is only the system-call
binding: no threads, no locks, no knowledge of files or formats.

Two costs shape it. ``io_destroy`` waits for an RCU grace period (longer than a whole
chunk write; docs/benchmarks.md), so a context is never made per write: ``context()``
lends one from a process-wide free list and takes it back, and a process holds at most
as many contexts as it ever had writers at once. And a context does not survive ``fork`` (the
child's are invalid), so the child forgets the list.

Where native AIO is missing (not Linux on x86_64 or aarch64, a seccomp filter that
refuses it, ``fs.aio-max-nr`` used up), ``context()`` lends None and the caller writes
synchronously; nothing else changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
from collections.abc import Iterator

__all__ = ["DEPTH", "Context", "available", "context"]

DEPTH = 8  # requests one context can have queued

# System call numbers (the generic table for aarch64).
_NUMBERS = {
    "x86_64": {"setup": 206, "destroy": 207, "getevents": 208, "submit": 209},
    "aarch64": {"setup": 0, "destroy": 1, "submit": 2, "getevents": 4},
}
_PWRITE = 1  # IOCB_CMD_PWRITE


class _Iocb(ctypes.Structure):
    """struct iocb (linux/aio_abi.h), little-endian field order."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _Event(ctypes.Structure):
    """struct io_event."""

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


def _load_syscall():
    numbers = _NUMBERS.get(platform.machine())
    if numbers is None or not platform.system() == "Linux":
        return None, {}
    try:
        function = ctypes.CDLL(None, use_errno=True).syscall  # a foreign call: drops the GIL
    except (OSError, AttributeError):
        return None, {}
    function.restype = ctypes.c_long
    return function, numbers


_syscall, _NR = _load_syscall()


def _call(name: str, *args) -> int:
    while True:
        result = _syscall(ctypes.c_long(_NR[name]), *args)
        if result >= 0:
            return result
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, f"{name}: {os.strerror(code)}")


class Context:
    """One kernel AIO context with at most ``DEPTH`` requests queued.

    ``submit_write`` queues a write of memory the caller keeps alive and unchanged until
    its completion comes back from ``wait``; ``drain`` waits for every queued request (an
    error path must call it before it lets the memory go).
    """

    def __init__(self) -> None:
        self._id = ctypes.c_ulong(0)
        _call("setup", ctypes.c_uint(DEPTH), ctypes.byref(self._id))
        self._pid = os.getpid()
        self._blocks = [_Iocb() for _ in range(DEPTH)]
        self._free = list(range(DEPTH))
        self._tags: dict[int, int] = {}  # block index -> caller's tag
        self._events = (_Event * DEPTH)()
        self._pointer = (ctypes.POINTER(_Iocb) * 1)()

    @property
    def in_flight(self) -> int:
        return len(self._tags)

    def submit_write(self, fd: int, address: int, nbytes: int, offset: int, tag: int) -> None:
        """Queue ``pwrite(fd, <nbytes at address>, offset)``; ``tag`` comes back with it."""
        self._submit(_PWRITE, fd, address, nbytes, offset, tag)

    def _submit(
        self, opcode: int, fd: int, address: int, nbytes: int, offset: int, tag: int
    ) -> None:
        if not self._free:
            raise RuntimeError(f"an AIO context holds at most {DEPTH} requests in flight")
        index = self._free.pop()
        block = self._blocks[index]
        ctypes.memset(ctypes.addressof(block), 0, ctypes.sizeof(block))
        block.aio_data = index
        block.aio_lio_opcode = opcode
        block.aio_fildes = fd
        block.aio_buf = address
        block.aio_nbytes = nbytes
        block.aio_offset = offset
        self._pointer[0] = ctypes.pointer(block)
        try:
            _call("submit", self._id, ctypes.c_long(1), self._pointer)
        except BaseException:
            self._free.append(index)
            raise
        self._tags[index] = tag

    def wait(self, least: int = 1) -> list[tuple[int, int]]:
        """Wait until at least ``least`` queued requests are done (all of them, if fewer are
        queued); ``(tag, result)`` for each done: bytes written, or ``-errno``."""
        least = min(least, len(self._tags))
        if least == 0:
            return []
        count = _call(
            "getevents",
            self._id,
            ctypes.c_long(least),
            ctypes.c_long(DEPTH),
            self._events,
            None,
        )
        done = []
        for event in self._events[:count]:
            index = event.data
            done.append((self._tags.pop(index), event.res))
            self._free.append(index)
        return done

    def drain(self) -> None:
        """Wait for every queued write, whatever its result."""
        while self._tags:
            self.wait(len(self._tags))

    def destroy(self) -> None:
        """Free the kernel context (io_destroy waits for writes still queued)."""
        if self._pid == os.getpid():
            with contextlib.suppress(OSError):
                _call("destroy", self._id)
        self._tags.clear()


_idle: list[Context] = []  # list.pop and list.append are atomic: no lock needed
_refused = False  # native AIO refused for good (ENOSYS, EPERM): stop asking


def _forget_after_fork() -> None:
    _idle.clear()  # the parent's contexts mean nothing in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def available() -> bool:
    """Whether ``context()`` can lend contexts here (as far as is known yet)."""
    return _syscall is not None and not _refused


@contextlib.contextmanager
def context() -> Iterator[Context | None]:
    """``with aio.context() as ctx:`` an idle Context, or None without native AIO.

    The context goes back to the free list with nothing queued: if the block ends with
    writes still queued (an error), they are waited for first.
    """
    global _refused
    ctx = None
    if available():
        try:
            ctx = _idle.pop()
        except IndexError:
            try:
                ctx = Context()
            except OSError as error:
                if error.errno in (errno.ENOSYS, errno.EPERM, errno.EACCES):
                    _refused = True
                ctx = None  # EAGAIN (aio-max-nr) and the like: this write goes without
    try:
        yield ctx
    except BaseException as error:
        if ctx is not None:
            _lend_again_when_drained(ctx, failed=error)
        raise
    if ctx is not None:
        _lend_again_when_drained(ctx)


def _lend_again_when_drained(ctx: Context, failed: BaseException | None = None) -> None:
    """Back to the free list once nothing is queued; destroyed if waiting fails. Where
    the block already ``failed``, that error is kept (a later one is only noted on it)."""
    try:
        ctx.drain()
    except BaseException as error:
        ctx.destroy()  # waits for whatever is still queued; the context is gone
        if failed is None:
            raise
        # The block's error names the cause (its errno: ENOSPC is a full disk, a
        # DiskFullError); one from waiting afterwards must not take its place.
        failed.add_note(f"then waiting for its queued writes failed: {error!r}")
        return
    _idle.append(ctx)
