"""A tier of tensors held in memory (the model device, or host RAM)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["MemoryTier"]


class MemoryTier:
    """Tensors by record id, with a byte budget (``None``: no limit)."""

    def __init__(self, name: str, budget: int | None) -> None:
        self.name = name
        self.budget = budget
        self._tensors: dict[int, torch.Tensor] = {}
        self._nbytes = 0

    def __contains__(self, rid: int) -> bool:
        return rid in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._tensors))

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def can_ever_hold(self, nbytes: int) -> bool:
        return self.budget is None or nbytes <= self.budget

    def has_room(self, nbytes: int) -> bool:
        return self.budget is None or self._nbytes + nbytes <= self.budget

    def put(self, rid: int, tensor: torch.Tensor) -> None:
        if rid in self._tensors:
            raise KeyError(f"record {rid} is already in the {self.name} tier")
        self._tensors[rid] = tensor
        self._nbytes += tensor.nbytes

    def get(self, rid: int) -> torch.Tensor:
        return self._tensors[rid]

    def pop(self, rid: int) -> torch.Tensor:
        tensor = self._tensors.pop(rid)
        self._nbytes -= tensor.nbytes
        return tensor

    def bytes_by_device(self) -> dict[torch.device, int]:
        sizes: dict[torch.device, int] = {}
        for tensor in self._tensors.values():
            sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
        return sizes
