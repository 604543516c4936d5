"""Which tier holds each tensor, and the moves between tiers.

Every tiered tensor is a ``TensorRecord``: stored once however many entries share it
(reference counted), with its primary copy in one memory tier (device or host), in the
write-behind area (RAM, waiting for its disk write), or on disk only. A record written
to disk keeps that copy while it is also in memory, so evicting it again costs nothing
("clean" copy). Records never change after they are stored; ``update`` of a key makes
new records.

Placement never does I/O of its own on the hot path and never waits: a move to disk
puts the value in the write-behind area and queues a write, which the cache takes with
``take_writes()``, runs on a background thread, and reports back with ``write_done``.
A read from disk is done by the caller between ``begin_load`` (None: not in memory)
and ``read_done`` (which may promote the value into the host tier).

Not thread-safe: the cache calls it with its lock held.
"""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from . import dtypes
from .errors import CapacityError, StoreError
from .policy import make_policy
from .tiers import DiskTier, MemoryTier
from .transfers import Transfers

__all__ = ["Placement", "TensorRecord"]

# TensorRecord.write_state: where its pending disk write stands.
QUEUED = "queued"  # in the write-behind area, not yet handed to a thread
WRITING = "writing"  # handed to a thread
FAILED = "failed"  # the write failed; the value stays in RAM


@dataclass(eq=False)
class TensorRecord:
    rid: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    onload_device: torch.device
    requires_grad: bool
    batch: int = 0  # where the scan policy expects its next use
    label: str = ""  # "batch 3, key 'hidden'", for error messages
    refs: int = 0
    on_disk: bool = False
    resident: str | None = None  # "device" or "host"; None when not in a memory tier
    write_state: str | None = None  # QUEUED, WRITING, FAILED, or None: no pending write
    loading: Future | None = None  # a disk read in flight; others wait on it
    alive: bool = True
    identity: int = 0  # id() of the tensor it was stored from, for sharing
    array: str = ""  # the store array holding its disk copy (a new name for every write)
    disk_writes: int = 0
    write_error: BaseException | None = field(default=None, repr=False)


class Placement:
    """Places tensors in the device, host and disk tiers within their budgets.

    :param device_budget: bytes allowed on accelerators (``None``: no limit)
    :param device_target: accelerator that device-tier values are moved to, or
        ``None`` to keep them on their own device
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
        device_target: torch.device | None,
        host_budget: int | None,
        disk: DiskTier | None,
        eviction: str,
        pin_host: bool,
        write_behind_budget: int = 256 * 2**20,
        transfers: Transfers | None = None,
    ) -> None:
        self.device = MemoryTier("device", device_budget)
        self.host = MemoryTier("host", host_budget)
        self.disk = disk
        self._policies = {"device": make_policy(eviction), "host": make_policy(eviction)}
        self._device_target = device_target
        self.pin_host = pin_host
        self._write_behind_budget = write_behind_budget
        self._transfers = transfers or Transfers()
        self._records: dict[int, TensorRecord] = {}
        self._identity: dict[int, tuple[weakref.ref, TensorRecord]] = {}
        self._next_rid = 0
        # Write-behind: values whose disk write is queued, running, or failed.
        self.pending: dict[int, torch.Tensor] = {}
        self.pending_bytes = 0  # queued or running (failed ones are in unwritten_bytes)
        self.unwritten_bytes = 0
        self.writes_in_flight = 0  # queued or running
        self._queued: list[TensorRecord] = []
        # Arrays of disk copies no longer wanted; the cache deletes them in the background.
        self._doomed: list[str] = []
        self.counters: Counter[str] = Counter()

    def _memory_tier(self, name: str) -> MemoryTier:
        return self.device if name == "device" else self.host

    def reached(self, batch: int, num_batches: int) -> None:
        """The reader took ``batch``: policies that predict the next use learn it here."""
        for policy in self._policies.values():
            policy.reached(batch, num_batches)

    # ----------------------------------------------------------------- admit

    def admit(
        self,
        tensors: Sequence[tuple[torch.Tensor, torch.device]],
        *,
        batch: int = 0,
        labels: Sequence[str] | None = None,
    ) -> list[TensorRecord]:
        """Store tensors (each with its onload device); one reference per item.

        A tensor already stored (the same object, still alive) is shared, not copied.
        All or nothing: if any tensor finds no room, the new records are removed again
        and ``CapacityError`` propagates. Records that were moved down a tier to make
        room stay moved; their values are unchanged.
        """
        records: list[TensorRecord] = []
        created: list[TensorRecord] = []
        try:
            for index, (tensor, onload_device) in enumerate(tensors):
                record = self._lookup(tensor)
                if record is None:
                    label = labels[index] if labels is not None else f"tensor {self._next_rid}"
                    record = self._new_record(tensor, onload_device, batch, label)
                    created.append(record)
                    self._place_new(record, tensor.detach())
                records.append(record)
        except BaseException:
            for record in created:
                self._discard(record)
            raise
        for record in records:
            record.refs += 1
        return records

    def _lookup(self, tensor: torch.Tensor) -> TensorRecord | None:
        found = self._identity.get(id(tensor))
        if found is not None and found[0]() is tensor:
            return found[1]
        return None

    def _new_record(
        self, tensor: torch.Tensor, onload_device: torch.device, batch: int, label: str
    ) -> TensorRecord:
        record = TensorRecord(
            rid=self._next_rid,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            nbytes=tensor.nbytes,
            onload_device=onload_device,
            requires_grad=tensor.requires_grad,
            batch=batch,
            label=label,
            identity=id(tensor),
        )
        self._next_rid += 1
        self._records[record.rid] = record
        self._identity[id(tensor)] = (weakref.ref(tensor), record)
        return record

    def adopt(
        self,
        array: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        onload_device: torch.device,
        requires_grad: bool,
        *,
        batch: int,
        label: str,
    ) -> TensorRecord:
        """A record for an array already in the store (a reopened cache); no reference
        yet (``hold`` one per use). Its disk bytes count against the disk budget."""
        record = TensorRecord(
            rid=self._next_rid,
            shape=shape,
            dtype=dtype,
            nbytes=math.prod(shape) * dtype.itemsize,
            onload_device=onload_device,
            requires_grad=requires_grad,
            batch=batch,
            label=label,
            on_disk=True,
            array=array,
            disk_writes=1,  # a later write gets "<rid>.2", never an existing name
        )
        self._next_rid += 1
        self._records[record.rid] = record
        self.disk.reserve(record.rid, record.nbytes)
        return record

    def skip_record_ids(self, names: list[str]) -> None:
        """New records must not be named like arrays already in the store."""
        taken = [int(name.split(".")[0]) for name in names if name.split(".")[0].isdigit()]
        self._next_rid = max([self._next_rid, *(number + 1 for number in taken)])

    def _wants_device_tier(self, tensor: torch.Tensor) -> bool:
        if self.device.budget == 0:
            return False
        return self._device_target is not None or tensor.device.type != "cpu"

    def _place_new(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        if self._wants_device_tier(tensor) and self._make_room(self.device, record):
            target = self._device_target or tensor.device
            self._put_memory(self.device, record, dtypes.move(tensor, target))
            return
        if self._make_room(self.host, record):
            self._put_memory(self.host, record, self._host_copy(tensor))
            return
        self._spill(record, self._host_copy(tensor))

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._transfers.to_host(tensor, pin=self.pin_host)

    def _put_memory(self, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor) -> None:
        tier.put(record.rid, tensor)
        self._policies[tier.name].insert(record.rid, record.batch)
        record.resident = tier.name
        self.counters[f"{tier.name}.bytes_written"] += record.nbytes

    # ------------------------------------------------------------- eviction

    def _make_room(self, tier: MemoryTier, record: TensorRecord, *, reading: bool = False) -> bool:
        """Move victims down until ``record`` fits; False if it cannot or should not.

        The policy names the victims worth evicting for this record (none, for the
        scan policy, when the record's next use is the furthest). A read promotes only
        where the policy allows it, and never pushes the write-behind area past its
        budget: a read must not make memory grow.
        """
        nbytes = record.nbytes
        if not tier.can_ever_hold(nbytes):
            return False
        if tier.has_room(nbytes):
            return True
        policy = self._policies[tier.name]
        if reading and not policy.promotes_by_eviction:
            return False
        try:
            for rid in policy.victims(record.batch):
                if tier.has_room(nbytes):
                    break
                victim = self._records[rid]
                if (
                    reading
                    and self._demotion_writes(victim, tier)
                    and (self.pending_bytes + victim.nbytes > self._write_behind_budget)
                ):
                    return False
                self._demote(victim)
        except CapacityError:
            return False
        return tier.has_room(nbytes)

    def _demotion_writes(self, record: TensorRecord, tier: MemoryTier) -> bool:
        return tier is self.host and not record.on_disk and record.write_state is None

    def _demote(self, record: TensorRecord) -> None:
        """Move a record's primary copy one tier down (device -> host -> disk)."""
        tier = self._memory_tier(record.resident)
        tensor = tier.get(record.rid)
        if tier is self.device and self._make_room(self.host, record):
            self._put_memory(self.host, record, self._host_copy(tensor))
        elif not record.on_disk and record.write_state is None:
            self._spill(record, self._host_copy(tensor))
        tier.pop(record.rid)
        self._policies[tier.name].remove(record.rid)
        if record.resident == tier.name:
            record.resident = None
        self.counters[f"{tier.name}.evictions"] += 1

    def _spill(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        """Put a value in the write-behind area and queue its disk write."""
        if self.disk is None:
            raise CapacityError(
                f"no room for {record.nbytes} bytes: the host tier is full and there is no "
                "disk tier; raise host_bytes or set disk_path"
            )
        self._make_disk_room(record.nbytes)
        self.disk.reserve(record.rid, record.nbytes)
        record.array = self._next_array_name(record)
        self.pending[record.rid] = tensor
        self.pending_bytes += record.nbytes
        self.writes_in_flight += 1
        record.write_state = QUEUED
        self._queued.append(record)

    @staticmethod
    def _next_array_name(record: TensorRecord) -> str:
        # A fresh name per write: the deletion of an older copy (queued in the
        # background) can then never remove a newer one.
        record.disk_writes += 1
        return str(record.rid) if record.disk_writes == 1 else f"{record.rid}.{record.disk_writes}"

    def _drop_disk_copy(self, record: TensorRecord) -> None:
        self.disk.unreserve(record.rid)
        self._doomed.append(record.array)
        record.on_disk = False

    def take_deletions(self) -> list[str]:
        """Arrays to delete since the last call, now the caller's to delete."""
        doomed, self._doomed = self._doomed, []
        return doomed

    def _make_disk_room(self, nbytes: int) -> None:
        disk = self.disk
        if disk.has_room(nbytes):
            return
        clean = [rid for rid in disk if self._is_clean(rid)]
        reclaimable = sum(self._records[rid].nbytes for rid in clean)
        if not disk.can_ever_hold(nbytes) or disk.nbytes - reclaimable + nbytes > disk.budget:
            raise CapacityError(
                f"no room for {nbytes} bytes: the disk tier holds {disk.nbytes} of its "
                f"{disk.budget} byte budget; raise disk_bytes (or host_bytes)"
            )
        # Drop disk copies of records that are also in memory: they are only copies.
        for rid in clean:
            self._drop_disk_copy(self._records[rid])
            if disk.has_room(nbytes):
                return

    def _is_clean(self, rid: int) -> bool:
        record = self._records.get(rid)
        return record is not None and record.on_disk and record.resident is not None

    # ---------------------------------------------------------- write-behind

    def take_writes(self) -> list[tuple[TensorRecord, torch.Tensor]]:
        """The writes queued since the last call, now the caller's to run."""
        queued, self._queued = self._queued, []
        for record in queued:
            record.write_state = WRITING
        return [(record, self.pending[record.rid]) for record in queued]

    def write_done(self, record: TensorRecord, error: BaseException | None) -> bool:
        """A write taken with ``take_writes`` finished; True if it failed for a live record."""
        if record.write_state != WRITING:
            return False  # persisted meanwhile: nothing waits on this one
        self.pending_bytes -= record.nbytes
        self.writes_in_flight -= 1
        if error is None:
            del self.pending[record.rid]
            record.write_state = None
            record.on_disk = True
            self.counters["disk.bytes_written"] += record.nbytes
            if not record.alive:
                self._drop_disk_copy(record)
            return False
        self.disk.unreserve(record.rid)
        if not record.alive:
            del self.pending[record.rid]
            record.write_state = None
            return False
        # The value stays readable from RAM; it is not retried.
        record.write_state = FAILED
        record.write_error = error
        self.unwritten_bytes += record.nbytes
        return True

    # ----------------------------------------------------------------- read

    def begin_load(self, record: TensorRecord) -> torch.Tensor | None:
        """The record's value if it is in memory (not yet onloaded); None: read it from disk."""
        if record.resident is not None:
            tier = self._memory_tier(record.resident)
            self._policies[tier.name].touch(record.rid)
            self._count_hit(tier.name, record)
            return tier.get(record.rid)
        self.counters["host.misses"] += 1
        if record.onload_device.type != "cpu":
            self.counters["device.misses"] += 1
        if record.rid in self.pending:
            # Read-your-writes: served from RAM, though the host tier no longer holds it.
            self.counters["write_behind.hits"] += 1
            return self.pending[record.rid]
        return None

    def _count_hit(self, tier_name: str, record: TensorRecord) -> None:
        self.counters[f"{tier_name}.hits"] += 1
        self.counters[f"{tier_name}.bytes_read"] += record.nbytes
        if tier_name == "host" and record.onload_device.type != "cpu":
            self.counters["device.misses"] += 1

    def read_done(
        self, record: TensorRecord, tensor: torch.Tensor, *, promote: bool, asked: bool = False
    ) -> None:
        """A disk read of the record finished; promote it into the host tier if it fits.

        A plain read promotes where the policy allows it; one the caller ``asked`` for
        (``pin_memory``) may evict like a new value would.
        """
        self.counters["disk.hits"] += 1
        self.counters["disk.bytes_read"] += record.nbytes
        if not promote or not record.alive or record.resident is not None:
            return
        try:
            if self._make_room(self.host, record, reading=not asked):
                self._put_memory(self.host, record, tensor)
        except StoreError:
            # Promotion is optional and the value was read: a failing disk write while
            # making room is reported by the write itself, not by this read.
            pass

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
            self._policies[record.resident].remove(record.rid)
            record.resident = None
        if record.write_state == QUEUED:
            self._queued.remove(record)
            self._drop_pending(record)
            self.pending_bytes -= record.nbytes
            self.writes_in_flight -= 1
            self.disk.unreserve(record.rid)
        elif record.write_state == FAILED:
            self._drop_pending(record)
            self.unwritten_bytes -= record.nbytes
        elif record.write_state is None and record.on_disk:
            self._drop_disk_copy(record)
        # WRITING: write_done deletes the file once the write is over.
        self._records.pop(record.rid, None)
        found = self._identity.get(record.identity)
        if found is not None and found[1] is record:
            del self._identity[record.identity]

    def _drop_pending(self, record: TensorRecord) -> None:
        del self.pending[record.rid]
        record.write_state = None

    # ------------------------------------------------------------ reporting

    def memory_by_device(self) -> dict[torch.device, int]:
        sizes = self.device.bytes_by_device()
        for device, nbytes in self.host.bytes_by_device().items():
            sizes[device] = sizes.get(device, 0) + nbytes
        for tensor in self.pending.values():
            sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
        return sizes

    def persist(self, *, durable: bool) -> None:
        """Give every record a disk copy (for keep_store), whatever disk_bytes says.

        Runs after the background writes were waited for (or cancelled); a write that
        is still marked pending is simply written again, atomically.
        """
        for record in list(self._records.values()):
            if record.on_disk and record.write_state is None:
                continue
            tensor = self.pending.pop(record.rid, None)
            if tensor is None:
                tensor = self._memory_tier(record.resident).get(record.rid)
            if record.rid in self.disk:
                self.disk.unreserve(record.rid)
            record.array = self._next_array_name(record)
            self.disk.reserve(record.rid, record.nbytes)
            self.disk.store.write_tensor(
                record.array, self._host_copy(tensor).contiguous(), durable=durable
            )
            record.on_disk = True
            record.write_state = None
        self._queued.clear()
        self.pending_bytes = self.unwritten_bytes = self.writes_in_flight = 0
