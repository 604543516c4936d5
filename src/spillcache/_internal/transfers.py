"""Copies between host RAM and accelerators on side streams, so they overlap compute.

Two directions, two rules:

- Offload (``update`` of a GPU value): the copy to pinned host memory runs on a side
  stream that first waits for the caller's stream (the value may still be being
  computed), and the caller waits only for that copy's event, not for the whole device.
  The value is then in host memory when ``update`` returns, as llm-compressor expects.
- Onload ahead of use (prefetch): the copy to the device runs on a side stream without
  blocking anybody; the batch comes with ``Ready``, whose ``wait()`` makes the
  *consumer's* stream wait for the copy's event (a GPU-side wait: the CPU goes on) and
  tells the caching allocator that the consumer's stream uses the new tensors.

Without CUDA every function here is a plain bit-exact copy (``spillcache._internal.dtypes``).
"""

from __future__ import annotations

import threading

import torch

from . import dtypes

__all__ = ["Ready", "Transfers"]

CPU = torch.device("cpu")


class Ready:
    """The copies a prefetched batch still has in flight on side streams."""

    def __init__(self) -> None:
        self._pending: list[tuple[torch.device, torch.cuda.Event, list[torch.Tensor]]] = []

    def add(self, device: torch.device, event: torch.cuda.Event, tensor: torch.Tensor) -> None:
        self._pending.append((device, event, [tensor]))

    def __bool__(self) -> bool:
        return bool(self._pending)

    def wait(self) -> None:
        """Make the calling thread's current stream wait for every copy (GPU-side)."""
        for device, event, tensors in self._pending:
            stream = torch.cuda.current_stream(device)
            stream.wait_event(event)
            for tensor in tensors:
                tensor.record_stream(stream)
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

    def to_host(self, tensor: torch.Tensor, *, pin: bool) -> torch.Tensor:
        """A compact CPU copy (or the tensor itself, if already a compact CPU tensor)."""
        if tensor.device.type != "cuda":
            return dtypes.to_host(tensor, pin=pin)
        caller = torch.cuda.current_stream(tensor.device)
        side = self._stream(tensor.device)
        side.wait_stream(caller)  # the value may still be being computed on the caller's stream
        with torch.cuda.stream(side):
            copy = dtypes.compact_copy(tensor, CPU, pin=True, non_blocking=True)
            tensor.record_stream(side)  # the caller may free it before the copy runs
            done = torch.cuda.Event()
            done.record(side)
        done.synchronize()
        return copy

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
            return dtypes.onload(tensor, device, requires_grad)
        side = self._stream(device)
        with torch.cuda.stream(side):
            moved = dtypes.move(tensor, device, non_blocking=tensor.is_pinned())
            done = torch.cuda.Event()
            done.record(side)
        ready.add(device, done, moved)
        if requires_grad:
            moved.requires_grad_(True)
        return moved
