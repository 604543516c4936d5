"""A value's way into a cache and back out, the parts that run without the pool's lock.

In: what storing a value costs before the lock (``Offload.prepare``): checking it,
flattening it, and its copies off the accelerator (and compact copies of views), so
that a slow device-to-host transfer holds up no other thread. The cache then places
what this prepared, in a transaction.

Out: one fetch's disk reads, planned under the lock and done outside it. ``plan``
(lock held) takes what memory has and *holds* every record that must come from disk,
so a concurrent delete cannot remove its file. ``read`` (lock not held) reads those
records from their stores, or waits for a read of the same record already in flight on
another thread (its ``loading`` Future), so no record is read twice at once. The cache
then finishes in a transaction: promotion, release, and clearing ``loading``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from spillcache.config import CacheConfig
from spillcache.errors import StoreError

from .. import dtypes
from ..engine.placement import Placement, TensorRecord
from ..io import transfers
from ..io.transfers import Ready
from ..store.failures import naming
from ..tree import Flat, TensorLeaf, flatten

__all__ = ["Fetched", "Loads", "Offload", "Prepared", "maps", "may_spill", "plan", "read"]

if TYPE_CHECKING:
    from ..engine.tenants import Tenant
    from ..io.transfers import Transfers


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
        if isinstance(values, Mapping) and not isinstance(values, dict):
            values = dict(values.items())  # as the stock class: anything with .items()
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict of name -> value, got {type(values).__name__}")
        for key in values:
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, got {key!r} ({type(key).__name__})")
        prepared = []
        inline: dict[int, torch.Tensor] = {}  # one copy per tensor given (stock: one object)
        for key, value in values.items():
            flat = flatten(value, onload_device)
            leaves = []
            for i, leaf in enumerate(flat.tensors):
                if leaf.tensor.is_conj() or leaf.tensor.is_neg():  # no raw view of lazy bits
                    leaf = flat.tensors[i] = leaf._replace(
                        tensor=leaf.tensor.resolve_conj().resolve_neg()
                    )
                if self._is_tiered(leaf.tensor):
                    leaves.append((leaf, self._offload_tiered(leaf.tensor), True))
                else:
                    if id(leaf.tensor) not in inline:
                        inline[id(leaf.tensor)] = self._offload_inline(leaf.tensor)
                    leaves.append((leaf, inline[id(leaf.tensor)], False))
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
            layout = "nested" if tensor.is_nested else tensor.layout  # a nested one is strided
            warnings.warn(
                f"spillcache keeps {tensor.dtype} tensors with layout {layout} "
                f"({type(tensor).__name__}) in RAM as they are; only dense tensors spill",
                stacklevel=5,
            )
            return False
        return tensor.nbytes >= self.config.inline_bytes


class Fetched(NamedTuple):
    """What a fetch gives back (``CacheCore.fetch_versioned``)."""

    generation: int
    values: dict[str, Any]
    ready: Ready
    read: list[tuple[TensorRecord, torch.Tensor]]  # promoted when the caller takes them


class Loads:
    """The records one fetch needs: found in memory, to read, or being read by another."""

    def __init__(self) -> None:
        self.found: dict[int, torch.Tensor] = {}
        self.held: list[TensorRecord] = []
        self.to_read: list[TensorRecord] = []
        self.to_wait: list[tuple[TensorRecord, Future]] = []
        self.read: dict[int, torch.Tensor] = {}  # filled by read()


def plan(placement: Placement, records: Iterable[TensorRecord]) -> Loads:
    """Lock held: take what memory has; hold every record that must come from disk."""
    loads = Loads()
    for record in records:
        if record.rid in loads.found or record in loads.held:
            continue
        tensor = placement.begin_load(record)
        if tensor is not None:
            loads.found[record.rid] = tensor
            continue
        placement.hold(record)
        loads.held.append(record)
        if record.loading is None:
            record.loading = Future()
            loads.to_read.append(record)
        else:
            loads.to_wait.append((record, record.loading))
    return loads


def read(loads: Loads, *, pin_host: bool, read_mode: str) -> BaseException | None:
    """Lock not held: read (or wait for) the held records; the first error, if any.
    ``pin_host``: values for an accelerator are read into pinned memory.

    Every read's outcome goes to its ``loading`` Future too, for whoever waits on it.
    """
    error: BaseException | None = None
    for record in loads.to_read:
        try:
            tensor = _read_record(record, pin_host, read_mode)
        except BaseException as caught:
            record.loading.set_exception(caught)
            error = error or caught
        else:
            record.loading.set_result(tensor)
            loads.read[record.rid] = tensor
    for record, future in loads.to_wait:
        try:
            loads.found[record.rid] = future.result()
        except BaseException as caught:
            error = error or caught
    return error


def maps(record: TensorRecord, read_mode: str) -> bool:
    """read_mode "mmap": a value for the CPU is mapped, not read (nor promoted)."""
    return read_mode == "mmap" and record.onload_device.type == "cpu"


def _read_record(record: TensorRecord, pin_host: bool, read_mode: str) -> torch.Tensor:
    pin = pin_host and record.onload_device.type != "cpu"
    try:
        return record.tenant.store_on(record.disk).read_tensor(
            record.array, record.shape, record.dtype, pin=pin, mapped=maps(record, read_mode)
        )
    except StoreError as error:  # name the entry, not just the file
        raise naming(error, record.label) from None
