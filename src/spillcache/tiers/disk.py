"""The disk tier: tensors in a zarr store, with a byte budget."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..format import Store
from .budget import BudgetedTier

__all__ = ["DiskTier"]


class DiskTier(BudgetedTier[int]):
    """Sizes of the tensors it holds in one store, by record id (``None`` budget: no limit).

    ``open_store`` is called the first time a tensor is written, so a cache whose
    values all fit in memory never touches the disk.
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

    def put(self, rid: int, tensor: torch.Tensor, *, durable: bool = False) -> None:
        """Write a contiguous CPU tensor; on error nothing is recorded and no file is left."""
        if rid in self:
            raise KeyError(f"record {rid} is already in the disk tier")
        self.store.write_tensor(str(rid), tensor, durable=durable)
        self._add(rid, tensor.nbytes, tensor.nbytes)

    def get(
        self, rid: int, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool = False
    ) -> torch.Tensor:
        if rid not in self:
            raise KeyError(f"record {rid} is not in the disk tier")
        return self.store.read_tensor(str(rid), shape, dtype, pin=pin)

    def pop(self, rid: int) -> None:
        self._remove(rid, self._items[rid])
        self.store.delete_tensor(str(rid))
