"""Every copy of a tensor between devices: bit-exact for every dtype, and between host
RAM and accelerators on side streams, so that copies overlap compute.

The plain functions (``move``, ``onload``, ``to_host``, ``compact_copy``) copy through a
same-width unsigned view (``dtypes.raw_dtype``), so dtypes without copy kernels move
too. ``Transfers`` runs them on side streams, with two rules:

- Offload (``update`` of a GPU value): the copy to pinned host memory runs on a side
  stream that first waits for the caller's stream (the value may still be being
  computed), and the caller waits only for that copy's event, not for the whole device.
  The value is then in host memory when ``update`` returns, as llm-compressor expects.
- Onload ahead of use (prefetch): the copy to the device runs on a side stream without
  blocking anybody; the batch comes with ``Ready``, whose ``wait()`` makes the
  *consumer's* stream wait for the copy's event (a GPU-side wait: the CPU goes on) and
  tells the caching allocator that the consumer's stream uses the new tensors.

Without CUDA ``Transfers`` makes the plain copies on the caller's thread.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from .. import dtypes

if TYPE_CHECKING:
    from .arena import Arena

__all__ = [
    "Ready",
    "Transfers",
    "compact_copy",
    "is_compact",
    "move",
    "onload",
    "to_host",
]

CPU = torch.device("cpu")


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(dtypes.raw_dtype(tensor.dtype))


def move(tensor: torch.Tensor, device: torch.device, *, non_blocking: bool = False) -> torch.Tensor:
    """``tensor.to(device)`` for every dtype, bit for bit; the same object if already there."""
    if tensor.device == device:
        return tensor
    moved = _raw(tensor).to(device, non_blocking=non_blocking)
    return moved.view(tensor.dtype)


def onload(tensor: torch.Tensor, device: torch.device, requires_grad: bool) -> torch.Tensor:
    """``tensor`` on ``device`` with the ``requires_grad`` flag it was stored with.

    Stored tensors are detached (an autograd graph must not stay alive in the cache);
    the flag is given back so callers see what they stored.
    """
    value = move(tensor, device)
    if requires_grad and not value.requires_grad:
        value.requires_grad_(True)
    return value


def compact_copy(
    tensor: torch.Tensor, device: torch.device, *, pin: bool = False, non_blocking: bool = False
) -> torch.Tensor:
    """A new contiguous tensor on ``device`` with exactly ``tensor``'s bits."""
    out = torch.empty(
        tensor.shape,
        dtype=dtypes.raw_dtype(tensor.dtype),
        device=device,
        pin_memory=pin and device.type == "cpu",
    )
    out.copy_(_raw(tensor), non_blocking=non_blocking)
    return out.view(tensor.dtype)


def is_compact(tensor: torch.Tensor) -> bool:
    """Contiguous and the sole user of its storage: holding it costs exactly nbytes."""
    if not tensor.is_contiguous():
        return False
    storage_bytes = tensor.untyped_storage().nbytes()
    return tensor.storage_offset() == 0 and storage_bytes == tensor.nbytes


def to_host(tensor: torch.Tensor, *, pin: bool = False) -> torch.Tensor:
    """A CPU tensor holding exactly ``tensor``'s bytes and nothing more.

    The tensor itself when it is already a compact CPU tensor (as the stock cache keeps
    it); otherwise a compact copy, so that a small view never keeps its whole base alive.
    """
    if tensor.device.type == "cpu" and is_compact(tensor):
        return tensor
    return compact_copy(tensor, torch.device("cpu"), pin=pin)


class Ready:
    """The copies a prefetched batch still has in flight on side streams, and the host
    tensors they copy from. Those are arena slots or read buffers, not torch's pinned
    memory, which torch itself keeps from reuse until a copy from it ran: each is held
    here until its copy's event completed, or a later read could overwrite it mid-copy."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.device, torch.cuda.Event, torch.Tensor, torch.Tensor]] = []

    def add(
        self,
        device: torch.device,
        event: torch.cuda.Event,
        tensor: torch.Tensor,
        source: torch.Tensor,
    ) -> None:
        self._pending.append((device, event, tensor, source))

    def __bool__(self) -> bool:
        return bool(self._pending)

    def wait(self) -> None:
        """Make the calling thread's current stream wait for every copy (GPU-side), then
        let the host sources go (``let_go``)."""
        for device, event, tensor, _ in self._pending:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(event)
            tensor.record_stream(stream)
        self.let_go()

    def let_go(self) -> None:
        """Wait (on the CPU) until every copy ran, then drop the host tensors it copied
        from, whose memory may be reused at once: also for a batch never used. A
        prefetch queues its copies a batch or more ahead, so they have mostly run."""
        for _, event, _, _ in self._pending:
            event.synchronize()
        self._pending.clear()


class Transfers:
    """One side stream per accelerator, made on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        device = torch.device(device.type, device.index or 0)
        with self._lock:
            if device not in self._streams:
                self._streams[device] = torch.cuda.Stream(device)
            return self._streams[device]

    def to_host(
        self, tensor: torch.Tensor, *, pin: bool, arena: Arena | None = None, wait: bool = True
    ) -> torch.Tensor:
        """A compact CPU copy (or the tensor itself, if already a compact CPU tensor).

        With an ``arena`` (one with a region), the copy is a slot of it, even of a
        compact CPU tensor (the caller's memory is then theirs to free at once); a
        tensor the arena made already (a whole slot, or a buffer it had to put outside
        its region) is returned as it is. ``wait``: whether a
        full arena may be waited for (see ``Arena.take``).
        """
        if not self.copies_to_host(tensor, arena):
            return tensor
        in_arena = arena is not None and arena.capacity > 0
        if tensor.device.type == "cuda":
            # A slot is taken before the copy is queued: a full arena may be waited for.
            if in_arena:
                out = arena.take_like(tensor, pin=True, wait=wait)
            else:
                out = torch.empty(
                    tensor.shape, dtype=dtypes.raw_dtype(tensor.dtype), pin_memory=True
                )
            return self._copy_off(tensor, out)
        if in_arena:
            return arena.copy_in(tensor, wait=wait)
        return compact_copy(tensor, torch.device("cpu"), pin=pin)

    @staticmethod
    def copies_to_host(tensor: torch.Tensor, arena: Arena | None) -> bool:
        """Whether ``to_host(tensor, arena=arena)`` makes a copy (else it gives
        ``tensor`` itself back): the one place that decides."""
        if tensor.device.type != "cpu":
            return True
        if arena is not None and arena.capacity:
            return not arena.made(tensor)
        return not is_compact(tensor)

    def _copy_off(self, tensor: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``tensor`` copied off its GPU into ``out`` (CPU, its shape, its raw dtype) on
        the side stream; the caller waits for that copy only."""
        caller = torch.cuda.current_stream(tensor.device)
        side = self._stream(tensor.device)
        side.wait_stream(caller)  # the value may still be being computed on the caller's stream
        with torch.cuda.stream(side):
            out.copy_(_raw(tensor), non_blocking=out.is_pinned())
            tensor.record_stream(side)  # the caller may free it before the copy runs
            done = torch.cuda.Event()
            done.record(side)
        done.synchronize()
        return out.view(tensor.dtype)

    def onload(
        self,
        tensor: torch.Tensor,
        device: torch.device,
        requires_grad: bool,
        ready: Ready | None = None,
    ) -> torch.Tensor:
        """``tensor`` on ``device``; with ``ready`` (prefetch), a host-to-device copy runs
        on the side stream and its event is added to ``ready`` for the consumer."""
        if ready is None or device.type != "cuda" or tensor.device.type != "cpu":
            return onload(tensor, device, requires_grad)
        side = self._stream(device)
        with torch.cuda.stream(side):
            moved = move(tensor, device, non_blocking=tensor.is_pinned())
            done = torch.cuda.Event()
            done.record(side)
        ready.add(device, done, moved, tensor)
        if requires_grad:
            moved.requires_grad_(True)
        return moved
