"""Reusable, page-aligned host memory for disk reads.

Every value read back from disk needs host memory. Taking it fresh each time costs
twice on these machines: touching new pages runs at a few GB/s (memory idle for a
while is handed back to the hypervisor), and glibc keeps freed blocks of this size in
its heaps, so the process's RSS drifts far above what the cache holds. A ``BufferPool``
keeps a bounded set of blocks instead and hands one out again once nobody holds it:
no tensor made from it (the caller's value, a view of it, a numpy array over it, the
host tier's copy) is alive any more.

"Nobody holds it" is read from the storage's reference count, which torch exposes
only privately (``torch._C._storage_Use_Count``); where it is missing, the pool
allocates every time and recycles nothing, which is slower but still correct.
"""

from __future__ import annotations

import threading

import torch

from . import chunkio

__all__ = ["BufferPool"]

_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _holders(block: torch.Tensor) -> int:
    return _use_count(block.untyped_storage()._cdata)


class _Block:
    __slots__ = ("tensor", "idle_holders")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        # The count when only the pool holds it (the pool's own references included).
        self.idle_holders = _holders(tensor)

    @property
    def idle(self) -> bool:
        return _holders(self.tensor) == self.idle_holders


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
        size = -(-max(nbytes, 1) // chunkio.PAGE) * chunkio.PAGE
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
        tensor = chunkio.aligned_empty(size, pin=pin)
        # Touch every page once, on this thread and in order: later reads then land in
        # resident memory, and the block's pages stay as contiguous as they came.
        tensor.numpy().fill(0)
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
