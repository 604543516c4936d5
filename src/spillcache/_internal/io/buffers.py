"""Page-aligned host memory for disk I/O: reusable read buffers (``BufferPool``) and
staging buffers for direct writes (``StagingBuffers``); and glibc's heap, kept from
holding on to the tensors the caller frees (``heap_moved``).

Every value read back from disk needs host memory. Taking it fresh each time costs
twice on VMs: touching new pages can be slower than the disk (memory idle for a while
is handed back to the hypervisor; docs/benchmarks.md), and glibc keeps freed blocks of
this size in its heaps, so the process's RSS drifts far above what the cache holds. A
``BufferPool`` keeps a bounded set of blocks instead and hands one out again once
nobody holds it: no tensor made from it (the caller's value, a view of it, a numpy
array over it, the host tier's copy) is alive any more.

"Nobody holds it" is read from the storage's reference count, which torch exposes
only privately (``torch._C._storage_Use_Count``); where it is missing, the pool
allocates every time and recycles nothing, which is slower but still correct.

The heap. Once ``update`` has copied a value into a slot of the pool's arena, the
caller's tensor is freed as soon as the caller drops it; but glibc (once its mmap
threshold has risen after the first large free) serves large blocks from its heap, and
a freed tensor that lies below a live small block (a slot's tensor object, say) is
never given back, nor taken again: torch asks for 64-byte-aligned blocks, which need a
little more than the block freed. The heap then grows by about one value per update,
and RSS with it (docs/benchmarks.md, "Host memory"). So after every ``HEAP_CHECK_EVERY``
bytes of slots handed out (values copied in, values read back: the program's own
tensors come and go at that pace), the heap's free bytes below its top are read
(``mallinfo2``), and where they pass ``HEAP_STRANDED_LIMIT`` they are given back to the
system (``malloc_trim``: the pages of free blocks, which stay free blocks). This costs
nothing where the heap does not grow, unlike setting glibc's mmap threshold low, which
makes every large allocation of the program fresh pages. Outside glibc (or before 2.33,
without ``mallinfo2``) nothing is done.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
import threading
from collections.abc import Iterator

import torch

__all__ = [
    "HEAP_CHECK_EVERY",
    "HEAP_STRANDED_LIMIT",
    "HUGE_PAGE",
    "PAGE",
    "STAGING_BYTES",
    "BufferPool",
    "StagingBuffers",
    "aligned_empty",
    "heap_moved",
    "heap_trims",
    "round_up",
]

# O_DIRECT alignment. Logical block sizes are 512 B (this virtio disk, most NVMe
# namespaces as shipped) or 4 KiB (NVMe formatted with 4K LBAs); both divide 4096, so a
# page-aligned request satisfies every one of them. 4096 is also ext4's block size: a
# direct write that covers whole filesystem blocks needs no read-modify-write of a
# partial block and no exclusive inode lock (ext4 takes one for "unaligned" DIO).
# Python 3.11 has no statx(STATX_DIOALIGN) to ask the exact figure, and one constant
# that is always enough keeps every path testable.
PAGE = 4096


def round_up(nbytes: int) -> int:
    return -(-nbytes // PAGE) * PAGE


HUGE_PAGE = 2 * 2**20


def aligned_empty(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A 1-D uint8 CPU tensor of ``nbytes`` whose address is a multiple of PAGE.

    The storage runs on to (at least) the next PAGE multiple past the end, so a
    whole-page O_DIRECT read into it never touches memory it does not own.

    From 2 MiB up (and not pinned) the memory is its own anonymous mapping, aligned to
    and advised for transparent huge pages. O_DIRECT speed here follows the physical
    contiguity of the buffer (a virtio request takes at most 254 contiguous runs, up to
    4 MiB): 4 KiB pages from fragmented free lists cap the request size, 2 MiB pages
    reach 4 MiB requests (figures: docs/benchmarks.md).
    Where huge pages are off, the advice is ignored and the buffer is merely slower.
    The mapping is returned to the system when the tensor is freed (no malloc arena
    keeps it). Smaller or pinned buffers come from torch's allocator, over-allocated
    by a page and sliced (it only promises 64-byte alignment).
    """
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    if pin and not torch.cuda.is_available():
        raise RuntimeError(
            "pin=True needs CUDA (pinned memory only helps GPU copies); pass pin=False"
        )
    if pin or nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        raw = torch.empty(round_up(nbytes) + PAGE, dtype=torch.uint8, pin_memory=pin)
        offset = -raw.data_ptr() % PAGE
        return raw[offset : offset + nbytes]
    # Private: Python's default for anonymous maps is MAP_SHARED, which is shmem, where
    # huge pages follow shmem_enabled (usually "never"). HUGE_PAGE of slack aligns the start.
    mapping = mmap.mmap(
        -1, round_up(nbytes) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    )
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # keeps the mapping alive
    offset = -raw.data_ptr() % HUGE_PAGE
    # Only whole huge pages inside the buffer: a touched tail must not cost 2 MiB.
    mapping.madvise(mmap.MADV_HUGEPAGE, offset, nbytes - nbytes % HUGE_PAGE)
    return raw[offset : offset + nbytes]


class StagingBuffers:
    """A fixed set of page-aligned buffers, allocated and touched once, reused forever.

    On VMs memory left idle is handed back to the host, and touching fresh pages can be
    slower than the disk (docs/benchmarks.md). So the buffers are written once here
    (every page becomes resident) and then only ever reused. Thread-safe: ``acquire``
    waits on a Condition (no polling) until another thread releases a buffer.
    """

    def __init__(self, count: int, size: int, *, pin: bool = False) -> None:
        if count < 1 or size < 1:
            raise ValueError(f"StagingBuffers needs count >= 1 and size >= 1, got {count}, {size}")
        self.count = count
        self.size = round_up(size)
        block = aligned_empty(self.count * self.size, pin=pin)
        # Touch every page now, not on the first (timed) write. One thread, in order
        # (numpy's fill, not torch's 2-thread fill_, which interleaves pages from two
        # CPUs' free lists): O_DIRECT speed here follows the buffer's physical contiguity,
        # as a virtio request holds at most 254 contiguous runs (max_segments). Scattered
        # 4 KiB pages cap requests near 1 MiB, contiguous memory reaches 4 MiB (figures:
        # docs/benchmarks.md). Memory taken just after the page cache was
        # dropped is the most scattered: create staging buffers early and keep them.
        block.numpy().fill(0)
        # A stack: the buffer released last is handed out next, while its pages are warm.
        self._free = [block[i * self.size : (i + 1) * self.size] for i in range(count)][::-1]
        self._condition = threading.Condition()
        self._closed = False

    @property
    def available(self) -> int:
        """How many buffers are free right now."""
        with self._condition:
            return len(self._free)

    @contextlib.contextmanager
    def acquire(self) -> Iterator[torch.Tensor]:
        """``with staging.acquire() as buf:`` a free buffer of ``size`` bytes, waiting if none."""
        with self._condition:
            while not self._free and not self._closed:
                self._condition.wait()
            if self._closed:
                raise RuntimeError("StagingBuffers used after close()")
            buffer = self._free.pop()
        try:
            yield buffer
        finally:
            with self._condition:
                if not self._closed:
                    self._free.append(buffer)
                self._condition.notify()

    def close(self) -> None:
        """Drop the buffers; ones still in use are freed when their holders let go."""
        with self._condition:
            self._closed = True
            self._free.clear()
            self._condition.notify_all()

    def __enter__(self) -> StagingBuffers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_use_count = getattr(torch._C, "_storage_Use_Count", None)


class _Block:
    __slots__ = ("tensor", "storage", "idle_holders", "idle_refs")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        # The storage's one Python object, kept: whoever holds the storage from Python
        # (``untyped_storage()``, ``storage()``) holds this object, which owns a single
        # reference to the storage however many hold it, so its own references count too.
        self.storage = tensor.untyped_storage()
        # The counts when only the pool holds it (the pool's own references included).
        self.idle_holders = _use_count(self.storage._cdata)
        self.idle_refs = sys.getrefcount(self.storage)

    @property
    def idle(self) -> bool:
        return (
            _use_count(self.storage._cdata) == self.idle_holders
            and sys.getrefcount(self.storage) == self.idle_refs
        )


class BufferPool:
    """At most ``max_bytes`` of blocks, by exact size (rounded up to a page).

    Blocks are made on demand and kept; ``take`` returns a free one of the right size,
    or a new one, which the pool keeps if it is under ``max_bytes`` (otherwise the
    block is the caller's alone and freed when they drop it). Thread-safe.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes if _use_count is not None else 0
        self._lock = threading.Lock()
        self._blocks: dict[tuple[int, bool], list[_Block]] = {}
        self._bytes = 0
        self.reused = 0
        self.made = 0

    @property
    def nbytes(self) -> int:
        """Bytes of blocks the pool keeps (idle or handed out)."""
        with self._lock:
            return self._bytes

    def take(self, nbytes: int, *, pin: bool = False) -> torch.Tensor:
        """A 1-D uint8 tensor of ``nbytes`` starting on a page boundary (see chunkio)."""
        size = -(-max(nbytes, 1) // PAGE) * PAGE
        key = (size, pin)
        with self._lock:
            for block in self._blocks.get(key, ()):
                if block.idle:
                    self.reused += 1
                    return block.tensor[:nbytes]
            self.made += 1
            keep = self._bytes + size <= self.max_bytes
            if keep:
                self._bytes += size
        try:
            tensor = aligned_empty(size, pin=pin)
            # Touch every page once, on this thread and in order: later reads then land
            # in resident memory, and the block's pages stay as contiguous as they came.
            tensor.numpy().fill(0)
        except BaseException:
            if keep:  # counted for a block never made: else the pool stops keeping blocks
                with self._lock:
                    self._bytes -= size
            raise
        if keep:
            block = _Block(tensor)
            with self._lock:
                self._blocks.setdefault(key, []).append(block)
        return tensor[:nbytes]

    def clear(self) -> None:
        """Forget every block; those still handed out are freed when their holders let go."""
        with self._lock:
            self._blocks.clear()
            self._bytes = 0


STAGING_BYTES = 8 * 2**20  # per buffer: smaller pieces lose the disk's queue depth


# ------------------------------------------------------------------------ heap

HEAP_CHECK_EVERY = 16 * 2**20
HEAP_STRANDED_LIMIT = 32 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _load_glibc():
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    malloc_trim.argtypes = [ctypes.c_size_t]
    return mallinfo2, malloc_trim


_glibc = _load_glibc()
_heap_lock = threading.Lock()
_heap_since_check = 0
heap_trims = 0  # how many times free heap bytes were given back (for tests and reports)


def heap_moved(nbytes: int) -> None:
    """A slot of ``nbytes`` was handed out (any thread): check the heap once enough
    have been since the last check."""
    global _heap_since_check, heap_trims
    if _glibc is None:
        return
    with _heap_lock:
        _heap_since_check += nbytes
        if _heap_since_check < HEAP_CHECK_EVERY:
            return
        _heap_since_check = 0
    mallinfo2, malloc_trim = _glibc
    info = mallinfo2()
    if info.fordblks - info.keepcost > HEAP_STRANDED_LIMIT:  # free, and not at the heap's top
        malloc_trim(0)
        with _heap_lock:
            heap_trims += 1
