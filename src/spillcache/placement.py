"""Which tier holds each tensor, and the moves between tiers.

Every tiered tensor is a ``TensorRecord``: stored once however many entries share it
(reference counted), with its primary copy in one memory tier (device or host) or on
disk only. A record written to disk keeps that copy while it is also in memory, so
evicting it again costs nothing ("clean" copy). Records never change after they are
stored; ``update`` of a key makes new records.

Not thread-safe: the cache calls it with its lock held.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import dtypes
from .errors import CapacityError, StoreError
from .policy import make_policy
from .tiers import DiskTier, MemoryTier

__all__ = ["Placement", "TensorRecord"]

CPU = torch.device("cpu")


@dataclass(eq=False)
class TensorRecord:
    rid: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    onload_device: torch.device
    requires_grad: bool
    refs: int = 0
    on_disk: bool = False
    resident: str | None = None  # "device", "host", or None when only on disk
    identity: int = 0  # id() of the tensor it was stored from, for sharing


class Placement:
    """Places tensors in the device, host and disk tiers within their budgets.

    :param device_budget: bytes allowed on accelerators (``None``: no limit)
    :param device_target: accelerator that device-tier values are moved to, or
        ``None`` to keep them on their own device
    :param host_budget: bytes allowed in host RAM (``None``: no limit)
    :param disk: the disk tier, or ``None`` for none
    :param pin_host: allocate host copies in pinned memory (an accelerator is present)
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
    ) -> None:
        self.device = MemoryTier("device", device_budget)
        self.host = MemoryTier("host", host_budget)
        self.disk = disk
        self._policies = {"device": make_policy(eviction), "host": make_policy(eviction)}
        self._device_target = device_target
        self._pin_host = pin_host
        self._records: dict[int, TensorRecord] = {}
        self._identity: dict[int, tuple[weakref.ref, TensorRecord]] = {}
        self._next_rid = 0
        self.counters: Counter[str] = Counter()

    def _memory_tier(self, name: str) -> MemoryTier:
        return self.device if name == "device" else self.host

    # ----------------------------------------------------------------- admit

    def admit(self, tensors: Sequence[tuple[torch.Tensor, torch.device]]) -> list[TensorRecord]:
        """Store tensors (each with its onload device); one reference per item.

        A tensor already stored (the same object, still alive) is shared, not copied.
        All or nothing: if any tensor finds no room, the new records are removed again
        and ``CapacityError`` (or the disk's ``StoreError``) propagates. Records that
        were moved down a tier to make room stay moved; their values are unchanged.
        """
        records: list[TensorRecord] = []
        created: list[TensorRecord] = []
        try:
            for tensor, onload_device in tensors:
                record = self._lookup(tensor)
                if record is None:
                    record = self._new_record(tensor, onload_device)
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

    def _new_record(self, tensor: torch.Tensor, onload_device: torch.device) -> TensorRecord:
        record = TensorRecord(
            rid=self._next_rid,
            shape=tuple(tensor.shape),
            dtype=tensor.dtype,
            nbytes=tensor.nbytes,
            onload_device=onload_device,
            requires_grad=tensor.requires_grad,
            identity=id(tensor),
        )
        self._next_rid += 1
        self._records[record.rid] = record
        self._identity[id(tensor)] = (weakref.ref(tensor), record)
        return record

    def _wants_device_tier(self, tensor: torch.Tensor) -> bool:
        if self.device.budget == 0:
            return False
        return self._device_target is not None or tensor.device.type != "cpu"

    def _place_new(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        if self._wants_device_tier(tensor) and self._try_make_room(self.device, record.nbytes):
            target = self._device_target or tensor.device
            self._put_memory(self.device, record, dtypes.move(tensor, target))
            return
        if self._try_make_room(self.host, record.nbytes):
            self._put_memory(self.host, record, self._host_copy(tensor))
            return
        self._write_disk(record, self._host_copy(tensor))

    def _host_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        return dtypes.to_host(tensor, pin=self._pin_host)

    def _put_memory(self, tier: MemoryTier, record: TensorRecord, tensor: torch.Tensor) -> None:
        tier.put(record.rid, tensor)
        self._policies[tier.name].insert(record.rid)
        record.resident = tier.name

    # ------------------------------------------------------------- eviction

    def _try_make_room(self, tier: MemoryTier, nbytes: int) -> bool:
        """Move victims down until ``nbytes`` fit; False if they cannot."""
        if not tier.can_ever_hold(nbytes):
            return False
        try:
            for rid in self._policies[tier.name].victims():
                if tier.has_room(nbytes):
                    break
                self._demote(self._records[rid])
        except CapacityError:
            return False
        return tier.has_room(nbytes)

    def _demote(self, record: TensorRecord) -> None:
        """Move a record's primary copy one tier down (device -> host -> disk)."""
        tier = self._memory_tier(record.resident)
        tensor = tier.get(record.rid)
        if tier is self.device and self._try_make_room(self.host, record.nbytes):
            self._put_memory(
                self.host, record, dtypes.compact_copy(tensor, CPU, pin=self._pin_host)
            )
        elif not record.on_disk:
            self._write_disk(record, self._host_copy(tensor))
        tier.pop(record.rid)
        self._policies[tier.name].remove(record.rid)
        if record.resident == tier.name:
            record.resident = None
        self.counters[f"evictions.{tier.name}"] += 1

    def _write_disk(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        if self.disk is None:
            raise CapacityError(
                f"no room for {record.nbytes} bytes: the host tier is full and there is no "
                "disk tier; raise host_bytes or set disk_path"
            )
        self._make_disk_room(record.nbytes)
        self.disk.put(record.rid, tensor.contiguous())
        record.on_disk = True
        self.counters["disk.bytes_written"] += record.nbytes

    def _make_disk_room(self, nbytes: int) -> None:
        disk = self.disk
        if disk.has_room(nbytes):
            return
        clean = [rid for rid in disk if self._records[rid].resident is not None]
        reclaimable = sum(self._records[rid].nbytes for rid in clean)
        if not disk.can_ever_hold(nbytes) or disk.nbytes - reclaimable + nbytes > disk.budget:
            raise CapacityError(
                f"no room for {nbytes} bytes: the disk tier holds {disk.nbytes} of its "
                f"{disk.budget} byte budget; raise disk_bytes (or host_bytes)"
            )
        # Drop disk copies of records that are also in memory: they are only copies.
        for rid in clean:
            disk.pop(rid)
            self._records[rid].on_disk = False
            if disk.has_room(nbytes):
                return

    # ----------------------------------------------------------------- read

    def load(self, record: TensorRecord) -> torch.Tensor:
        """The record's value on its onload device, promoted to the host tier if read from disk."""
        if record.resident is not None:
            tier = self._memory_tier(record.resident)
            self._policies[tier.name].touch(record.rid)
            self.counters[f"hits.{tier.name}"] += 1
            tensor = tier.get(record.rid)
        else:
            pin = self._pin_host and record.onload_device.type != "cpu"
            tensor = self.disk.get(record.rid, record.shape, record.dtype, pin=pin)
            self.counters["hits.disk"] += 1
            self.counters["disk.bytes_read"] += record.nbytes
            try:
                if self._try_make_room(self.host, record.nbytes):
                    self._put_memory(self.host, record, tensor)
            except StoreError:
                # Promotion is optional and the value was read: a failing disk write
                # while making room is reported by the next update, not by this read.
                pass
        return dtypes.onload(tensor, record.onload_device, record.requires_grad)

    # -------------------------------------------------------------- release

    def release(self, records: Sequence[TensorRecord]) -> None:
        """Drop one reference per item; a record with none left is deleted everywhere."""
        for record in records:
            record.refs -= 1
            if record.refs == 0:
                self._discard(record)

    def _discard(self, record: TensorRecord) -> None:
        if record.resident is not None:
            self._memory_tier(record.resident).pop(record.rid)
            self._policies[record.resident].remove(record.rid)
            record.resident = None
        if record.on_disk:
            self.disk.pop(record.rid)
            record.on_disk = False
        self._records.pop(record.rid, None)
        found = self._identity.get(record.identity)
        if found is not None and found[1] is record:
            del self._identity[record.identity]

    # ------------------------------------------------------------ reporting

    def memory_by_device(self) -> dict[torch.device, int]:
        sizes = self.device.bytes_by_device()
        for device, nbytes in self.host.bytes_by_device().items():
            sizes[device] = sizes.get(device, 0) + nbytes
        return sizes

    def persist(self, *, durable: bool) -> None:
        """Give every record a disk copy (for keep_store), whatever disk_bytes says."""
        for record in list(self._records.values()):
            if not record.on_disk:
                tensor = self._memory_tier(record.resident).get(record.rid)
                self.disk.put(record.rid, self._host_copy(tensor).contiguous(), durable=durable)
                record.on_disk = True
