"""What a batch holds per key: a value's structure and its tensor leaves."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .placement import TensorRecord

__all__ = ["Entry", "InlineTensor", "records_of"]


class InlineTensor(NamedTuple):
    """A tensor kept with its entry in RAM: too small to tier, or not tierable."""

    tensor: torch.Tensor
    onload_device: torch.device
    requires_grad: bool


@dataclass
class Entry:
    """One key of a batch: the value's spec (``tree.flatten``), its tensor leaves in
    order (tiered records or inline tensors), and its opaque leaves. Never mutated:
    ``update`` replaces the whole entry, so readers may use one outside the lock."""

    spec: tuple
    leaves: list[TensorRecord | InlineTensor]
    opaques: list[Any]


def records_of(entry: Entry) -> Iterable[TensorRecord]:
    return (leaf for leaf in entry.leaves if isinstance(leaf, TensorRecord))
