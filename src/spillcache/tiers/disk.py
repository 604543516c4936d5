"""The disk tier: tensors in a zarr store, with a byte budget."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..format import Store

__all__ = ["DiskTier"]


class DiskTier:
    """Tensors by record id in one store, created on first write (``None`` budget: no limit).

    ``open_store`` is called the first time a tensor is written, so a cache whose
    values all fit in memory never touches the disk.
    """

    name = "disk"

    def __init__(self, budget: int | None, open_store: Callable[[], Store]) -> None:
        self.budget = budget
        self._open_store = open_store
        self._store: Store | None = None
        self._sizes: dict[int, int] = {}
        self._nbytes = 0

    def __contains__(self, rid: int) -> bool:
        return rid in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._sizes))

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    @property
    def has_store(self) -> bool:
        return self._store is not None

    def can_ever_hold(self, nbytes: int) -> bool:
        return self.budget is None or nbytes <= self.budget

    def has_room(self, nbytes: int) -> bool:
        return self.budget is None or self._nbytes + nbytes <= self.budget

    def put(self, rid: int, tensor: torch.Tensor, *, durable: bool = False) -> None:
        """Write a contiguous CPU tensor; on error nothing is recorded and no file is left."""
        if rid in self._sizes:
            raise KeyError(f"record {rid} is already in the disk tier")
        self.store.write_tensor(str(rid), tensor, durable=durable)
        self._sizes[rid] = tensor.nbytes
        self._nbytes += tensor.nbytes

    def get(
        self, rid: int, shape: tuple[int, ...], dtype: torch.dtype, *, pin: bool = False
    ) -> torch.Tensor:
        if rid not in self._sizes:
            raise KeyError(f"record {rid} is not in the disk tier")
        return self.store.read_tensor(str(rid), shape, dtype, pin=pin)

    def pop(self, rid: int) -> None:
        self._nbytes -= self._sizes.pop(rid)
        self.store.delete_tensor(str(rid))
