"""The placements and I/O modes every cache test runs in."""

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

# How spilled values travel: each mode changes one setting from the defaults (O_DIRECT
# where the filesystem takes it, copy reads, scan eviction, prefetch 2). Only placements
# that spill run them all; "ram" touches no disk, so the modes would be the same test.
MODES = {
    "direct": dict(direct_io=True),
    "buffered": dict(direct_io=False),
    "mmap": dict(read_mode="mmap"),
    "lru": dict(eviction="lru"),
    "no-prefetch": dict(prefetch_depth=0),
    "one-thread": dict(io_threads=1, write_behind_bytes=0),
    "checksum": dict(checksum=True),
}


def pytest_generate_tests(metafunc):
    if "placement" in metafunc.fixturenames:
        combos = [("ram", "direct")] + [
            (placement, mode)
            for placement in sorted(PLACEMENTS)
            if placement != "ram"
            for mode in MODES
        ]
        metafunc.parametrize(("placement", "mode"), combos, ids=[f"{p}-{m}" for p, m in combos])


@pytest.fixture
def make_cache(placement, mode, tmp_path):
    """Build caches in the current placement and mode; every one is closed after the test."""
    caches: list[IntermediatesCache] = []

    def make(num_batches: int = 2, offload_device="cpu", **overrides) -> IntermediatesCache:
        settings = {**PLACEMENTS[placement], **MODES[mode]}
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
