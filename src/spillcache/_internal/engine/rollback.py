"""Undoing what one ``Placement.admit`` did, so that an update that fails stores nothing
and moves nothing.

To make room for a new value, placement moves others down a tier (device -> host ->
disk), queues their writes and drops clean disk copies. If a later value of the same
update then finds no room (``CapacityError``, ``DiskFullError``), every one of those
steps is undone here, last first: the cache is left with the same values in the same
tiers, the same writes queued and the same counts as before the call. Nothing has
reached the disk by then (queued writes are handed to the I/O threads only after the
update), so undoing is bookkeeping, and removing the (empty) store the admit made.

A record leaving a memory tier stays in its eviction policy until the admit is over
(``commit``): putting it back would otherwise change the order its policy evicts in.

This module is placement's own: it changes placement's state directly, and runs with
the pool's lock held, like placement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..store.store_dirs import remove_empty_dirs

if TYPE_CHECKING:
    import torch

    from .placement import Placement
    from .records import TensorRecord
    from .tenants import Tenant
    from .tiers import MemoryTier

__all__ = ["NO_JOURNAL", "Journal"]


class _Untracked:
    """Outside an admit: steps are final as they happen."""

    def counted(self, tenant: Tenant, counter: str, amount: int) -> None:
        pass

    def put(self, tier: MemoryTier, record: TensorRecord, before: str | None) -> None:
        pass

    def popped(self, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor) -> None:
        record.tenant.policies[tier.name].remove(record.rid)

    def spilled(self, record: TensorRecord) -> None:
        pass

    def opened(self, tenant: Tenant, disk: int) -> None:
        pass

    def dropped(self, record: TensorRecord) -> None:
        pass


NO_JOURNAL = _Untracked()


class Journal(_Untracked):
    """The steps of one admit, to ``undo`` them (or ``commit``: keep them)."""

    def __init__(self, placement: Placement) -> None:
        self._placement = placement
        self._steps: list[tuple[Any, ...]] = []
        self._left: list[tuple[MemoryTier, TensorRecord]] = []  # policy removals, deferred
        tiers = (placement.device, placement.host, placement.disk)
        self._peaks = [(tier, tier.peak) for tier in tiers if tier is not None]
        self._last_disk = placement.disk._last if placement.disk is not None else None

    def counted(self, tenant: Tenant, counter: str, amount: int) -> None:
        self._steps.append(("counted", tenant, counter, amount))

    def put(self, tier: MemoryTier, record: TensorRecord, before: str | None) -> None:
        self._steps.append(("put", tier, record, before))

    def popped(self, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor) -> None:
        self._steps.append(("popped", tier, record, tensor))
        self._left.append((tier, record))

    def spilled(self, record: TensorRecord) -> None:
        """Called before ``_spill`` changes anything (and after all it may raise)."""
        before = (record.array, record.disk, record.disk_writes, record.write_error)
        self._steps.append(("spilled", record, before))

    def dropped(self, record: TensorRecord) -> None:
        self._steps.append(("dropped", record, record.array, record.disk))

    def opened(self, tenant: Tenant, disk: int) -> None:
        self._steps.append(("opened", tenant, disk))

    def commit(self) -> None:
        for tier, record in self._left:
            if record.resident != tier.name:
                record.tenant.policies[tier.name].remove(record.rid)

    def undo(self) -> None:
        p = self._placement
        for step, *args in reversed(self._steps):
            getattr(self, f"_undo_{step}")(p, *args)
        for tier, peak in self._peaks:
            tier.peak = peak
        if self._last_disk is not None:
            p.disk._last = self._last_disk

    @staticmethod
    def _undo_counted(p: Placement, tenant: Tenant, counter: str, amount: int) -> None:
        for counters in (tenant.counters, p.counters):
            counters[counter] -= amount
            if not counters[counter]:
                del counters[counter]

    @staticmethod
    def _undo_put(p: Placement, tier: MemoryTier, record: TensorRecord, before: str | None) -> None:
        tier.pop(record.rid)
        record.tenant.policies[tier.name].remove(record.rid)
        record.resident = before

    @staticmethod
    def _undo_popped(
        p: Placement, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor
    ) -> None:
        tier.put(record.rid, tensor)  # its policy still has it: removals wait for commit
        record.resident = tier.name

    @staticmethod
    def _undo_spilled(p: Placement, record: TensorRecord, before: tuple) -> None:
        p.write_behind.pop(record.rid)
        p.write_behind.forget(record)  # out of the queue and the write-behind counts
        p.disk.unreserve(record.rid)
        record.array, record.disk, record.disk_writes, record.write_error = before
        if record.write_error is not None:  # a value whose earlier write had failed
            p.write_behind.unwritten_bytes += record.nbytes

    @staticmethod
    def _undo_opened(p: Placement, tenant: Tenant, disk: int) -> None:
        # The store this admit made (empty: nothing was written yet) goes too, with the
        # run and rank directories it leaves empty.
        store = tenant.forget_store(disk)
        store.remove()
        remove_empty_dirs(store.path.parent, p.disk.paths[disk])

    @staticmethod
    def _undo_dropped(p: Placement, record: TensorRecord, array: str, disk: int) -> None:
        p._doomed.remove((record.tenant, disk, array))
        p.disk.reserve(record.rid, record.nbytes, disk)
        record.on_disk = True
