"""The write-behind area of a pool: values on their way to disk, in RAM until their
write lands, so that ``update`` never waits for the device.

A value enters when placement spills it (``queue``); the cache hands the queued writes
to the I/O threads (``take_queued``); each leaves when its write is over (``pop`` and
``forget``). A read of a value still here is served from it. ``unwritten_bytes``
counts values whose write failed: they went back to the host tier, readable, and are
written again only if evicted again.

Not thread-safe: used by placement with the pool's lock held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .records import TensorRecord, WriteState

if TYPE_CHECKING:
    from ..io.arena import Arena

__all__ = ["WriteBehind"]


class WriteBehind:
    def __init__(self, budget: int, arena: Arena | None = None) -> None:
        # The most a *read* may push in when it promotes a value (updates wait for room
        # before they store: the cache's backpressure).
        self.budget = budget
        self._values: dict[int, torch.Tensor] = {}
        self.nbytes = 0
        self.unwritten_bytes = 0
        self._queued: list[TensorRecord] = []
        # Told of every write queued and ended, so that a take waiting for room knows
        # whether a slot may still come back.
        self._arena = arena

    def __contains__(self, rid: int) -> bool:
        return rid in self._values

    def get(self, rid: int) -> torch.Tensor | None:
        return self._values.get(rid)

    def has_room_for(self, nbytes: int) -> bool:
        return self.nbytes + nbytes <= self.budget

    def queue(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        """``record``'s value waits here for its disk write, now queued."""
        self._values[record.rid] = tensor
        self.nbytes += record.nbytes
        record.tenant.writes_in_flight += 1
        record.write_state = WriteState.QUEUED
        self._queued.append(record)
        if self._arena is not None:
            self._arena.expect_return()

    def take_queued(self) -> list[tuple[TensorRecord, torch.Tensor]]:
        """The writes queued since the last call, now the caller's to run."""
        queued, self._queued = self._queued, []
        for record in queued:
            record.write_state = WriteState.WRITING
        return [(record, self._values[record.rid]) for record in queued]

    def pop(self, rid: int) -> torch.Tensor | None:
        """The value leaves the area (its write is over, or no longer wanted)."""
        return self._values.pop(rid, None)

    def forget(self, record: TensorRecord, *, job_ends: bool = False) -> None:
        """``record``'s write is over, or will not be reported back: its counts go.
        ``job_ends``: the write's own job reports its end to the arena, once it has let
        go of the value (else it is reported here: no job will run, or one was cancelled)."""
        if record.write_state in (WriteState.QUEUED, WriteState.WRITING):
            if record.write_state == WriteState.QUEUED:
                self._queued.remove(record)
            self.nbytes -= record.nbytes
            record.tenant.writes_in_flight -= 1
            if self._arena is not None and not job_ends:
                self._arena.returned_expected()
        record.write_state = None
