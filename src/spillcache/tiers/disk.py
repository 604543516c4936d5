"""The disk tier: the bytes of tensors in a zarr store, with a byte budget."""

from __future__ import annotations

from collections.abc import Callable

from ..format import Store
from .budget import BudgetedTier

__all__ = ["DiskTier"]


class DiskTier(BudgetedTier[int]):
    """Sizes of the tensors it holds in one store, by record id (``None`` budget: no limit).

    A tensor's bytes are *reserved* when its background write is queued, so the budget
    holds while writes are in flight; writing, reading and deleting the files is the
    cache's (through ``store``), on its I/O threads.
    ``open_store`` is called the first time room is reserved, so a cache whose values
    all fit in memory never touches the disk.
    """

    name = "disk"

    def __init__(self, budget: int | None, open_store: Callable[[], Store]) -> None:
        super().__init__(budget)
        self._open_store = open_store
        self._store: Store | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    @property
    def has_store(self) -> bool:
        return self._store is not None

    def attach(self, store: Store) -> None:
        """Use an existing store (a reopened cache's) instead of creating one."""
        self._store = store

    def reserve(self, rid: int, nbytes: int) -> None:
        """Count ``nbytes`` for a tensor whose file is about to be written."""
        if self._store is None:  # created now, under the caller's lock, not by a write thread
            self._store = self._open_store()
        self._add(rid, nbytes, nbytes)

    def unreserve(self, rid: int) -> None:
        """Forget a reservation whose file was never written."""
        self._remove(rid, self._items[rid])
