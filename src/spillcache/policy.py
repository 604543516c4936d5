"""Eviction policies: small objects that only decide which record leaves a tier first.

A policy sees record ids come (``insert``), get used (``touch``) and go (``remove``),
and answers ``victims()``: the ids it would evict, first choice first. It never moves
data; the cache does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

__all__ = ["LRUPolicy", "make_policy"]


class LRUPolicy:
    """Least recently used first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[int, None] = OrderedDict()

    def __contains__(self, rid: int) -> bool:
        return rid in self._order

    def __len__(self) -> int:
        return len(self._order)

    def insert(self, rid: int) -> None:
        self._order[rid] = None
        self._order.move_to_end(rid)

    def touch(self, rid: int) -> None:
        if rid in self._order:
            self._order.move_to_end(rid)

    def remove(self, rid: int) -> None:
        self._order.pop(rid, None)

    def victims(self) -> Iterator[int]:
        # A snapshot: the caller evicts while iterating.
        return iter(list(self._order))


def make_policy(name: str) -> LRUPolicy:
    if name == "lru":
        return LRUPolicy()
    raise ValueError(f"unknown eviction policy {name!r}")
