"""The tiers, and the policies that choose what leaves them first.

The tiers are plain containers of record ids with a byte budget: the device and host
tiers hold tensors (``MemoryTier``); the disk tier holds the sizes of the arrays on one
or more disks, and how much room each disk has left (``DiskTier``). They never call
each other, start threads or take locks; placement decides what moves where (see
``spillcache._internal.engine.placement``).

Eviction policies are small objects that only decide which record leaves a tier first.
A policy sees record ids come (``insert``, with the batch they belong to), get used
(``touch``) and go (``remove``), hears where the reader is (``reached``), and answers
``victims()`` (its ids, first choice first) and ``scored()`` (the same with scores that
compare across caches; ``bypass_score(batch)``: the score a victim must beat to make
room for a record of ``batch``). It never moves data; the placement does. Two policies:

- ``lru``: least recently used first. The classic, and the worst case for the
  sequential pipeline: it reads batches 0..N-1 over and over, and a cyclic scan larger
  than the tier makes LRU evict each batch just before it is needed again.
- ``scan``: evict the record whose next use is furthest away (Belady's rule), with the
  next use predicted from the cyclic order: after batch p comes p+1, ..., N-1, 0, ...,
  p. A new record whose next use is further than every resident one is not worth any
  eviction (``victims`` is empty: it bypasses the tier), and a value read back from
  disk only takes free room (``promotes_by_eviction`` is False). A tier that holds C of
  N batches then keeps a stable set of C batches resident and streams the rest, saving
  C/N of the disk reads of every pass, where LRU saves none.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Generic, NamedTuple, Protocol, TypeVar

import torch

from ..store.store_format import chunk_bytes

__all__ = [
    "BudgetedTier",
    "DiskTier",
    "EvictionPolicy",
    "LRUPolicy",
    "MemoryTier",
    "POLICIES",
    "Reading",
    "ScanPolicy",
    "footprint",
    "make_policy",
    "merged_victims",
]

Item = TypeVar("Item")


class BudgetedTier(Generic[Item]):
    """Items by record id with a running byte count against a budget (``None``: no limit)."""

    def __init__(self, budget: int | None) -> None:
        self.budget = budget
        self._items: dict[int, Item] = {}
        self._nbytes = 0
        self.peak = 0  # the most bytes it has held at once

    def __contains__(self, rid: int) -> bool:
        return rid in self._items

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[int]:
        # A snapshot: callers evict while iterating.
        return iter(list(self._items))

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def can_ever_hold(self, nbytes: int) -> bool:
        return self.budget is None or nbytes <= self.budget

    def has_room(self, nbytes: int) -> bool:
        return self.budget is None or self._nbytes + nbytes <= self.budget

    def _add(self, rid: int, item: Item, nbytes: int) -> None:
        if rid in self._items:
            raise KeyError(f"record {rid} is already in the {self.name} tier")
        self._items[rid] = item
        self._nbytes += nbytes
        self.peak = max(self.peak, self._nbytes)

    def _remove(self, rid: int, nbytes: int) -> Item:
        item = self._items.pop(rid)
        self._nbytes -= nbytes
        return item


class MemoryTier(BudgetedTier[torch.Tensor]):
    """Tensors by record id, with a byte budget (``None``: no limit).

    ``room``: the bytes a value of ``nbytes`` takes (its arena slot, for the host tier),
    which its budget counts; default, ``nbytes``.
    """

    def __init__(
        self, name: str, budget: int | None, room: Callable[[int], int] | None = None
    ) -> None:
        super().__init__(budget)
        self.name = name
        self.room = room or int

    def can_ever_hold(self, nbytes: int) -> bool:
        return super().can_ever_hold(self.room(nbytes))

    def has_room(self, nbytes: int) -> bool:
        return super().has_room(self.room(nbytes))

    def put(self, rid: int, tensor: torch.Tensor) -> None:
        self._add(rid, tensor, self.room(tensor.nbytes))

    def get(self, rid: int) -> torch.Tensor:
        return self._items[rid]

    def pop(self, rid: int) -> torch.Tensor:
        return self._remove(rid, self.room(self._items[rid].nbytes))


# Disks whose free space is within this much of the freest one count as equally free.
_EQUAL_FREE_FRACTION = 0.01
_EQUAL_FREE_BYTES = 64 * 2**20

_BLOCK = 4096  # the largest filesystem block an array's files are rounded up to


def footprint(nbytes: int) -> int:
    """Disk space one array of ``nbytes`` may take: its chunk file (with a checksum
    trailer) rounded up to whole blocks, plus its directory, its zarr.json and that
    file's ``.partial`` twin while it is renamed into place."""
    return -(-chunk_bytes(nbytes, checksum=True) // _BLOCK) * _BLOCK + 3 * _BLOCK


class Reading(NamedTuple):
    """One free-space reading of a disk (a statvfs, made outside the pool's lock)."""

    free: int  # bytes the filesystem still gives an unprivileged process
    mark: int  # DiskTier.finished[disk] just before it was read
    shown: int = 0  # footprints of writes it shows that were not ``written`` yet


class _Full(NamedTuple):
    """A write to the disk failed for lack of space."""

    free: int  # bytes free just after it failed
    needed: int  # the footprint of the value it was writing


class DiskTier(BudgetedTier[int]):
    """Sizes of the tensors it holds on disk, by record id (``None`` budget: no limit
    over all disks together), and the room left on each disk.

    A tensor's bytes are *reserved* when its background write is queued, so the budget
    holds while writes are in flight. The files themselves are in each cache's stores
    (``Tenant.store_on``), one per disk; writing, reading and deleting them is the
    cache's, on its I/O threads.

    Room is tracked without a system call under the pool's lock: the pool reads each
    disk's free space (``writes_counted``, then a statvfs) before it takes the lock
    and hands the readings in (``observe``); a disk's room is then its last reading
    less the writes queued or running there and those finished since the reading, but
    for those whose bytes were on disk when it was read (``landed`` says so without
    the lock).
    A disk where a write failed for lack of space takes nothing more until a reading
    shows room for that write beyond what was free when it failed.

    :param disks: how many disk directories there are (``disk_path`` may list several)
    :param paths: the disk directories, for messages
    """

    name = "disk"

    def __init__(
        self,
        budget: int | None,
        disks: int = 1,
        paths: list[str] | None = None,
    ) -> None:
        super().__init__(budget)
        self.disks = disks
        self.paths = paths or [f"disk {index}" for index in range(disks)]
        self._disk_of: dict[int, int] = {}
        self.bytes_on = [0] * disks  # reserved bytes per disk
        self.last_chosen = -1  # the disk chosen last, for round-robin among equals
        self._writing: dict[int, int] = {}  # rid -> footprint, of writes queued or running
        self.writing_on = [0] * disks  # their footprints, per disk
        self.finished = [0] * disks  # footprints of writes ended (or dropped), ever
        self._landed: set[int] = set()  # writes whose bytes are on disk, not yet ``written``
        self._readings: list[Reading | None] = [None] * disks
        self.full: dict[int, _Full] = {}  # disks refused since a write failed for space

    # ------------------------------------------------------------ free space

    def writes_counted(self, disk: int) -> tuple[int, int]:
        """Lock NOT held, just before disk ``disk``'s free space is read: the writes
        finished there so far, and the footprints of those whose bytes have landed
        (the reading shows them): a ``Reading``'s ``mark`` and ``shown``. In this
        order, so that a write ending meanwhile may count twice, never not at all."""
        mark = self.finished[disk]
        landed = set(self._landed)  # one C call: atomic against the writers' add
        shown = sum(self._writing.get(rid, 0) for rid in landed if self.disk_of(rid) == disk)
        return mark, shown

    def observe(self, readings: list[Reading | None]) -> None:
        """Lock held: take readings of every disk (``None``: not read)."""
        # A write taken back while it ran (a kept store's close) is never ``written``.
        self._landed.intersection_update(self._writing)
        for disk, reading in enumerate(readings):
            if reading is None:
                continue
            self._readings[disk] = reading
            full = self.full.get(disk)
            if full is not None and reading.free >= full.free + full.needed:
                del self.full[disk]  # space was freed: try that disk again

    def room(self, disk: int) -> int | None:
        """Bytes new arrays may still take on ``disk``; None: not known yet."""
        reading = self._readings[disk]
        if reading is None:
            return None
        ended = self.finished[disk] - reading.mark
        return reading.free - self.writing_on[disk] - ended + reading.shown

    def fits(self, disk: int, nbytes: int) -> bool:
        room = self.room(disk)
        return disk not in self.full and (room is None or room >= footprint(nbytes))

    def mark_full(self, disk: int, reading: Reading | None, nbytes: int) -> None:
        """A write of ``nbytes`` to ``disk`` failed for lack of space; ``reading`` was
        taken just after (None: unknown)."""
        full = _Full(0 if reading is None else reading.free, footprint(nbytes))
        known = self.full.get(disk)
        # Writes failing together report back in any order: the highest bar stands.
        if known is None or sum(full) > sum(known):
            self.full[disk] = full

    def why_full(self, disk: int, nbytes: int) -> str:
        """Why ``disk`` cannot take ``nbytes`` now, for DiskFullError."""
        path = self.paths[disk]
        full = self.full.get(disk)
        if full is not None:
            reading = self._readings[disk]
            now = "not read since" if reading is None else f"{_size(reading.free)} now"
            return (
                f"{path}: a write there failed for lack of space (ENOSPC) with "
                f"{_size(full.free)} free; nothing more goes there until "
                f"{_size(full.free + full.needed)} are free ({now})"
            )
        reading = self._readings[disk]
        room = self.room(disk)
        return (
            f"{path}: {_size(max(room, 0))} free for new values ({_size(reading.free)} free "
            f"on the filesystem, less {_size(reading.free - room)} for writes in flight or just "
            f"done), "
            f"{_size(footprint(nbytes))} needed"
        )

    # ------------------------------------------------------------ placement

    def choose(self, nbytes: int = 0, exclude: Collection[int] = ()) -> int | None:
        """The disk for a new tensor of ``nbytes``: of those with room for it (and not
        in ``exclude``), the one with the most, round-robin among disks about as free as
        it (so identical drives take turns). None if no disk has room."""
        candidates = [
            disk for disk in range(self.disks) if disk not in exclude and self.fits(disk, nbytes)
        ]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        room = [self.room(disk) or 0 for disk in range(self.disks)]
        most = max(room[disk] for disk in candidates)
        slack = max(_EQUAL_FREE_BYTES, int(most * _EQUAL_FREE_FRACTION))
        for step in range(1, self.disks + 1):
            disk = (self.last_chosen + step) % self.disks
            if disk in candidates and room[disk] >= most - slack:
                self.last_chosen = disk
                return disk
        raise AssertionError("the freest disk is always a candidate")

    def reserve(self, rid: int, nbytes: int, disk: int = 0, *, writing: bool = False) -> None:
        """Count ``nbytes`` on ``disk`` for a tensor whose file is about to be written;
        ``writing``: by a background write, whose space the disk's readings do not show
        until it is ``written``."""
        self._add(rid, nbytes, nbytes)
        self._disk_of[rid] = disk
        self.bytes_on[disk] += nbytes
        if writing:
            self._writing[rid] = footprint(nbytes)
            self.writing_on[disk] += self._writing[rid]

    def landed(self, rid: int) -> None:
        """Without the pool's lock, on the writing thread: the write's bytes are on disk."""
        self._landed.add(rid)

    def disk_of(self, rid: int) -> int:
        return self._disk_of.get(rid, -1)

    def written(self, rid: int, *, ran: bool = True) -> None:
        """The background write of a reserved tensor ended (or will never run; ``ran``
        False: it was taken back before it started, so no reading can show its bytes)."""
        self._landed.discard(rid)  # first: see writes_counted
        size = self._writing.pop(rid, 0)
        disk = self._disk_of[rid]
        self.writing_on[disk] -= size
        if ran:
            self.finished[disk] += size

    def unreserve(self, rid: int, *, ran: bool = True) -> None:
        """Forget a reservation (its file was never written, or is deleted; ``ran``: see
        ``written``)."""
        self.written(rid, ran=ran)
        nbytes = self._items[rid]
        self._remove(rid, nbytes)
        self.bytes_on[self._disk_of.pop(rid)] -= nbytes


def _size(nbytes: int) -> str:
    unit, scale = ("GiB", 2**30) if abs(nbytes) >= 2**30 else ("MiB", 2**20)
    return f"{nbytes} bytes ({nbytes / scale:.1f} {unit})"


class EvictionPolicy(Protocol):
    """What placement asks of a policy; it knows no policy's rules beyond these."""

    name: str
    promotes_by_eviction: bool  # may a value read from disk evict others to come up?

    def __contains__(self, rid: int) -> bool: ...
    def __len__(self) -> int: ...
    def insert(self, rid: int, batch: int = 0) -> None: ...
    def touch(self, rid: int) -> None: ...
    def remove(self, rid: int) -> None: ...
    def reached(self, batch: int, num_batches: int) -> None: ...
    def resized(self, num_batches: int) -> None: ...
    def victims(self) -> Iterator[int]: ...
    def scored(self) -> list[tuple[float, int]]: ...
    def bypass_score(self, for_batch: int) -> float: ...


# One clock for every LRU policy of the process: recency is comparable across caches.
_lru_clock = itertools.count()


class LRUPolicy:
    """Least recently used first."""

    name = "lru"
    promotes_by_eviction = True

    def __init__(self) -> None:
        self._order: OrderedDict[int, int] = OrderedDict()  # rid -> tick of its last use

    def __contains__(self, rid: int) -> bool:
        return rid in self._order

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, rid: int, batch: int = 0) -> None:
        self._order[rid] = next(_lru_clock)
        self._order.move_to_end(rid)

    def touch(self, rid: int) -> None:
        if rid in self._order:
            self._order[rid] = next(_lru_clock)
            self._order.move_to_end(rid)

    def remove(self, rid: int) -> None:
        self._order.pop(rid, None)

    def reached(self, batch: int, num_batches: int) -> None:
        """LRU learns the order from touches alone."""

    def resized(self, num_batches: int) -> None:
        """LRU does not need to know how many batches there are."""

    def victims(self) -> Iterator[int]:
        # A snapshot: the caller evicts while iterating.
        return iter(list(self._order))

    def scored(self) -> list[tuple[float, int]]:
        """(score, rid), first victim first; scores compare across policies of one
        kind (higher: evict sooner). Here: the older the last use, the higher."""
        return [(-tick, rid) for rid, tick in self._order.items()]

    def bypass_score(self, for_batch: int) -> float:
        """A newcomer of ``for_batch`` may evict only records scoring above this."""
        return float("-inf")


class ScanPolicy:
    """Furthest next use first, for a reader that cycles through batches in order."""

    name = "scan"
    promotes_by_eviction = False

    def __init__(self) -> None:
        self._batch_of: dict[int, int] = {}
        self._by_batch: dict[int, dict[int, None]] = {}
        # The batch the reader took last; -1 before any read, so batch 0 is next.
        self._position = -1
        self._num_batches = 0

    def __contains__(self, rid: int) -> bool:
        return rid in self._batch_of

    def __len__(self) -> int:
        return len(self._batch_of)

    def insert(self, rid: int, batch: int = 0) -> None:
        self.remove(rid)
        self._num_batches = max(self._num_batches, batch + 1)
        self._batch_of[rid] = batch
        self._by_batch.setdefault(batch, {})[rid] = None

    def touch(self, rid: int) -> None:
        """The next use of a record follows from its batch, not from when it was used."""

    def remove(self, rid: int) -> None:
        batch = self._batch_of.pop(rid, None)
        if batch is None:
            return
        members = self._by_batch[batch]
        del members[rid]
        if not members:
            del self._by_batch[batch]

    def reached(self, batch: int, num_batches: int) -> None:
        self._position = batch
        self._num_batches = num_batches

    def resized(self, num_batches: int) -> None:
        """The cache now has ``num_batches`` batches (the reader has not moved)."""
        self._num_batches = num_batches

    def distance(self, batch: int) -> int:
        """Reads until ``batch`` is read next: 1 for the next batch, N for the one just read."""
        count = max(self._num_batches, batch + 1, self._position + 1, 1)
        return (batch - self._position - 1) % count + 1

    def victims(self) -> Iterator[int]:
        # A snapshot: the caller evicts while iterating.
        order = sorted(self._by_batch, key=self.distance, reverse=True)
        return iter([rid for batch in order for rid in self._by_batch[batch]])

    def _cycle_fraction(self, batch: int) -> float:
        # Distances of caches with different batch counts compare as fractions of a pass.
        return self.distance(batch) / max(self._num_batches, self._position + 1, 1)

    def scored(self) -> list[tuple[float, int]]:
        """(score, rid), first victim first; scores compare across scan policies
        (higher: evict sooner). Here: how far into a pass the next use is."""
        order = sorted(self._by_batch, key=self.distance, reverse=True)
        return [
            (self._cycle_fraction(batch), rid) for batch in order for rid in self._by_batch[batch]
        ]

    def bypass_score(self, for_batch: int) -> float:
        """A newcomer of ``for_batch`` may evict only records needed later than itself."""
        return self._cycle_fraction(for_batch)


def merged_victims(
    policies: Iterable[EvictionPolicy], limit: float = float("-inf")
) -> Iterator[int]:
    """Victims over several caches' policies of one kind, first victim first: the
    record whose score is highest wherever it lives (only those scoring above
    ``limit``). A snapshot, safe to evict from while iterating."""
    ranked = heapq.merge(*(policy.scored() for policy in policies), key=lambda s: -s[0])
    return iter([rid for score, rid in ranked if score > limit])


# The default first: config lists the choices in this order.
POLICIES = {policy.name: policy for policy in (ScanPolicy, LRUPolicy)}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; choose one of {', '.join(POLICIES)}"
        ) from None
