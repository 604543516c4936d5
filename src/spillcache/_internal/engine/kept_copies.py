"""What a kept store's flush and close do to placement: disk copies the cache writes
itself, into its own store, with the pool's lock released or on close (``persist.py``
does the writing; these only hand values over and record what was written).

A mixin of ``Placement``: it works on placement's records, tiers and write-behind area.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .records import TensorRecord

if TYPE_CHECKING:
    from .tenants import Tenant

__all__ = ["KeptCopies"]


class KeptCopies:
    def to_persist(self, tenant: Tenant) -> list[tuple[TensorRecord, torch.Tensor]]:
        """Every record of ``tenant`` without a finished disk copy, each with its value
        (host copy) and a fresh array name on disk 0, its pending write dropped: for
        ``persist.write_whole`` to write (a kept store lives on one disk). Runs after
        the tenant's background writes were waited for or cancelled."""
        taken = []
        for record in self.records_of(tenant):
            if record.on_disk and record.write_state is None:
                continue
            tensor = self.write_behind.pop(record.rid)
            if tensor is None:
                tensor = self._memory_tier(record.resident).get(record.rid)
            self.write_behind.forget(record)
            if record.rid in self.disk:
                self.disk.unreserve(record.rid)
            record.array = self._next_array_name(record)
            record.disk = 0
            taken.append((record, self._host_copy(tensor).contiguous()))
        return taken

    def persisted(self, record: TensorRecord) -> None:
        """``record``'s value taken by ``to_persist`` is written: its disk copy."""
        self.disk.reserve(record.rid, record.nbytes)
        record.on_disk = True

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
        self._count(record.tenant, "disk.bytes_written", record.nbytes)
        return True
