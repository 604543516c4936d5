"""What storing a value costs before the cache's lock: checking it, flattening it, and
its copies off the accelerator (and compact copies of views), so that a slow
device-to-host transfer holds up no other thread. The cache then places what this
prepared under the lock."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from spillcache.config import CacheConfig

from .. import dtypes
from ..io import transfers
from ..tree import Flat, TensorLeaf, flatten

if TYPE_CHECKING:
    from ..engine.placement import Placement
    from ..engine.tenants import Tenant
    from ..io.transfers import Transfers

__all__ = ["Offload", "Prepared", "may_spill"]


class Prepared(NamedTuple):
    """One key's value, ready to store: its flattened form, and per tensor leaf its
    offloaded copy (made before the lock) and whether it is tiered."""

    key: str
    flat: Flat
    leaves: list[tuple[TensorLeaf, torch.Tensor, bool]]


def may_spill(prepared: list[Prepared]) -> bool:
    """Whether storing ``prepared`` may spill (else no disk's free space is needed)."""
    return any(tiered for item in prepared for *_, tiered in item.leaves)


def tiered_bytes(prepared: list[Prepared]) -> int:
    """The bytes of ``prepared`` that go to the tiers (what making room for them may evict)."""
    return sum(
        offloaded.nbytes for item in prepared for _, offloaded, tiered in item.leaves if tiered
    )


class Offload:
    """One cache's way of preparing values (its config, offload device and tiers)."""

    def __init__(
        self,
        config: CacheConfig,
        offload_device: torch.device | None,
        placement: Placement,
        tenant: Tenant,
        transfers: Transfers,
    ) -> None:
        self.config = config
        self.offload_device = offload_device
        self.placement = placement
        self.tenant = tenant
        self.transfers = transfers

    def prepare(self, values: Any, onload_device: torch.device | None) -> list[Prepared]:
        """Everything about storing ``values`` that needs no lock: checking them,
        flattening them, and their copies off the accelerator (and compact copies of
        views), so that a slow device-to-host transfer holds up no other thread."""
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict of name -> value, got {type(values).__name__}")
        for key in values:
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, got {key!r} ({type(key).__name__})")
        prepared = []
        for key, value in values.items():
            flat = flatten(value, onload_device)
            leaves = []
            for leaf in flat.tensors:
                if self._is_tiered(leaf.tensor):
                    leaves.append((leaf, self._offload_tiered(leaf.tensor), True))
                else:
                    leaves.append((leaf, self._offload_inline(leaf.tensor), False))
            prepared.append(Prepared(key, flat, leaves))
        return prepared

    def _offload_tiered(self, tensor: torch.Tensor) -> torch.Tensor:
        """What placement stores of a tiered tensor: where it may stay in the device
        tier, the tensor on its tier's device (moved there now, before the lock); else
        its compact host copy (itself if it is one already)."""
        placement = self.placement
        if placement.wants_device_tier(self.tenant, tensor):
            return transfers.move(tensor.detach(), self.tenant.device_target or tensor.device)
        return self.transfers.to_host(
            tensor.detach(), pin=placement.pin_host, arena=placement.arena
        )

    def _offload_inline(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where a tensor that stays with its entry is kept (one that cannot tier stays as is)."""
        if not dtypes.is_tierable(tensor):
            return tensor
        if self.offload_device is None:
            return tensor.detach()
        if self.offload_device.type == "cpu":
            return transfers.to_host(tensor.detach())
        return transfers.move(tensor.detach(), self.offload_device)

    def _is_tiered(self, tensor: torch.Tensor) -> bool:
        if not dtypes.is_tierable(tensor):
            warnings.warn(
                f"spillcache keeps {tensor.dtype} tensors with layout {tensor.layout} "
                f"({type(tensor).__name__}) in RAM as they are; only dense tensors spill",
                stacklevel=5,
            )
            return False
        return tensor.nbytes >= self.config.inline_bytes
