"""Reads, as placement sees them: a value asked for is in memory or must be read from
disk (``begin_load``); a value read from disk is counted and may be promoted into the
host tier (``read_done``, ``promote``). A mixin of ``Placement``; not thread-safe: the
cache calls it with its lock held."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from spillcache.errors import StoreError

if TYPE_CHECKING:
    from .records import TensorRecord

__all__ = ["Promotion"]


class Promotion:
    def begin_load(self, record: TensorRecord) -> torch.Tensor | None:
        """The record's value if it is in memory (not yet onloaded); None: read it from disk."""
        tenant = record.tenant
        if record.resident is not None:
            tier = self._memory_tier(record.resident)
            tenant.policies[tier.name].touch(record.rid)
            self._count_hit(tier.name, record)
            return tier.get(record.rid)
        self._count(tenant, "host.misses")
        if record.onload_device.type != "cpu":
            self._count(tenant, "device.misses")
        if record.rid in self.write_behind:
            # Read-your-writes: served from RAM, though the host tier no longer holds it.
            self._count(tenant, "write_behind.hits")
            return self.write_behind.get(record.rid)
        return None

    def _count_hit(self, tier_name: str, record: TensorRecord) -> None:
        self._count(record.tenant, f"{tier_name}.hits")
        self._count(record.tenant, f"{tier_name}.bytes_read", record.nbytes)
        if tier_name == "host" and record.onload_device.type != "cpu":
            self._count(record.tenant, "device.misses")

    def read_done(
        self, record: TensorRecord, tensor: torch.Tensor, *, promote: bool, asked: bool = False
    ) -> None:
        """A disk read of the record finished; promote it into the host tier if it fits.

        A plain read promotes where the policy allows it; one the caller ``asked`` for
        (``pin_memory``) may evict like a new value would.
        """
        self._count(record.tenant, "disk.hits")
        self._count(record.tenant, "disk.bytes_read", record.nbytes)
        if promote:
            self.promote(record, tensor, asked=asked)

    def promote(self, record: TensorRecord, tensor: torch.Tensor, *, asked: bool = False) -> None:
        """Put a value read from disk into the host tier where the policy finds it room
        (a record deleted or brought up meanwhile stays as it is)."""
        if not record.alive or record.resident is not None:
            return
        self._follow_arena()
        try:
            if self._make_room(self.host, record, reading=not asked):
                self._put_memory(self.host, record, tensor)
        except StoreError:
            # Promotion is optional and the value was read: a failing disk write while
            # making room is reported by the write itself, not by this read.
            pass
