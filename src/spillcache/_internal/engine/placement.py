"""Which tier holds each tensor, and the moves between tiers.

Every tiered tensor is a ``TensorRecord``: stored once however many entries share it
(reference counted), its primary copy in one memory tier (device or host), in the
write-behind area (RAM, waiting for its disk write), or on disk only. A record written
to disk keeps that copy while also in memory: evicting it again costs nothing ("clean"
copy). Records never change; ``update`` of a key makes new ones.

Placement never does I/O and never waits: a move to disk puts the value in the
write-behind area and queues a write, an effect the pool's transaction takes
(``take_writes``, ``take_deletions``) and hands to a lane once the decision is over; the
lane reports back with ``write_done`` (a failed write's value goes back to the host
tier). What only slow work can give (a store made on a disk, a device value copied to
host memory) is asked for with ``NeedsFirst``; ``admit`` is all or nothing: its
``Journal`` takes back every move of an admit that fails or needs something first (see
``transaction.py``). A read from disk is done by the caller between ``begin_load``
(None: not in memory) and ``read_done`` (which may promote the value into the host tier).

Not thread-safe: the pool calls it with its lock held.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence

import torch

from spillcache.errors import CapacityError, StoreError

from ..io.arena import Arena, slot_size
from ..io.transfers import Transfers
from ..store.failures import errno_of, refusal
from .reads_and_kept import ReadsAndKept
from .records import Admission, RecordRegistry, TensorRecord, Tier, WriteBehind, WriteState
from .tenants import Counters, Tenant, Tenants
from .tiers import DiskTier, MemoryTier, Reading
from .transaction import FINAL, Journal, Needs, NeedsFirst, copy_key

__all__ = ["Placement", "TensorRecord"]


class Placement(ReadsAndKept):
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
        # A value in the region takes its whole slot: what the host tier and the write-
        # behind count, so that the parts' budgets add up to it (elsewhere: its bytes).
        room = slot_size if arena is not None and arena.capacity else int
        self.host = MemoryTier(Tier.HOST, host_budget, room)
        self.disk = disk
        self.tenants = Tenants()
        self.pin_host = pin_host
        self._transfers = transfers or Transfers()
        self.records = RecordRegistry()
        self.arena = arena  # where host copies made under the lock go
        self._short_seen = 0  # the arena's short_bytes already taken from the host tier
        self._host_floor = None if host_budget is None else host_budget // 2
        self.write_behind = WriteBehind(write_behind_budget, arena, room)
        # Arrays of disk copies no longer wanted; the pool deletes them in the background.
        self._doomed: list[tuple[Tenant, int, str]] = []  # (cache, disk, array)
        self.counters = Counters()  # totals over every tenant, closed ones too
        self._journal: Journal = FINAL  # the steps of the admit under way, to take back
        self.needs = Needs()  # slow work asked for, for the transaction to do
        # Host copies of device values made outside the lock (needs.copies), by copy_key.
        self.premade: dict[tuple, torch.Tensor] = {}
        self.copies_under_lock = False  # the last try of a transaction: copy here

    def _memory_tier(self, name: str) -> MemoryTier:
        return self.device if name == Tier.DEVICE else self.host

    def _count(self, tenant: Tenant, event: Callable[..., None], *args: object) -> None:
        """Count one ``Counters`` event for ``tenant`` and for the pool."""
        for counters in (tenant.counters, self.counters):
            event(counters, *args)

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
                self.disk.unreserve(record.rid)
                self.write_behind.leave(record)
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
        ``DiskFullError`` and other StoreErrors for the disk), or the admit needs slow
        work first (``NeedsFirst``: it asked for it in ``needs``), every step is taken
        back (new records removed, records moved to make room moved back) and the error
        propagates.
        """
        self._follow_arena()
        records: list[TensorRecord] = []
        created: list[TensorRecord] = []
        journal = self._journal = self._new_journal()
        journal.on_undo(self.tenants.used(tenant))
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
            if self.needs.copies:  # asked for as they came: all of them at once
                raise NeedsFirst("host copies of device values, made outside the lock")
        except BaseException:
            self._journal = FINAL
            journal.undo()
            for record in created:
                self._discard(record)
            raise
        self._journal = FINAL
        journal.commit()
        for record in records:
            record.refs += 1
        return records

    def _new_journal(self) -> Journal:
        """A journal for one admit or promotion, whose first step (so undone last) gives
        back the counts, the peaks (tiers', values') and the disks' rotation as now."""
        journal = Journal()
        counters = [(owner, owner.counters.copy()) for owner in (self, *self.tenants)]
        tiers = [tier for tier in (self.device, self.host, self.disk) if tier is not None]
        peaks = [(tier, tier.peak) for tier in tiers]
        held_peaks = self.records.held_peaks()
        last_chosen = None if self.disk is None else self.disk.last_chosen

        def restore() -> None:
            for owner, saved in counters:
                owner.counters.restore(saved)
            for tier, peak in peaks:
                tier.peak = peak
            self.records.restore_peaks(held_peaks)
            if last_chosen is not None:
                self.disk.last_chosen = last_chosen

        journal.on_undo(restore)
        return journal

    def _follow_arena(self) -> None:
        """What the arena had to put outside its region for want of room comes out of
        the host tier's budget (down to half of what it was), so that the region's
        other parts (writes and reads in flight) find that room from then on."""
        short = 0 if self.arena is None else self.arena.short_bytes
        if short > self._short_seen and self.host.budget is not None:
            self.host.budget = max(self._host_floor, self.host.budget - short + self._short_seen)
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
            # Offload moved it to its tier's device, before the lock.
            self._put_memory(self.device, record, tensor)
            return
        if self._make_room(self.host, record):
            self._put_memory(self.host, record, self._host_copy(record, tensor, new=True))
            return
        self._spill(record, self._host_copy(record, tensor, new=True))

    def _host_copy(self, record: TensorRecord, tensor: torch.Tensor, new=False) -> torch.Tensor:
        """``record``'s value in host memory as the host tier keeps it: the value itself
        where it is so already (``Offload`` copied a new one into the arena before the
        lock), else a copy made outside the lock (``needs.copies``; the admit is taken
        back meanwhile) found by the record's id, or for a ``new`` value, whose record is
        made anew each try, by the bytes it views (``copy_key``)."""
        transfers = self._transfers
        if not transfers.copies_to_host(tensor, self.arena) or self.copies_under_lock:
            # Lock held: a full arena is not waited for (the copy goes outside it).
            return transfers.to_host(tensor, pin=self.pin_host, arena=self.arena, wait=False)
        key = copy_key(tensor) if new else ("record", record.rid)
        made = self.premade.pop(key, None)
        if made is not None:
            return made
        if self._journal is FINAL:  # no admit to take back
            raise NeedsFirst(f"a host copy of {record.label}")
        self.needs.copies[key] = tensor
        return tensor

    def _put_memory(self, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor) -> None:
        before = record.resident
        tier.put(record.rid, tensor)
        record.tenant.policies[tier.name].insert(record.rid, record.batch)
        record.resident = tier.name
        self._count(record.tenant, Counters.wrote, tier.name, record.nbytes)

        def take_out() -> None:
            tier.pop(record.rid)
            record.tenant.policies[tier.name].remove(record.rid)
            record.resident = before

        self._journal.on_undo(take_out)

    # ------------------------------------------------------------- eviction

    def _make_room(self, tier: MemoryTier, record: TensorRecord, *, reading: bool = False) -> bool:
        """Move victims down until ``record`` fits; False if it cannot or should not.

        The victims come from ``Tenants.victims``, across caches. A read promotes only
        where the policy allows it, and never pushes the write-behind area past its
        budget: a read must not make memory grow. A tier over a budget the split lowered
        first comes down to it whatever the newcomer's use (``scan`` would let it bypass).
        """
        nbytes = record.nbytes
        if not tier.can_ever_hold(nbytes):
            return False
        if tier.has_room(nbytes):
            return True
        over = not reading and not tier.has_room(0)
        try:
            for need, bypass in [(0, False)] * over + [(nbytes, True)]:
                for rid in self.tenants.victims(
                    tier.name, record.tenant, record.batch, reading=reading, bypass=bypass
                ):
                    if tier.has_room(need):
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
            self._put_memory(self.host, record, self._host_copy(record, tensor))
        elif not record.on_disk and record.write_state is None:
            self._spill(record, self._host_copy(record, tensor))
        tier.pop(record.rid)
        if record.resident == tier.name:
            record.resident = None
        self._count(record.tenant, Counters.evicted, tier.name)

        def put_back() -> None:  # its policy still has it: it forgets it at commit
            tier.put(record.rid, tensor)
            record.resident = tier.name

        def forget_in_policy() -> None:
            if record.resident != tier.name:
                record.tenant.policies[tier.name].remove(record.rid)

        self._journal.on_undo(put_back)
        self._journal.at_commit(forget_in_policy)

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
        if not record.tenant.has_store_on(disk):  # made with the lock released
            self.needs.stores.add((record.tenant, disk))
            raise NeedsFirst(f"a store on {self.disk.paths[disk]}")
        self._make_disk_room(record.nbytes)
        before = (record.array, record.disk, record.disk_writes, record.write_error)
        record.disk = disk
        self.disk.reserve(record.rid, record.nbytes, disk, writing=True)
        if record.write_error is not None:  # written again: no longer unwritten
            self.write_behind.unwritten_bytes -= self.host.room(record.nbytes)
            record.write_error = None
        record.array = self._next_array_name(record)
        self.write_behind.queue(record, tensor)

        def unqueue() -> None:
            self.write_behind.leave(record)  # out of the queue and the write-behind counts
            self.disk.unreserve(record.rid, ran=False)  # the disk never saw it
            record.array, record.disk, record.disk_writes, record.write_error = before
            if record.write_error is not None:  # a value whose earlier write had failed
                self.write_behind.unwritten_bytes += self.host.room(record.nbytes)

        self._journal.on_undo(unqueue)

    @staticmethod
    def _next_array_name(record: TensorRecord) -> str:
        # A fresh name per write: the deletion of an older copy (queued in the
        # background) can then never remove a newer one.
        record.disk_writes += 1
        return str(record.rid) if record.disk_writes == 1 else f"{record.rid}.{record.disk_writes}"

    def _drop_disk_copy(self, record: TensorRecord) -> None:
        doomed = (record.tenant, record.disk, record.array)
        self.disk.unreserve(record.rid)
        self._doomed.append(doomed)
        record.on_disk = False

        def keep() -> None:
            self._doomed.remove(doomed)
            self.disk.reserve(record.rid, record.nbytes, doomed[1])
            record.on_disk = True

        self._journal.on_undo(keep)

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
        """The writes queued since the last call (effects), now the caller's to run."""
        return self.write_behind.take_queued()

    def take_needs(self) -> Needs:
        """The slow work decisions asked for since the last call, now the caller's."""
        needs, self.needs = self.needs, Needs()
        return needs

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
        tensor = self.write_behind.leave(record, job_ends=True)
        if error is None:
            self.disk.written(record.rid)
            record.on_disk = True
            self._count(record.tenant, Counters.wrote, "disk", record.nbytes)
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
        self.write_behind.unwritten_bytes += self.host.room(record.nbytes)
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
            self.write_behind.leave(record)
        elif record.write_state is None and record.on_disk:
            self._drop_disk_copy(record)
        # WriteState.WRITING: write_done deletes the file once the write is over.
        if record.write_error is not None:
            self.write_behind.unwritten_bytes -= self.host.room(record.nbytes)
            record.write_error = None
        self.records.forget(record)
