"""One cache's share of a pool: its store, its reader, its counters and its errors.

Caches of one process built with one config share a pool (``runtime/pool.py``): one
host tier, one write-behind area, one read-buffer pool, one set of I/O threads. What
stays each cache's own is a ``Tenant``: the store its values are written to, the
eviction policies that know where its reader is, when it was last used (so that a
cache nobody uses loses its values first), its counters, and the background writes
that failed and are not yet reported to its caller.

Not thread-safe: every field is read and written with the pool's lock held.
"""

from __future__ import annotations

import errno
import itertools
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from ..store.failures import WriteFailure, errno_of
from ..store.tensor_store import TensorStore
from .tiers import make_policy, merged_victims

__all__ = [
    "TIERS",
    "TIER_COUNTERS",
    "Counters",
    "KeptStructures",
    "Tenant",
    "Tenants",
    "TierCounters",
]

_numbers = itertools.count()


@dataclass
class TierCounters:
    """What one tier counts for a cache (or a pool)."""

    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0


TIERS = ("device", "host", "disk")  # the tiers ``stats()`` reports, in order
# What ``stats()`` gives for each tier (besides bytes held and budget), in order.
TIER_COUNTERS = tuple(counter.name for counter in fields(TierCounters))


@dataclass
class Counters:
    """A cache's counts (each ``Tenant``'s), or a pool's over all its caches."""

    device: TierCounters = field(default_factory=TierCounters)
    host: TierCounters = field(default_factory=TierCounters)
    disk: TierCounters = field(default_factory=TierCounters)
    write_behind_hits: int = 0  # reads served from values waiting for their disk write

    def of(self, tier: str) -> TierCounters:
        return {"device": self.device, "host": self.host, "disk": self.disk}[tier]

    def copy(self) -> Counters:
        return Counters(
            replace(self.device), replace(self.host), replace(self.disk), self.write_behind_hits
        )

    def restore(self, saved: Counters) -> None:
        """Take the counts of ``saved`` (a ``copy()``): a failed admit counted nothing."""
        self.device, self.host, self.disk = (
            replace(saved.device),
            replace(saved.host),
            replace(saved.disk),
        )
        self.write_behind_hits = saved.write_behind_hits

    # What placement counts, one method a kind of event.

    def hit(self, tier: str, nbytes: int) -> None:
        counters = self.of(tier)
        counters.hits += 1
        counters.bytes_read += nbytes

    def missed(self, tier: str) -> None:
        self.of(tier).misses += 1

    def wrote(self, tier: str, nbytes: int) -> None:
        self.of(tier).bytes_written += nbytes

    def evicted(self, tier: str) -> None:
        self.of(tier).evictions += 1

    def write_behind_hit(self) -> None:
        self.write_behind_hits += 1

    def names(self) -> dict[str, int]:
        """The counts that are not zero, as ``"tier.counter"`` names (the pool's
        ``stats()["pool"]["counters"]``)."""
        named = {
            f"{tier}.{counter}": getattr(self.of(tier), counter)
            for tier in ("device", "host", "disk")
            for counter in TIER_COUNTERS
        }
        named["write_behind.hits"] = self.write_behind_hits
        return {name: count for name, count in named.items() if count}


@dataclass
class KeptStructures:
    """What a kept store's cache knows of the structures on its disk (persist.py keeps
    it up to date). Guarded by the pool's lock."""

    named: set[str] = field(default_factory=set)  # arrays structures on disk may name
    deferred: set[str] = field(default_factory=set)  # deletions waiting for new structures
    unowned: set[str] = field(default_factory=set)  # arrays a flush wrote that no record holds
    # Small tensors a flush wrote, by id(leaf): (leaf, array). The leaf is held so that
    # its id is not reused while it is here.
    inline: dict[int, tuple[Any, str]] = field(default_factory=dict)  # records.InlineTensor
    flushing: bool = False
    flush: int = 0  # the last flush whose structures are all on disk (the root says so)
    # Each batch's structure as that flush recorded it: (the flush that wrote it, JSON).
    committed: dict[int, tuple[int, dict]] = field(default_factory=dict)
    # A flush failed half-way: batches on disk may hold what it wrote, so the next one
    # rewrites them all rather than skip those that look unchanged.
    rewrite_all: bool = False
    # Arrays only the flush before the last names, kept by a flush with keep_previous
    # until release_previous (or the next flush, or close).
    previous: set[str] = field(default_factory=set)
    # What the flush before the last named and the last does not, while it is kept: a
    # deletion queued before the last flush may reach the pool after it.
    previous_named: set[str] = field(default_factory=set)

    def defers_deletion(self, name: str) -> bool:
        """Whether deleting ``name`` must wait, because structures on disk may name it;
        if so it is deleted by the next flush or close."""
        if name in self.named:
            self.deferred.add(name)
        elif name in self.previous_named:
            self.previous.add(name)
        else:
            return False
        return True


class Tenant:
    """One cache in a pool.

    :param disk_tier: whether its values may go to disk; its store on a disk is made
        (outside the pool's lock, by the pool's transaction) the first time one does
    :param eviction: the eviction policy's name (``policy.POLICIES``)
    :param device_target: the accelerator its device-tier values move to, or ``None``
        to keep them on their own device
    :param device_tier: whether its values may stay in the device tier at all (not
        when offloading to the CPU with ``device_bytes = "auto"``: the stock behaviour)
    """

    def __init__(
        self,
        disk_tier: bool,
        eviction: str,
        *,
        device_target: torch.device | None = None,
        device_tier: bool = True,
    ) -> None:
        self.number = next(_numbers)
        self._disk_tier = disk_tier
        self._stores: dict[int, TensorStore] = {}  # by disk (disk_path may list several)
        self.policies = {"device": make_policy(eviction), "host": make_policy(eviction)}
        self.device_target = device_target
        self.device_tier = device_tier
        self.counters = Counters()
        self.last_used = 0  # the pool's clock when the cache was last used
        # A kept store's structures on disk, from its first flush (persist.py).
        self.kept: KeptStructures | None = None
        self.num_batches = 0
        self.writes_in_flight = 0  # its values queued or being written
        self.write_failures: list[WriteFailure] = []  # not yet reported to its caller
        self.broken: dict[int, WriteFailure] = {}  # disks it writes nothing more to, and why
        self.deleting: set[str] = set()  # arrays whose background deletion is not done
        # Its work on the pool's threads. Weak: a finished job (a prefetch holds the
        # values it read) must not be kept alive here, and one queued or running is
        # held by the pool.
        self._jobs: weakref.WeakSet[Future] = weakref.WeakSet()
        self.closed = False

    def __repr__(self) -> str:
        return f"Tenant({self.number})"

    # ----------------------------------------------------------------- store

    @property
    def has_disk(self) -> bool:
        return self._disk_tier or bool(self._stores)

    def has_store_on(self, disk: int) -> bool:
        return disk in self._stores

    def store_on(self, disk: int) -> TensorStore:
        """The cache's store on ``disk``; placement sends nothing to a disk before the
        store there is made (``attach``)."""
        return self._stores[disk]

    @property
    def store(self) -> TensorStore:
        """Its first store made, by disk: the only one unless disk_path lists several
        (a kept store's is on the first disk)."""
        return self.stores[0]

    @property
    def has_store(self) -> bool:
        return bool(self._stores)

    @property
    def stores(self) -> list[TensorStore]:
        """The stores made so far, by disk."""
        return [self._stores[disk] for disk in sorted(self._stores)]

    def attach(self, store: TensorStore, disk: int = 0) -> None:
        """Use ``store`` on ``disk``: one just made, or a reopened cache's."""
        self._stores[disk] = store

    def detach(self, disk: int) -> TensorStore:
        """Stop using the store on ``disk`` (the caller removes it)."""
        return self._stores.pop(disk)

    def write_failed(self, disk: int, failure: WriteFailure) -> None:
        """A background write of one of its values failed: the caller's next call
        reports it. A disk whose write failed for another reason than space (which the
        disk tier tracks: it comes back) takes none of its values any more: a disk that
        fails writes (EIO), a store removed underneath, a directory made read-only."""
        self.write_failures.append(failure)
        if errno_of(failure.error) != errno.ENOSPC:
            self.broken.setdefault(disk, failure)

    def take_write_failures(self) -> list[WriteFailure]:
        """The failures not yet reported, now the caller's to report."""
        failures, self.write_failures = self.write_failures, []
        return failures

    # ------------------------------------------------------------------ jobs

    def track(self, job: Future) -> None:
        """Remember work submitted for this cache, so that closing it can wait for it."""
        self._jobs.add(job)

    def take_jobs(self) -> list[Future]:
        jobs = [job for job in list(self._jobs) if not job.done()]
        self._jobs = weakref.WeakSet()
        return jobs


class Tenants:
    """The caches of one pool, how recently each was used, and which of their values
    go first when a tier needs room."""

    def __init__(self) -> None:
        self._members: list[Tenant] = []
        # Ticks once per use of any cache: how long ago each was used, comparably.
        self._clock = 0

    def __iter__(self) -> Iterator[Tenant]:
        return iter(list(self._members))

    def __getitem__(self, index: int) -> Tenant:
        return self._members[index]

    def __len__(self) -> int:
        return len(self._members)

    def add(self, tenant: Tenant) -> None:
        self._members.append(tenant)
        self.used(tenant)

    def remove(self, tenant: Tenant) -> None:
        self._members.remove(tenant)

    def used(self, tenant: Tenant) -> Callable[[], None]:
        """A cache was used (fetched from or stored into) now; what takes it back."""
        clock, last_used = self._clock, tenant.last_used
        self._clock += 1
        tenant.last_used = self._clock

        def take_back() -> None:
            self._clock, tenant.last_used = clock, last_used

        return take_back

    def reached(self, tenant: Tenant, batch: int, num_batches: int) -> None:
        """A cache's reader took ``batch``: its policies learn where the reader is."""
        self.used(tenant)
        tenant.num_batches = num_batches
        for policy in tenant.policies.values():
            policy.reached(batch, num_batches)

    def resized(self, tenant: Tenant, num_batches: int) -> None:
        """A cache now has ``num_batches`` batches."""
        tenant.num_batches = num_batches
        for policy in tenant.policies.values():
            policy.resized(num_batches)

    def is_idle(self, tenant: Tenant) -> bool:
        """Not used for longer than a pass over its batches would take: its next use is
        further away than that of any cache being worked on."""
        return self._clock - tenant.last_used > max(tenant.num_batches, 1)

    def victims(
        self, tier: str, requester: Tenant, batch: int, *, reading: bool, bypass: bool = True
    ) -> Iterator[int]:
        """Record ids worth evicting from ``tier`` to make room for a value of
        ``requester``'s batch ``batch``, first victim first.

        First those of caches nobody has used for a while (longest unused first, each
        in its own policy's order); then, over the caches being worked on, the record
        the policy would evict first wherever it lives (``scan``: needed furthest into
        a pass, and only if later than the newcomer; ``lru``: least recently used). A
        read that the policy does not let evict (``scan``) takes room from idle caches
        only. Closed caches give nothing: their values are on their way out.
        ``bypass`` False: every value of the active caches, in the policy's order, even
        those ``scan`` would keep for being needed before the newcomer (a tier brought
        down to a budget that was lowered).
        """
        others = [t for t in self._members if t is not requester and not t.closed]
        idle = sorted((t for t in others if self.is_idle(t)), key=lambda t: t.last_used)
        for tenant in idle:
            yield from tenant.policies[tier].victims()
        own = requester.policies[tier]
        if reading and not own.promotes_by_eviction:
            return
        active = [t.policies[tier] for t in [requester, *others] if t not in idle]
        yield from merged_victims(active, own.bypass_score(batch) if bypass else float("-inf"))
