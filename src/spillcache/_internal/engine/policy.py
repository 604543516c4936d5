"""Eviction policies: small objects that only decide which record leaves a tier first.

A policy sees record ids come (``insert``, with the batch they belong to), get used
(``touch``) and go (``remove``), hears where the reader is (``reached``), and answers
``victims()`` (its ids, first choice first) and ``scored()`` (the same with scores that
compare across caches; ``bypass_score(batch)``: the score a victim must beat to make
room for a record of ``batch``). It never moves data; the placement does.

Two policies:

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
from collections.abc import Iterable, Iterator
from typing import Protocol

__all__ = [
    "POLICIES",
    "EvictionPolicy",
    "LRUPolicy",
    "ScanPolicy",
    "make_policy",
    "merged_victims",
]


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
