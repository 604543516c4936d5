"""Which tier holds each tensor, and the moves between tiers.

Every tiered tensor is a ``TensorRecord``: stored once however many entries share it
(reference counted), with its primary copy in one memory tier (device or host), in the
write-behind area (RAM, waiting for its disk write), or on disk only. A record written
to disk keeps that copy while it is also in memory, so evicting it again costs nothing
("clean" copy). Records never change after they are stored; ``update`` of a key makes
new records.

Placement never does I/O of its own on the hot path and never waits: a move to disk
puts the value in the write-behind area and queues a write, which the cache takes with
``take_writes()``, runs on a background thread, and reports back with ``write_done``
(a failed write's value goes back to the host tier). ``admit`` is all or nothing:
``rollback.Journal`` undoes every move of an admit that fails.
A read from disk is done by the caller between ``begin_load`` (None: not in memory)
and ``read_done`` (which may promote the value into the host tier).

Not thread-safe: the cache calls it with its lock held.
"""

from __future__ import annotations

import errno
import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from spillcache.errors import CapacityError, StoreError

from ..io import transfers
from ..io.transfers import Transfers
from ..store.failures import errno_of, refusal
from .kept_copies import KeptCopies
from .promotion import Promotion
from .records import Admission, RecordRegistry, TensorRecord, Tier, WriteState
from .rollback import NO_JOURNAL, Journal
from .stats import COUNTERS
from .tenants import Tenant, Tenants
from .tiers import DiskTier, MemoryTier
from .tiers.disk import Reading
from .write_behind import WriteBehind

if TYPE_CHECKING:
    from ..io.arena import Arena

__all__ = ["Placement", "TensorRecord"]


class Placement(KeptCopies, Promotion):
    """Places tensors of one or more caches (``Tenant``s) in the device, host and disk
    tiers within budgets they share.

    :param device_budget: bytes allowed on accelerators (``None``: no limit)
    :param host_budget: bytes allowed in host RAM (``None``: no limit)
    :param disk: the disk tier, or ``None`` for none
    :param pin_host: allocate host copies in pinned memory (an accelerator is present)
    :param write_behind_budget: bytes of dirty values that a *read* may push into the
        write-behind area when it promotes a value (writes caused by ``update`` are
        bounded by the cache, which waits for room before it stores)
    """

    def __init__(
        self,
        *,
        device_budget: int | None,
        host_budget: int | None,
        disk: DiskTier | None,
        pin_host: bool,
        write_behind_budget: int = 256 * 2**20,
        transfers: Transfers | None = None,
        arena: Arena | None = None,
    ) -> None:
        self.device = MemoryTier(Tier.DEVICE, device_budget)
        self.host = MemoryTier(Tier.HOST, host_budget)
        self.disk = disk
        self.tenants = Tenants()
        self.pin_host = pin_host
        self._transfers = transfers or Transfers()
        self.records = RecordRegistry()
        self.arena = arena  # where host copies made under the lock go
        self._short_seen = 0  # the arena's short_bytes already taken from the host tier
        self._host_floor = None if host_budget is None else host_budget // 2
        self.write_behind = WriteBehind(write_behind_budget, arena)
        # Arrays of disk copies no longer wanted; the cache deletes them in the background.
        self._doomed: list[tuple[Tenant, int, str]] = []  # (cache, disk, array)
        self.counters: Counter[str] = Counter()  # totals over every tenant, closed ones too
        self._journal = NO_JOURNAL  # the steps of the admit under way, to undo on failure

    def _memory_tier(self, name: str) -> MemoryTier:
        return self.device if name == Tier.DEVICE else self.host

    def _count(self, tenant: Tenant, counter: str, amount: int = 1) -> None:
        if counter not in COUNTERS:
            raise ValueError(f"no counter named {counter!r}; the counters are {sorted(COUNTERS)}")
        self._journal.counted(tenant, counter, amount)
        tenant.counters[counter] += amount
        self.counters[counter] += amount

    # --------------------------------------------------------------- tenants

    def add_tenant(self, tenant: Tenant) -> Tenant:
        self.tenants.add(tenant)
        return tenant

    def release_tenant(self, tenant: Tenant) -> None:
        """A closing cache (``tenant.closed`` set, so no other cache evicts its values
        and no new write of them starts) whose store goes: its values leave every tier
        now, except those being written (their jobs are still running)."""
        for record in self.records_of(tenant):
            if record.write_state != WriteState.WRITING:
                self._discard(record)

    def remove_tenant(self, tenant: Tenant) -> None:
        """Forget a closed cache: every record of it leaves every tier, whatever state
        its write is in (the caller made sure no job of it is still running). Its
        arrays are not deleted one by one: its store is removed or kept whole."""
        for record in self.records_of(tenant):
            # Its job was cancelled: no write_done comes.
            if record.write_state == WriteState.WRITING:
                self.write_behind.pop(record.rid)
                self.disk.unreserve(record.rid)
                self.write_behind.forget(record)
            self._discard(record)
        self._doomed = [item for item in self._doomed if item[0] is not tenant]
        self.records.forget_tenant(tenant)
        self.tenants.remove(tenant)

    def records_of(self, tenant: Tenant) -> list[TensorRecord]:
        return self.records.of(tenant)

    def memory_copy(self, record: TensorRecord) -> torch.Tensor | None:
        """The record's value in memory (a tier or the write-behind area), if any."""
        if record.resident is not None:
            return self._memory_tier(record.resident).get(record.rid)
        return self.write_behind.get(record.rid)

    # ----------------------------------------------------------------- admit

    def admit(
        self, admissions: Sequence[Admission], *, tenant: Tenant, batch: int = 0
    ) -> list[TensorRecord]:
        """Store tensors of ``tenant``; one reference per item.

        A tensor already stored by this tenant (the same object, still alive: the
        ``original`` where the value is a copy made beforehand) is shared, not stored
        again.
        All or nothing: if any tensor finds no room (``CapacityError``, or
        ``DiskFullError`` and other StoreErrors for the disk), every step is undone (new
        records removed, records moved to make room moved back) and the error propagates.
        """
        self._follow_arena()
        records: list[TensorRecord] = []
        created: list[TensorRecord] = []
        journal = self._journal = Journal(self)
        try:
            for tensor, onload_device, original, label, key in admissions:
                original = tensor if original is None else original
                record = self.records.shared(tenant, original, onload_device)
                if record is None:
                    label = label or f"tensor {self.records.next_rid}"
                    record = self._new_record(tenant, original, onload_device, batch, label)
                    record.key = key
                    created.append(record)
                    self._place_new(record, tensor.detach())
                records.append(record)
        except BaseException:
            self._journal = NO_JOURNAL
            journal.undo()
            for record in created:
                self._discard(record)
            raise
        self._journal = NO_JOURNAL
        journal.commit()
        for record in records:
            record.refs += 1
        return records

    def _follow_arena(self) -> None:
        """What the arena had to put outside its region for want of room comes out of
        the host tier's budget (down to half of what it was), so that the region's
        other parts (writes and reads in flight) find that room from then on."""
        short = 0 if self.arena is None else self.arena.short_bytes
        if short > self._short_seen and self.host.budget is not None:
            lowered = self.host.budget - (short - self._short_seen)
            self.host.budget = max(self._host_floor, lowered)
            self._short_seen = short

    def _new_record(
        self,
        tenant: Tenant,
        tensor: torch.Tensor,
        onload_device: torch.device,
        batch: int,
        label: str,
    ) -> TensorRecord:
        return self.records.add(
            tensor,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            nbytes=tensor.nbytes,
            onload_device=onload_device,
            requires_grad=tensor.requires_grad,
            batch=batch,
            label=label,
            identity=id(tensor),
            tenant=tenant,
        )

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

    def wants_device_tier(self, tenant: Tenant, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` of ``tenant`` goes to the device tier if it has room: the
        one place that decides it (``Offload`` asks too, to leave such a tensor where
        it is rather than copy it to the host first)."""
        if self.device.budget == 0 or not tenant.device_tier:
            return False
        return tenant.device_target is not None or tensor.device.type != "cpu"

    def _place_new(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        tenant = record.tenant
        if self.wants_device_tier(tenant, tensor) and self._make_room(self.device, record):
            target = tenant.device_target or tensor.device
            self._put_memory(self.device, record, transfers.move(tensor, target))
            return
        if self._make_room(self.host, record):
            self._put_memory(self.host, record, self._host_copy(tensor))
            return
        self._spill(record, self._host_copy(tensor))

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        # Lock held: a full arena is not waited for (the copy goes outside it).
        return self._transfers.to_host(tensor, pin=self.pin_host, arena=self.arena, wait=False)

    def _put_memory(self, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor) -> None:
        self._journal.put(tier, record, record.resident)
        tier.put(record.rid, tensor)
        record.tenant.policies[tier.name].insert(record.rid, record.batch)
        record.resident = tier.name
        self._count(record.tenant, f"{tier.name}.bytes_written", record.nbytes)

    # ------------------------------------------------------------- eviction

    def _make_room(self, tier: MemoryTier, record: TensorRecord, *, reading: bool = False) -> bool:
        """Move victims down until ``record`` fits; False if it cannot or should not.

        The victims come from ``Tenants.victims``, across caches. A read promotes only
        where the policy allows it, and never pushes the write-behind area past its
        budget: a read must not make memory grow.
        """
        nbytes = record.nbytes
        if not tier.can_ever_hold(nbytes):
            return False
        if tier.has_room(nbytes):
            return True
        try:
            for rid in self.tenants.victims(
                tier.name, record.tenant, record.batch, reading=reading
            ):
                if tier.has_room(nbytes):
                    break
                victim = self.records[rid]
                if victim.resident != tier.name:  # moved earlier in this admit
                    continue
                if (
                    reading
                    and self._eviction_writes(victim, tier)
                    and not self.write_behind.has_room_for(victim.nbytes)
                ):
                    return False
                self._evict(victim)
        except (CapacityError, StoreError):  # the disk cannot take a victim: no room here
            return False
        return tier.has_room(nbytes)

    def _eviction_writes(self, record: TensorRecord, tier: MemoryTier) -> bool:
        return tier is self.host and not record.on_disk and record.write_state is None

    def _evict(self, record: TensorRecord) -> None:
        """Move a record's primary copy one tier down (device -> host -> disk)."""
        tier = self._memory_tier(record.resident)
        tensor = tier.get(record.rid)
        if tier is self.device and self._make_room(self.host, record):
            self._put_memory(self.host, record, self._host_copy(tensor))
        elif not record.on_disk and record.write_state is None:
            self._spill(record, self._host_copy(tensor))
        tier.pop(record.rid)
        self._journal.popped(tier, record, tensor)  # its policy forgets it (at commit)
        if record.resident == tier.name:
            record.resident = None
        self._count(record.tenant, f"{tier.name}.evictions")

    def _spill(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        """Put a value in the write-behind area and queue its disk write."""
        if self.disk is None or not record.tenant.has_disk:
            raise CapacityError(
                f"no room for {record.nbytes} bytes: the host tier is full and there is no "
                "disk tier; raise host_bytes or set disk_path"
            )
        disk = self.disk.choose(record.nbytes, exclude=record.tenant.broken)
        if disk is None:
            raise refusal(self.disk, record.tenant.broken, record.nbytes, record.label)
        self._make_disk_room(record.nbytes)
        # The store is made now, under the caller's lock, not by two write threads.
        if record.tenant.open_store(disk):
            self._journal.opened(record.tenant, disk)
        self._journal.spilled(record)
        record.disk = disk
        self.disk.reserve(record.rid, record.nbytes, disk, writing=True)
        if record.write_error is not None:  # written again: no longer unwritten
            self.write_behind.unwritten_bytes -= record.nbytes
            record.write_error = None
        record.array = self._next_array_name(record)
        self.write_behind.queue(record, tensor)

    @staticmethod
    def _next_array_name(record: TensorRecord) -> str:
        # A fresh name per write: the deletion of an older copy (queued in the
        # background) can then never remove a newer one.
        record.disk_writes += 1
        return str(record.rid) if record.disk_writes == 1 else f"{record.rid}.{record.disk_writes}"

    def _drop_disk_copy(self, record: TensorRecord) -> None:
        self._journal.dropped(record)
        self.disk.unreserve(record.rid)
        self._doomed.append((record.tenant, record.disk, record.array))
        record.on_disk = False

    def take_deletions(self, tenant: Tenant | None = None) -> list[tuple[Tenant, int, str]]:
        """Arrays to delete since the last call, as (cache, disk, array), of ``tenant``
        only if given; now the caller's to delete."""
        taken = [item for item in self._doomed if tenant in (None, item[0])]
        self._doomed = [item for item in self._doomed if item not in taken]
        return taken

    def _make_disk_room(self, nbytes: int) -> None:
        disk = self.disk
        if disk.has_room(nbytes):
            return
        clean = [rid for rid in disk if self._is_clean(rid)]
        reclaimable = sum(self.records[rid].nbytes for rid in clean)
        if not disk.can_ever_hold(nbytes) or disk.nbytes - reclaimable + nbytes > disk.budget:
            raise CapacityError(
                f"no room for {nbytes} bytes: the disk tier holds {disk.nbytes} of its "
                f"{disk.budget} byte budget; raise disk_bytes (or host_bytes)"
            )
        # Drop disk copies of records that are also in memory: they are only copies.
        for rid in clean:
            self._drop_disk_copy(self.records[rid])
            if disk.has_room(nbytes):
                return

    def _is_clean(self, rid: int) -> bool:
        record = self.records.get(rid)
        return record is not None and record.on_disk and record.resident is not None

    # ---------------------------------------------------------- write-behind

    def take_writes(self) -> list[tuple[TensorRecord, torch.Tensor]]:
        """The writes queued since the last call, now the caller's to run."""
        return self.write_behind.take_queued()

    def write_done(
        self, record: TensorRecord, error: BaseException | None, free: Reading | None = None
    ) -> bool:
        """A write taken with ``take_writes`` finished; True if it failed for a live record.

        A failed write's value goes back to the host tier, counted against its budget
        (above it if it is full: new values then find no room until the disk takes
        writes again). ``free``: the disk's reading just after a write failed for lack
        of space; that disk takes nothing more until it shows room again.
        """
        if record.write_state != WriteState.WRITING:
            return False  # persisted meanwhile: nothing waits on this one
        tensor = self.write_behind.pop(record.rid)
        self.write_behind.forget(record, job_ends=True)
        if error is None:
            self.disk.written(record.rid)
            record.on_disk = True
            self._count(record.tenant, "disk.bytes_written", record.nbytes)
            if not record.alive:
                self._drop_disk_copy(record)
            return False
        self.disk.unreserve(record.rid)
        if errno_of(error) == errno.ENOSPC:
            self.disk.mark_full(record.disk, free, record.nbytes)
        if not record.alive:
            return False
        self.host.put(record.rid, tensor)
        record.tenant.policies[Tier.HOST].insert(record.rid, record.batch)
        record.resident = Tier.HOST
        record.write_error = error
        self.write_behind.unwritten_bytes += record.nbytes
        return True

    # -------------------------------------------------------------- release

    def hold(self, record: TensorRecord) -> None:
        """Keep a record alive while it is read outside the cache's lock."""
        record.refs += 1

    def release(self, records: Sequence[TensorRecord]) -> None:
        """Drop one reference per item; a record with none left is deleted everywhere."""
        for record in records:
            record.refs -= 1
            if record.refs == 0:
                self._discard(record)

    def _discard(self, record: TensorRecord) -> None:
        record.alive = False
        if record.resident is not None:
            self._memory_tier(record.resident).pop(record.rid)
            record.tenant.policies[record.resident].remove(record.rid)
            record.resident = None
        if record.write_state == WriteState.QUEUED:
            self.disk.unreserve(record.rid)
            self.write_behind.pop(record.rid)
            self.write_behind.forget(record)
        elif record.write_state is None and record.on_disk:
            self._drop_disk_copy(record)
        # WriteState.WRITING: write_done deletes the file once the write is over.
        if record.write_error is not None:
            self.write_behind.unwritten_bytes -= record.nbytes
            record.write_error = None
        self.records.forget(record)
