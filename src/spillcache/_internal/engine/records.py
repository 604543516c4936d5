"""The records a cache keeps: ``TensorRecord``, one tiered tensor as placement tracks
it; ``Entry``, what a batch holds under one key; ``InlineTensor``, a tensor kept with
its entry; ``WriteBehind``, the values on their way to disk.

A ``TensorRecord`` is stored once however many entries share it (``refs``), with its
primary copy in a memory tier (``resident``), in the write-behind area (``write_state``)
or only on disk (``on_disk``, in ``array`` on disk ``disk``). ``placement`` moves it; the
cache and its reads only look at it, with the pool's lock held.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from ..io.arena import Arena
    from .tenants import Tenant

__all__ = [
    "Admission",
    "Entry",
    "InlineTensor",
    "RecordRegistry",
    "TensorRecord",
    "Tier",
    "WriteBehind",
    "WriteState",
    "records_of",
]


class Tier(StrEnum):
    """The memory tier holding a record's value (``TensorRecord.resident``; None: neither).
    Also each ``MemoryTier``'s name and its counters' prefix ("host.evictions")."""

    DEVICE = "device"
    HOST = "host"


class WriteState(StrEnum):
    """Where a record's pending disk write stands (``TensorRecord.write_state``; None:
    none pending)."""

    QUEUED = "queued"  # in the write-behind area, not yet handed to a thread
    WRITING = "writing"  # handed to a thread


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
    key: str | None = None  # the key it was stored under, recorded in its array's attributes
    refs: int = 0
    on_disk: bool = False
    resident: Tier | None = None  # None when not in a memory tier
    write_state: WriteState | None = None  # None: no pending write
    loading: Future | None = None  # a disk read in flight; others wait on it
    alive: bool = True
    identity: int = 0  # id() of the tensor it was stored from, for sharing
    tenant: Tenant | None = field(default=None, repr=False)  # the cache it belongs to
    array: str = ""  # the store array holding its disk copy (a new name for every write)
    disk: int = 0  # which of the disk directories that array is on
    disk_writes: int = 0
    # Why its last disk write failed; set while it waits in the host tier, unwritten.
    write_error: BaseException | None = field(default=None, repr=False)

    @property
    def owner(self) -> tuple[int, str] | None:
        """(batch, key) its array records in its attributes; None where the key is not known."""
        return None if self.key is None else (self.batch, self.key)


class Admission(NamedTuple):
    """One tensor for ``Placement.admit`` to store: the value stored (the caller's
    tensor, or a copy of it made before the lock), the device it is returned on, the
    caller's tensor where ``tensor`` is a copy (what sharing compares), a label for
    errors ("batch 3, key 'hidden'") and the key it is stored under."""

    tensor: torch.Tensor
    onload_device: torch.device
    original: torch.Tensor | None = None
    label: str | None = None
    key: str | None = None


class InlineTensor(NamedTuple):
    """A tensor kept with its entry in RAM: too small to tier, or not tierable."""

    tensor: torch.Tensor
    onload_device: torch.device
    requires_grad: bool


@dataclass
class Entry:
    """One key of a batch: the value's spec (``tree.flatten``), its tensor leaves in
    order (tiered records or inline tensors), and its opaque leaves. Never mutated:
    ``update`` replaces the whole entry, so readers may use one outside the lock."""

    spec: tuple
    leaves: list[TensorRecord | InlineTensor]
    opaques: list[Any]


def records_of(entry: Entry) -> Iterable[TensorRecord]:
    return (leaf for leaf in entry.leaves if isinstance(leaf, TensorRecord))


class RecordRegistry:
    """Every record of a pool by number, and the tensor each new one was stored from
    (so that the same tensor stored again shares its record). Numbers name the records'
    arrays on disk: a reopened store's names are skipped."""

    def __init__(self) -> None:
        self._records: dict[int, TensorRecord] = {}
        # (tenant number, id(tensor)) -> the record it was stored as, for sharing.
        self._identity: dict[tuple[int, int], tuple[weakref.ref, TensorRecord]] = {}
        self.next_rid = 0
        # tenant number -> [bytes of its records now, the most since values_held reset it]
        self._held: dict[int, list[int]] = {}

    def __getitem__(self, rid: int) -> TensorRecord:
        return self._records[rid]

    def get(self, rid: int) -> TensorRecord | None:
        return self._records.get(rid)

    def values(self) -> Iterable[TensorRecord]:
        return self._records.values()

    def of(self, tenant: Tenant) -> list[TensorRecord]:
        return [record for record in self._records.values() if record.tenant is tenant]

    def add(self, tensor: torch.Tensor | None = None, **fields: Any) -> TensorRecord:
        """A new record with the next number; ``tensor``: the one it is stored from."""
        record = TensorRecord(rid=self.next_rid, **fields)
        self.next_rid += 1
        self._records[record.rid] = record
        if record.tenant is not None:
            held = self._held.setdefault(record.tenant.number, [0, 0])
            held[0] += record.nbytes
            held[1] = max(held[1], held[0])
        if tensor is not None:
            key = (record.tenant.number, id(tensor))
            self._identity[key] = (weakref.ref(tensor), record)
        return record

    def shared(
        self, tenant: Tenant, tensor: torch.Tensor, onload_device: torch.device
    ) -> TensorRecord | None:
        """The record ``tensor`` was stored as, if it goes back to the same place: a
        record gives one onload device and one ``requires_grad`` to every entry."""
        found = self._identity.get((tenant.number, id(tensor)))
        if found is None or found[0]() is not tensor:
            return None
        record = found[1]
        if (record.onload_device, record.requires_grad) != (onload_device, tensor.requires_grad):
            return None
        return record

    def skip(self, names: list[str]) -> None:
        """New records must not be named like arrays already in the store."""
        taken = [int(name.split(".")[0]) for name in names if name.split(".")[0].isdigit()]
        self.next_rid = max([self.next_rid, *(number + 1 for number in taken)])

    def values_held(self, tenant: Tenant, *, reset_peak: bool) -> tuple[int, int]:
        """Bytes of ``tenant``'s records now (each once, wherever it is), and the most
        they were since the last ``reset_peak`` (then the count starts again from now)."""
        held = self._held.get(tenant.number, [0, 0])
        found = (held[0], held[1])
        if reset_peak:
            held[1] = held[0]
        return found

    def held_peaks(self) -> dict[int, int]:
        """Each tenant's peak now, for ``restore_peaks`` when a transaction is undone."""
        return {number: held[1] for number, held in self._held.items()}

    def restore_peaks(self, peaks: dict[int, int]) -> None:
        """The peaks as ``held_peaks`` saw them (a tenant counted since then: as now)."""
        for number, held in self._held.items():
            held[1] = peaks.get(number, held[0])

    def forget_tenant(self, tenant: Tenant) -> None:
        """A closed cache's byte counts go (its records went before)."""
        self._held.pop(tenant.number, None)

    def forget(self, record: TensorRecord) -> None:
        if self._records.pop(record.rid, None) is not None and record.tenant is not None:
            self._held[record.tenant.number][0] -= record.nbytes
        key = (record.tenant.number, record.identity)
        found = self._identity.get(key)
        if found is not None and found[1] is record:
            del self._identity[key]


# -------------------------------------------------------------- write-behind


class WriteBehind:
    """The write-behind area of a pool: values on their way to disk, in RAM until their
    write lands, so that ``update`` never waits for the device.

    A value enters when placement spills it (``queue``); the pool hands the queued
    writes to the I/O threads (``take_queued``); each leaves when its write is over or
    no longer wanted (``leave``). A read of a value still here is served from it.
    ``unwritten_bytes`` counts values whose write failed: they went back to the host
    tier, readable, and are written again only if evicted again.
    """

    def __init__(
        self, budget: int, arena: Arena | None = None, room: Callable[[int], int] = int
    ) -> None:
        # The most a *read* may push in when it promotes a value (updates wait for room
        # before they store: the cache's backpressure), in the bytes ``room`` says a
        # value takes (its arena slot), as the host tier counts them.
        self.budget = budget
        self.room = room
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
        return self.nbytes + self.room(nbytes) <= self.budget

    def queue(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        """``record``'s value waits here for its disk write, now queued."""
        self._values[record.rid] = tensor
        self.nbytes += self.room(record.nbytes)
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

    def leave(self, record: TensorRecord, *, job_ends: bool = False) -> torch.Tensor | None:
        """``record``'s value leaves the area (its write is over, or no longer wanted),
        and its counts go; the value, if it was here. ``job_ends``: the write's own job
        reports its end to the arena, once it has let go of the value (else it is
        reported here: no job will run, or one was cancelled)."""
        tensor = self._values.pop(record.rid, None)
        if record.write_state in (WriteState.QUEUED, WriteState.WRITING):
            if record.write_state == WriteState.QUEUED:
                self._queued.remove(record)
            self.nbytes -= self.room(record.nbytes)
            record.tenant.writes_in_flight -= 1
            if self._arena is not None and not job_ends:
                self._arena.returned_expected()
        record.write_state = None
        return tensor
