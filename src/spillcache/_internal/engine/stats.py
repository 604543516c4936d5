"""``IntermediatesCache.stats()``: the placement's counters, as one plain dict."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .records import WriteState
from .tenants import TIER_COUNTERS, Tenant

if TYPE_CHECKING:
    from .placement import Placement

__all__ = ["TIERS", "cache_memory", "memory_by_device", "report"]

TIERS = ("device", "host", "disk")


def report(
    placement: Placement,
    tenant: Tenant,
    *,
    write_behind_budget: int,
    store_path: str | None,
    stall_seconds: float,
    pool: dict[str, Any],
    disk_dirs: list[str],
) -> dict[str, Any]:
    """One cache's figures. Per tier: its bytes held, the budget (the pool's, shared by
    every cache of its config), hits, misses, bytes read and written, evictions; the
    write-behind area; the time the caller waited for I/O; and under ``"pool"`` the
    pool's totals over every cache (``pool["caches"]``: how many share it)."""
    counters = tenant.counters
    disk = placement.disk
    share = _share(placement, tenant)

    def tier(name: str, nbytes: int, budget: int | None) -> dict[str, Any]:
        figures = {counter: getattr(counters.of(name), counter) for counter in TIER_COUNTERS}
        return {"bytes": nbytes, "budget": budget, **figures}

    return {
        # A cache offloading to the CPU with device_bytes = "auto" keeps nothing there.
        "device": tier(
            "device", share["device"], placement.device.budget if tenant.device_tier else 0
        ),
        "host": tier("host", share["host"], placement.host.budget),
        # No disk tier can hold nothing (budget 0); None is "no limit but the disk".
        "disk": {
            **tier("disk", share["disk"], disk.budget if disk is not None else 0),
            "path": store_path,
            # Per disk directory (disk_path may list several): this cache's bytes there.
            "disks": [
                {"path": str(path), "bytes": nbytes}
                for path, nbytes in zip(disk_dirs, share["disks"], strict=True)
            ],
        },
        "write_behind": {
            "bytes": share["write_behind"],
            "budget": write_behind_budget,
            "writes": tenant.writes_in_flight,
            "hits": counters.write_behind_hits,
            "unwritten_bytes": share["unwritten"],
        },
        "stall_seconds": stall_seconds,
        "pool": pool,
    }


def _share(placement: Placement, tenant: Tenant) -> dict[str, Any]:
    """Bytes of one cache's values in each tier and in the write-behind area."""
    held: dict[str, Any] = dict.fromkeys(("device", "host", "disk", "write_behind", "unwritten"), 0)
    held["disks"] = [0] * (placement.disk.disks if placement.disk is not None else 0)
    for record in placement.records_of(tenant):
        if record.resident is not None:
            held[record.resident] += record.nbytes
        if placement.disk is not None and record.rid in placement.disk:
            held["disk"] += record.nbytes
            held["disks"][record.disk] += record.nbytes
        if record.write_state in (WriteState.QUEUED, WriteState.WRITING):
            held["write_behind"] += record.nbytes
        if record.write_error is not None:  # in the host tier, its write failed
            held["unwritten"] += record.nbytes
    return held


def memory_by_device(placement: Placement, tenant: Tenant) -> dict[torch.device, int]:
    """Bytes of one cache's tiered values in memory (tiers and write-behind), by device."""
    sizes: dict[torch.device, int] = {}
    for record in placement.records_of(tenant):
        tensor = placement.memory_copy(record)
        if tensor is not None:
            sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
    return sizes


def cache_memory(placement: Placement, tenant: Tenant, batches: list[dict]) -> dict:
    """``size()``: bytes of memory a cache's values use, by device: its tiered values in
    memory, and the tensors kept with its entries (inline, or opaque values)."""
    from .records import InlineTensor

    sizes = memory_by_device(placement, tenant)
    seen: set[int] = set()
    for batch in batches:
        for entry in batch.values():
            in_ram = [leaf.tensor for leaf in entry.leaves if isinstance(leaf, InlineTensor)]
            in_ram += [obj for obj in entry.opaques if isinstance(obj, torch.Tensor)]
            for tensor in in_ram:
                if id(tensor) not in seen and not tensor.is_meta:
                    seen.add(id(tensor))
                    sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
    return sizes
