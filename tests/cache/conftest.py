"""The three placements every cache test runs in."""

from __future__ import annotations

import pytest

from spillcache import CacheConfig, IntermediatesCache

# All in RAM; host tier tiny (most values spilled); host tier zero (everything spilled);
# host tier zero with the default inline_bytes (small tensors stay with their entry).
PLACEMENTS = {
    "ram": dict(host_bytes="1GiB", disk_path=None, inline_bytes=0),
    "tiny": dict(host_bytes=4096, inline_bytes=0),
    "zero": dict(host_bytes=0, inline_bytes=0),
    "inline": dict(host_bytes=0),
}


@pytest.fixture(params=sorted(PLACEMENTS))
def placement(request) -> str:
    return request.param


@pytest.fixture
def make_cache(placement, tmp_path):
    """Build caches in the current placement; every one is closed after the test."""
    caches: list[IntermediatesCache] = []

    def make(num_batches: int = 2, offload_device="cpu", **overrides) -> IntermediatesCache:
        settings = dict(PLACEMENTS[placement])
        if settings.get("disk_path", "auto") == "auto":
            settings["disk_path"] = str(tmp_path / "spill")
        settings.update(overrides)
        cache = IntermediatesCache.empty(
            num_batches, offload_device, config=CacheConfig(**settings)
        )
        caches.append(cache)
        return cache

    yield make
    for cache in caches:
        cache.close()
