"""Placement's side of what is done outside it: a read (the value in memory, or to be
read from disk, then counted and maybe promoted into the host tier), and a kept store
(the arrays of a reopened store adopted; the copies a flush or close writes itself,
handed over and recorded).

``ReadsAndKept`` is a mixin of ``Placement``: it works on placement's records, tiers
and write-behind area. Not thread-safe: the pool calls it with its lock held.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from spillcache.errors import StoreError

from .records import TensorRecord, Tier
from .tenants import Counters
from .transaction import FINAL, NeedsFirst

if TYPE_CHECKING:
    from .tenants import Tenant

__all__ = ["ReadsAndKept"]


class ReadsAndKept:
    # -------------------------------------------------------------- reads

    def begin_load(self, record: TensorRecord) -> torch.Tensor | None:
        """The record's value if it is in memory (not yet onloaded); None: read it from disk."""
        tenant = record.tenant
        if record.resident is not None:
            tier = self._memory_tier(record.resident)
            tenant.policies[tier.name].touch(record.rid)
            self._count_hit(tier.name, record)
            return tier.get(record.rid)
        self._count(tenant, Counters.missed, Tier.HOST)
        if record.onload_device.type != "cpu":
            self._count(tenant, Counters.missed, Tier.DEVICE)
        if record.rid in self.write_behind:
            # Read-your-writes: served from RAM, though the host tier no longer holds it.
            self._count(tenant, Counters.write_behind_hit)
            return self.write_behind.get(record.rid)
        return None

    def _count_hit(self, tier_name: str, record: TensorRecord) -> None:
        self._count(record.tenant, Counters.hit, tier_name, record.nbytes)
        if tier_name == Tier.HOST and record.onload_device.type != "cpu":
            self._count(record.tenant, Counters.missed, Tier.DEVICE)

    def read_done(
        self, record: TensorRecord, tensor: torch.Tensor, *, promote: bool, asked: bool = False
    ) -> None:
        """A disk read of the record finished; promote it into the host tier if it fits.

        A plain read promotes where the policy allows it; one the caller ``asked`` for
        (``pin_memory``) may evict like a new value would.
        """
        self._count(record.tenant, Counters.hit, "disk", record.nbytes)
        if promote:
            self.promote(record, tensor, asked=asked)

    def promote(self, record: TensorRecord, tensor: torch.Tensor, *, asked: bool = False) -> None:
        """Put a value read from disk into the host tier where the policy finds it room
        (a record deleted or brought up meanwhile stays as it is). Where making room
        needs a store made first, the moves are taken back and the promotion waits for
        it (``needs.promotions``: the transaction promotes again once it is made)."""
        if not record.alive or record.resident is not None or record.write_state is not None:
            return
        self._follow_arena()
        journal = self._journal = self._new_journal()
        # Its victims are host-tier values: one that needs a host copy to be written is
        # one put outside the arena for want of room, copied into it here.
        copies_under_lock, self.copies_under_lock = self.copies_under_lock, True
        try:
            if self._make_room(self.host, record, reading=not asked):
                self._put_memory(self.host, record, tensor)
        except NeedsFirst:
            self._journal = FINAL
            journal.undo()
            self.needs.promotions.append((record, tensor, asked))
            return
        except StoreError:
            # Promotion is optional and the value was read: a failing disk write while
            # making room is reported by the write itself, not by this read.
            pass
        finally:
            self.copies_under_lock = copies_under_lock
        self._journal = FINAL
        journal.commit()

    # -------------------------------------------------------------- a kept store

    def adopt(
        self,
        array: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        onload_device: torch.device,
        requires_grad: bool,
        *,
        tenant: Tenant,
        batch: int,
        label: str,
    ) -> TensorRecord:
        """A record for an array already in the tenant's store (a reopened cache); no reference
        yet (``hold`` one per use). Its disk bytes count against the disk budget."""
        record = self.records.add(
            shape=shape,
            dtype=dtype,
            nbytes=math.prod(shape) * dtype.itemsize,
            onload_device=onload_device,
            requires_grad=requires_grad,
            batch=batch,
            label=label,
            array=array,
            disk_writes=1,  # a later write gets "<rid>.2", never an existing name
            tenant=tenant,
        )
        self.disk.reserve(record.rid, record.nbytes)
        record.on_disk = True  # only once counted: discarding it then uncounts it
        return record

    def skip_record_ids(self, names: list[str]) -> None:
        """New records must not be named like arrays already in the store."""
        self.records.skip(names)

    def to_persist(self, tenant: Tenant) -> list[tuple[TensorRecord, torch.Tensor]]:
        """Every record of ``tenant`` without a finished disk copy, each with its value
        (as a tier holds it: the caller copies it to the host, without the lock) and a
        fresh array name on disk 0, its pending write dropped: for ``persist`` to write
        on close (a kept store lives on one disk). Runs after the tenant's background
        writes were waited for or cancelled, and no other cache evicts its values."""
        taken = []
        for record in self.records_of(tenant):
            if record.on_disk and record.write_state is None:
                continue
            tensor = self.write_behind.leave(record)
            if tensor is None:
                tensor = self._memory_tier(record.resident).get(record.rid)
            if record.rid in self.disk:
                self.disk.unreserve(record.rid)
            record.array = self._next_array_name(record)
            record.disk = 0
            taken.append((record, tensor))
        return taken

    def new_array_name(self, record: TensorRecord) -> str:
        """A name for a disk copy of ``record`` that its cache writes itself (a kept
        store's flush), taken now so that no other write of it takes it."""
        return self._next_array_name(record)

    def took_copy(self, record: TensorRecord, array: str) -> bool:
        """Its cache wrote ``record``'s value to ``array`` itself (a kept store's flush,
        the lock released meanwhile): that is now the record's disk copy, unless the
        record changed meanwhile (released, written elsewhere, no longer in memory, or
        its last write failed). False: the array is not the record's."""
        if (
            not record.alive
            or record.on_disk
            or record.write_state is not None
            or record.resident is None
            or record.write_error is not None
        ):
            return False
        record.array, record.disk, record.on_disk = array, 0, True
        self.disk.reserve(record.rid, record.nbytes)
        self._count(record.tenant, Counters.wrote, "disk", record.nbytes)
        return True
