"""glibc's heap, kept from holding on to the caller's freed tensors.

Once ``update`` has copied a value into a slot of the pool's arena, the caller's tensor
is freed as soon as the caller drops it; but glibc (once its mmap threshold has risen
after the first large free) serves large blocks from its heap, and a freed tensor that
lies below a live small block (a slot's tensor object, say) is never given back, nor
taken again: torch asks for 64-byte-aligned blocks, which need a little more than the
block freed. The heap then grows by about one value per update, and RSS with it
(docs/benchmarks.md, "Host memory").

So after every ``CHECK_EVERY`` bytes of slots handed out (values copied in, values read
back: the program's own tensors come and go at that pace), the heap's free bytes below its
top are read (``mallinfo2``), and where they pass ``STRANDED_LIMIT`` they are given
back to the system (``malloc_trim``: the pages of free blocks, which stay free blocks).
This costs nothing where the heap does not grow, unlike setting glibc's mmap threshold
low, which makes every large allocation of the program fresh pages. Outside glibc (or
before 2.33, without ``mallinfo2``) nothing is done.
"""

from __future__ import annotations

import ctypes
import threading

__all__ = ["CHECK_EVERY", "STRANDED_LIMIT", "moved", "trims"]

CHECK_EVERY = 16 * 2**20
STRANDED_LIMIT = 32 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _load():
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    malloc_trim.argtypes = [ctypes.c_size_t]
    return mallinfo2, malloc_trim


_glibc = _load()
_lock = threading.Lock()
_since_check = 0
trims = 0  # how many times free heap bytes were given back (for tests and reports)


def moved(nbytes: int) -> None:
    """A slot of ``nbytes`` was handed out (any thread): check the heap once enough
    have been since the last check."""
    global _since_check, trims
    if _glibc is None:
        return
    with _lock:
        _since_check += nbytes
        if _since_check < CHECK_EVERY:
            return
        _since_check = 0
    mallinfo2, malloc_trim = _glibc
    info = mallinfo2()
    if info.fordblks - info.keepcost > STRANDED_LIMIT:  # free, and not at the heap's top
        malloc_trim(0)
        with _lock:
            trims += 1
