"""``IntermediatesCache.stats()``: the placement's counters, as one plain dict."""

from __future__ import annotations

from typing import Any

from .placement import Placement

__all__ = ["TIERS", "TIER_COUNTERS", "report"]

TIERS = ("device", "host", "disk")
# What report() gives for each of TIERS (besides bytes held and budget).
TIER_COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "evictions")


def report(
    placement: Placement,
    *,
    write_behind_budget: int,
    store_path: str | None,
    stall_seconds: float,
) -> dict[str, Any]:
    """Per tier: bytes held, budget, hits, misses, bytes read and written, evictions;
    the write-behind area; and the time the caller waited for I/O."""
    counters = placement.counters
    disk = placement.disk

    def tier(name: str, nbytes: int, budget: int | None) -> dict[str, Any]:
        figures = {counter: counters[f"{name}.{counter}"] for counter in TIER_COUNTERS}
        return {"bytes": nbytes, "budget": budget, **figures}

    return {
        "device": tier("device", placement.device.nbytes, placement.device.budget),
        "host": tier("host", placement.host.nbytes, placement.host.budget),
        # No disk tier can hold nothing (budget 0); None is "no limit but the disk".
        "disk": {
            **tier(
                "disk",
                disk.nbytes if disk is not None else 0,
                disk.budget if disk is not None else 0,
            ),
            "path": store_path,
        },
        "write_behind": {
            "bytes": placement.pending_bytes,
            "budget": write_behind_budget,
            "writes": placement.writes_in_flight,
            "hits": counters["write_behind.hits"],
            "unwritten_bytes": placement.unwritten_bytes,
        },
        "stall_seconds": stall_seconds,
    }
