"""The pool's host memory: one region of ``host_bytes``, cut into slots.

Every value a pool holds in host RAM lives in a slot of its ``Arena``: values of the
host tier, values waiting for their disk write, values read back from disk, the copy
an ``update`` makes of the caller's tensor. The region is mapped once, on first use
(private, page-aligned, advised for transparent huge pages; registered as pinned memory
once where CUDA is available), so the process's resident memory for values is bounded
by the region, whatever glibc or torch's allocators would keep; and every slot of a
page or more starts on a page, so O_DIRECT reads and writes go straight to and from it,
with no staging copy (a smaller value is all last partial page, written and read
buffered: its slot is cut at 64 bytes).

A slot is a tensor with a storage of its own over its part of the region. It is
handed out once and goes back to the free list when the last tensor over it dies
(the cache's, the caller's, a view's, a numpy array's): a finalizer on the buffer
object its storage holds, so "nobody holds it" is exact and immediate, not polled.

Allocation is first-fit from the lowest address, free neighbours coalesced: a run's
values are mostly a few sizes per key, so the touched part of the region stays low.

When no hole fits, ``take`` waits while slots are expected back (writes in flight,
``expect_return``), else hands out ordinary memory outside the region (an *overflow*:
counted, and warned about once per pool, naming what holds the region). Overflow is
how the arena never deadlocks on memory only the caller can give back.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import ctypes
import mmap
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..dtypes import raw_dtype
from ..text import format_bytes
from .buffers import (
    HUGE_PAGE,
    PAGE,
    STAGING_BYTES,
    BufferPool,
    StagingBuffers,
    aligned_empty,
    heap_moved,
    round_up,
)

__all__ = ["Arena", "SharedBuffers", "slot_size"]

# Slots of values under a page are cut at this granularity, anywhere: their chunk's
# bytes are all in its last partial page, which is written and read buffered, so they
# need no page alignment (and a page each would fill a region with a few bytes each).
SMALL_ALIGNMENT = 64


def slot_size(nbytes: int) -> int:
    """A slot's size for a value of ``nbytes``: whole pages from a page up, else
    64-byte steps."""
    if nbytes < PAGE:
        return -(-nbytes // SMALL_ALIGNMENT) * SMALL_ALIGNMENT
    return round_up(nbytes)


def _alignment(size: int) -> int:
    return PAGE if size >= PAGE else SMALL_ALIGNMENT


# One buffer class per slot size: ctypes array types cannot carry a finalizer
# (no weak references), Python subclasses of them can. A run has few sizes.
_slot_types: dict[int, type] = {}
_SLOT_TYPES_KEPT = 4096


def _slot_type(nbytes: int) -> type:
    kind = _slot_types.get(nbytes)
    if kind is None:
        if len(_slot_types) >= _SLOT_TYPES_KEPT:
            _slot_types.clear()
        kind = type("Slot", (ctypes.c_char * nbytes,), {})
        _slot_types[nbytes] = kind
    return kind


class Arena:
    """``capacity`` bytes of host memory, handed out in page-aligned slots.

    Thread-safe. Its lock is a leaf: nothing else is locked while it is held, so any
    thread (one holding the pool's lock included) may take or return a slot.

    :param capacity: the region's size (rounded down to a page); 0: no region, every
        ``take`` is ordinary memory (not counted as overflow)
    :param pin: register the region as pinned memory (CUDA available)
    :param describe: what holds the region, for the overflow warning (no lock needed)
    """

    def __init__(
        self, capacity: int, *, pin: bool = False, describe: Callable[[], str] | None = None
    ) -> None:
        self.capacity = capacity - capacity % PAGE
        self.pin = pin
        self._describe = describe
        # Reentrant: a finalizer may return a slot on a thread already inside the lock
        # (the collector runs anywhere); _busy makes it leave the free list alone then.
        self._condition = threading.Condition(threading.RLock())
        self._busy = False
        self._returned: collections.deque[tuple[int, int]] = collections.deque()
        self._mapping: mmap.mmap | None = None
        self._address = 0
        self._free: list[list[int]] = []  # [offset, size], sorted by offset, coalesced
        self._expected = 0  # slots that writes in flight will give back
        self._registered = False
        self._closed = False
        self.used = 0
        self.peak = 0
        self.slots = 0
        self.taken = 0
        self.waits = 0
        self.overflows = 0
        self.overflow_bytes = 0
        self.short_bytes = 0  # overflows of values the region could have held
        self.fragmented = 0  # takes no hole fitted though the free bytes would have
        self.worst_fragmentation = 0.0
        self._warned = False
        # Overflow buffers alive, by address: each is already a copy (``made``). An
        # entry goes when its buffer dies, so a later tensor at that address is not one.
        self._outside: dict[int, int] = {}
        self._closed_region: Callable[[], mmap.mmap | None] = lambda: None  # see close

    # ------------------------------------------------------------- region

    def _map(self) -> None:
        """The region, mapped on first use (lock held)."""
        # Private: Python's anonymous maps are MAP_SHARED (shmem) by default, which gets
        # no transparent huge pages. HUGE_PAGE of slack aligns the start.
        mapping = mmap.mmap(
            -1, self.capacity + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        )
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        offset = -address % HUGE_PAGE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE, offset, self.capacity - self.capacity % HUGE_PAGE)
        self._mapping = mapping
        self._address = address + offset  # the region's first byte
        self._free = [[offset, self.capacity]]
        if self.pin:
            self._register()

    def _register(self) -> None:
        """Pin the region once, so that copies to and from accelerators are asynchronous
        and no value needs a pinned block of torch's own."""
        result = torch.cuda.cudart().cudaHostRegister(self._address, self.capacity, 0)
        if int(result) != 0:
            warnings.warn(
                f"spillcache could not pin its {format_bytes(self.capacity)} of host memory "
                f"(cudaHostRegister returned {int(result)}): copies to and from the GPU are "
                "synchronous; lower host_bytes or raise the locked-memory limit (ulimit -l)",
                stacklevel=2,
            )
            return
        self._registered = True

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a whole slot of this arena (a CPU tensor over its slot's
        storage from its first byte, contiguous): storing it needs no copy."""
        if self._mapping is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return False
        storage = tensor.untyped_storage()
        start = storage.data_ptr() - self._address
        return (
            0 <= start < self.capacity
            and tensor.storage_offset() == 0
            and storage.nbytes() == slot_size(tensor.nbytes)
        )

    def made(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` is a whole slot or a whole overflow buffer of this arena:
        a copy it made already, which storing needs no second one of."""
        if self.holds(tensor):
            return True
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            return False
        storage = tensor.untyped_storage()
        with self._condition:
            size = self._outside.get(storage.data_ptr())
        return size == storage.nbytes() == slot_size(tensor.nbytes) and tensor.storage_offset() == 0

    @property
    def mapped(self) -> bool:
        return self._mapping is not None

    @property
    def registered(self) -> bool:
        """Whether the region is pinned (registered with CUDA)."""
        return self._registered

    # --------------------------------------------------------------- take

    def take(self, nbytes: int, *, pin: bool = False, wait: bool = False) -> torch.Tensor:
        """A 1-D uint8 tensor of ``nbytes`` (on a page from a page up, ``slot_size``),
        in a slot if one fits.

        With ``wait``, waits while no hole fits and writes in flight will give slots
        back; otherwise (and once none will) the memory is ordinary (an overflow).
        Never waits while the caller could be the one holding what would free room.
        ``pin`` (a read for an accelerator) matters only outside the region, which is
        pinned as a whole where CUDA is available.
        """
        if nbytes <= 0:
            return torch.empty(0, dtype=torch.uint8)
        size = slot_size(nbytes)
        if size > self.capacity:  # no region can hold it: outside, and no shortage
            return self._overflow(nbytes, size, pin, short=False)
        with self._condition:
            if self._closed:
                raise RuntimeError("the pool's arena was used after the pool closed")
            if self._mapping is None:
                self._map()
            offset = self._carve(size)
            if offset is None:
                self._note_fragmentation(size)
            while offset is None and wait and self._expected > 0:
                if not self._returned:  # else one came back during _carve: carve again
                    self.waits += 1
                    self._condition.notify_all()  # for whoever watches the waits count
                    self._condition.wait()  # a slot came back, or a write in flight ended
                offset = self._carve(size)
            if offset is not None:
                self.used += size
                self.peak = max(self.peak, self.used)
                self.slots += 1
                self.taken += 1
                slot = _slot_type(size).from_buffer(self._mapping, offset)
        if offset is None:
            return self._overflow(nbytes, size, pin)
        # Not at exit: weakref runs pending finalizers newest first, so a slot still held
        # would be freed before an older one (a cache's close) that may take it again.
        weakref.finalize(slot, self._give_back, offset, size).atexit = False
        # The caller's own tensors come and go at this pace too (values copied in and
        # freed, values compared with what was read): see buffers.heap_moved.
        heap_moved(size)
        return torch.frombuffer(slot, dtype=torch.uint8)[:nbytes]

    def take_like(
        self, tensor: torch.Tensor, *, pin: bool = False, wait: bool = True
    ) -> torch.Tensor:
        """A slot for ``tensor``'s bytes, shaped as it and typed as its same-width raw
        dtype (copies into it are bit-exact for every dtype; see ``take``)."""
        taken = self.take(tensor.nbytes, pin=pin, wait=wait)
        return taken.view(raw_dtype(tensor.dtype)).view(tensor.shape)

    def copy_in(self, tensor: torch.Tensor, *, wait: bool = True) -> torch.Tensor:
        """A CPU tensor with ``tensor``'s shape, dtype and bits, in a slot (see ``take``)."""
        out = self.take_like(tensor, wait=wait)
        out.copy_(tensor.view(raw_dtype(tensor.dtype)))
        return out.view(tensor.dtype)

    def _carve(self, size: int) -> int | None:
        """First fit (lock held): the lowest hole with ``size`` bytes from an offset
        aligned as a slot of that size must be (``_alignment``), or None. What the
        alignment skips stays a hole of its own."""
        align = _alignment(size)
        self._busy = True
        try:
            self._coalesce_returned()
            for index, (offset, hole) in enumerate(self._free):
                # Offsets are the mapping's, which starts on a page: aligned alike.
                start = -(-offset // align) * align
                if start + size > offset + hole:
                    continue
                rest = [[start + size, offset + hole - start - size]]
                before = [[offset, start - offset]]
                self._free[index : index + 1] = [piece for piece in before + rest if piece[1] > 0]
                return start
            return None
        finally:
            self._busy = False

    def _note_fragmentation(self, size: int) -> None:
        """No hole fits ``size`` (lock held): if the free bytes would, that is
        fragmentation; its worst (1 - largest hole / free bytes) is kept."""
        free = self.capacity - self.used
        if free >= size:
            largest = max((hole for _, hole in self._free), default=0)
            self.fragmented += 1
            self.worst_fragmentation = max(self.worst_fragmentation, 1 - largest / free)

    def _overflow(self, nbytes: int, size: int, pin: bool, short: bool = True) -> torch.Tensor:
        """Ordinary memory outside the region: counted, and warned about once."""
        pin = pin and torch.cuda.is_available()
        if self.capacity == 0:  # no region was asked for (host_bytes = 0)
            return aligned_empty(nbytes, pin=pin)
        with self._condition:
            self.overflows += 1
            self.overflow_bytes += size
            self.short_bytes += size if short else 0  # the region was short of room
            warn, self._warned = not self._warned, True
            used = self.used
        if warn:
            held = f" ({self._describe()})" if self._describe is not None else ""
            warnings.warn(
                f"spillcache's host memory ({format_bytes(self.capacity)}, host_bytes) has "
                f"no room for a value of {format_bytes(nbytes)}: {format_bytes(used)} is in "
                f"slots{held}, so it was put in memory outside host_bytes. Tensors returned "
                "by fetch keep their slot until dropped: drop them sooner, or raise "
                "host_bytes (stats()['pool']['arena'] counts these overflows)",
                stacklevel=4,
            )
        raw = aligned_empty(nbytes, pin=pin)
        # A buffer over raw's bytes (slot_size of them: raw runs on to the next page)
        # whose finalizer says exactly when the last tensor over them dies, as a slot's
        # does; raw itself may be torch's, with no such hook.
        holder = _slot_type(size).from_address(address := raw.data_ptr())
        holder.owner = raw
        with self._condition:
            self._outside[address] = size
        weakref.finalize(holder, self._forget_outside, address).atexit = False
        return torch.frombuffer(holder, dtype=torch.uint8)[:nbytes]

    def _forget_outside(self, address: int) -> None:
        """An overflow buffer died (any thread): a tensor at its address is no copy of ours."""
        with self._condition:
            self._outside.pop(address, None)

    # -------------------------------------------------------------- return

    def _give_back(self, offset: int, size: int) -> None:
        """A slot's last holder died (any thread, any lock held): back to the free list,
        or, the arena closed, its pages back to the system (its buffer still maps them)."""
        self._returned.append((offset, size))
        with self._condition:
            if not self._busy:
                self._take_back_returned()
                self._condition.notify_all()
            closed = self._closed
        if closed:
            self._drop_pages(self._closed_region(), [(offset, size)])

    def _take_back_returned(self) -> None:
        """Every returned slot back in the free list (lock held), unless this thread is
        in the middle of changing it (a finalizer run by the collector in there)."""
        if self._busy:
            return
        self._busy = True
        try:
            self._coalesce_returned()
        finally:
            self._busy = False

    def _coalesce_returned(self) -> None:
        while self._returned:
            offset, size = self._returned.popleft()
            self.used -= size
            self.slots -= 1
            if self._closed:
                if self.slots == 0:
                    self._unregister()
                continue
            index = bisect.bisect_left(self._free, [offset, 0])
            after = self._free[index] if index < len(self._free) else None
            before = self._free[index - 1] if index > 0 else None
            if before is not None and before[0] + before[1] == offset:
                before[1] += size
                if after is not None and offset + size == after[0]:
                    before[1] += after[1]
                    del self._free[index]
            elif after is not None and offset + size == after[0]:
                after[0] = offset
                after[1] += size
            else:
                self._free.insert(index, [offset, size])

    def expect_return(self, count: int = 1) -> None:
        """``count`` more slots will come back without the caller's help (a write queued)."""
        with self._condition:
            self._expected += count

    def returned_expected(self, count: int = 1) -> None:
        """A write that ``expect_return`` announced is over (its slot may be held still)."""
        with self._condition:
            self._expected -= count
            self._condition.notify_all()

    # ------------------------------------------------------------- reports

    def largest_hole(self) -> int:
        with self._condition:
            self._take_back_returned()
            if self._mapping is None:
                return self.capacity
            return max((hole for _, hole in self._free), default=0)

    def fragmentation(self) -> float:
        """1 - largest hole / free bytes: 0 when all free room is one hole."""
        with self._condition:
            self._take_back_returned()
            free = self.capacity - self.used
            largest = (
                self.capacity
                if self._mapping is None
                else max((hole for _, hole in self._free), default=0)
            )
        return 0.0 if free <= 0 else 1 - largest / free

    def stats(self) -> dict[str, Any]:
        with self._condition:
            self._take_back_returned()
            return {
                "capacity": self.capacity,
                "bytes": self.used,
                "peak_bytes": self.peak,
                "slots": self.slots,
                "pinned": self._registered,
                "waits": self.waits,
                "overflows": self.overflows,
                "overflow_bytes": self.overflow_bytes,
                "fragmented_takes": self.fragmented,
                "worst_fragmentation": self.worst_fragmentation,
            }

    def _unregister(self) -> None:
        """Unpin the region (lock held), before it can be unmapped."""
        if self._registered:
            self._registered = False
            torch.cuda.cudart().cudaHostUnregister(self._address)

    def close(self) -> None:
        """No more slots. The region is unmapped once every slot handed out has died
        (each holds the mapping), and unpinned just before; until then only the pages
        of slots still held stay resident (the free ones are given back now, the
        others as their slots die), so a tensor a caller keeps keeps its own bytes,
        not the region, while the next pool maps its own."""
        with self._condition:
            self._take_back_returned()  # into the free list, whose pages go back below
            self._closed = True
            mapping, self._mapping = self._mapping, None
            free, self._free = self._free, []
            if mapping is not None:
                self._closed_region = weakref.ref(mapping)
            if self.slots == 0:
                self._unregister()
                if mapping is not None:
                    # A slot whose finalizer ran on another thread may not have let go of
                    # its buffer yet: the mapping is then unmapped when it does.
                    with contextlib.suppress(BufferError):
                        mapping.close()
                free = []
            self._condition.notify_all()
        self._drop_pages(mapping, free)  # not under the lock: it may take milliseconds

    def _drop_pages(self, mapping: mmap.mmap | None, ranges: list) -> None:
        """The whole pages of ``ranges`` (offsets in ``mapping``) given back to the
        system: nothing uses them again, and a private mapping's pages read as zeros
        if touched. Not where the region is pinned: the driver keeps pinned pages
        until it is unpinned, with the last slot."""
        if mapping is None or self._registered or not hasattr(mmap, "MADV_DONTNEED"):
            return
        for offset, size in ranges:
            start, end = -(-offset // PAGE) * PAGE, (offset + size) // PAGE * PAGE
            if end > start:
                with contextlib.suppress(ValueError, OSError):  # unmapped meanwhile
                    mapping.madvise(mmap.MADV_DONTNEED, start, end - start)


class SharedBuffers:
    """Buffers that the stores of several caches share: where reads land (the pool's
    arena, or without one a read-buffer pool), and one set of staging buffers for
    direct writes of unaligned tensors (made when a store first needs them).
    Thread-safe; ``close`` frees them once no store uses them."""

    def __init__(self, read_buffer_bytes: int, arena: Arena | None = None) -> None:
        # Reads land in the pool's arena where it has one (host_bytes > 0).
        self.reads: BufferPool | Arena = (
            arena if arena is not None and arena.capacity else BufferPool(read_buffer_bytes)
        )
        self._lock = threading.Lock()
        self._staging: StagingBuffers | None = None

    def staging(self, writers: int) -> StagingBuffers:
        with self._lock:
            if self._staging is None:
                self._staging = StagingBuffers(writers, STAGING_BYTES)
            return self._staging

    def close(self) -> None:
        with self._lock:
            staging, self._staging = self._staging, None
        if staging is not None:
            staging.close()
        if isinstance(self.reads, BufferPool):
            self.reads.clear()
