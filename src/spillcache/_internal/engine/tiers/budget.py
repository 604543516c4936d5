"""What every tier shares: items by record id and a byte budget."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

__all__ = ["BudgetedTier"]

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
