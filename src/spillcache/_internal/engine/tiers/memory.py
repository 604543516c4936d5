"""A tier of tensors held in memory (the model device, or host RAM)."""

from __future__ import annotations

import torch

from .budget import BudgetedTier

__all__ = ["MemoryTier"]


class MemoryTier(BudgetedTier[torch.Tensor]):
    """Tensors by record id, with a byte budget (``None``: no limit)."""

    def __init__(self, name: str, budget: int | None) -> None:
        super().__init__(budget)
        self.name = name

    def put(self, rid: int, tensor: torch.Tensor) -> None:
        self._add(rid, tensor, tensor.nbytes)

    def get(self, rid: int) -> torch.Tensor:
        return self._items[rid]

    def pop(self, rid: int) -> torch.Tensor:
        return self._remove(rid, self._items[rid].nbytes)
