"""The sequential pipeline's access pattern under each eviction policy: disk reads
counted, values checked bit for bit."""

from __future__ import annotations

import pytest
import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheConfig, IntermediatesCache

SHAPE = (64, 64)  # 16 KiB of float32
NBYTES = 16 * 1024
BATCHES = 8
# The parts of host_bytes kept for values on their way to and from disk, each room for
# half the batches: every victim of LRU's first pass (4 of them, below) waits for its
# write at once, as the pass promotes the batches it reads, and the batches the caller
# holds, prefetches and updates fit the read part. The host tier is what the parts leave.
TRANSIT = BATCHES // 2 * NBYTES


def tiered(tmp_path, resident: int, eviction: str) -> CacheConfig:
    """A host tier of ``resident`` batches, its write-behind and read parts besides."""
    return CacheConfig(
        **tier_sizes(resident * NBYTES, TRANSIT),
        inline_bytes=0,
        disk_path=str(tmp_path),
        eviction=eviction,
    )


def layer(x: torch.Tensor) -> torch.Tensor:
    """Stands in for a subgraph: a new output tensor per batch, bit-exact repeatable."""
    return x * 0.5 + 1.0


def run_pipeline(cache: IntermediatesCache, layers: int, prefetch: bool) -> list[int]:
    """llm-compressor's sequential loop; returns the host tier's misses in each pass."""
    reads = []
    cache.flush()

    def batches():
        return cache.iter_prefetch(["h"]) if prefetch else cache.iter(["h"])

    for _ in range(layers):
        before = cache.stats()["host"]["misses"]
        for _ in batches():  # calibration pass
            pass
        reads.append(cache.stats()["host"]["misses"] - before)
        before = cache.stats()["host"]["misses"]
        for index, inputs in enumerate(batches()):  # propagation pass
            output = layer(inputs["h"])
            cache.delete(index, ["h"])
            cache.update(index, {"h": output})
        reads.append(cache.stats()["host"]["misses"] - before)
    return reads


def expected_outputs(layers: int) -> list[torch.Tensor]:
    values = [random_tensor(torch.float32, SHAPE, seed).nan_to_num() for seed in range(BATCHES)]
    for _ in range(layers):
        values = [layer(value) for value in values]
    return values


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("resident", [2, 4, 6])
def test_scan_reads_only_the_batches_that_do_not_fit(tmp_path, resident, prefetch):
    config = tiered(tmp_path, resident, "scan")
    inputs = [random_tensor(torch.float32, SHAPE, seed).nan_to_num() for seed in range(BATCHES)]
    with IntermediatesCache([{"h": x} for x in inputs], config=config) as cache:
        assert cache.stats()["host"]["budget"] == resident * NBYTES
        reads = run_pipeline(cache, layers=3, prefetch=prefetch)
        # Every pass misses exactly the batches beyond the resident ones: (1 - C/N).
        assert reads == [BATCHES - resident] * 6
        stats = cache.stats()
        assert stats["disk"]["hits"] + stats["write_behind"]["hits"] == 6 * (BATCHES - resident)
        for index, want in enumerate(expected_outputs(3)):
            assert_same(cache.fetch(index)["h"], want)


@pytest.mark.parametrize("prefetch", [False, True])
def test_lru_misses_more_than_scan_on_a_cyclic_scan_larger_than_the_tier(tmp_path, prefetch):
    """LRU evicts each batch shortly before it is read again. (Its exact count depends on
    when background writes finish: a value still in the write-behind area is served
    from RAM and not promoted, one already written is read back and promoted.)"""
    resident = 4
    config = tiered(tmp_path, resident, "lru")
    inputs = [random_tensor(torch.float32, SHAPE, seed).nan_to_num() for seed in range(BATCHES)]
    with IntermediatesCache([{"h": x} for x in inputs], config=config) as cache:
        assert cache.stats()["host"]["budget"] == resident * NBYTES
        reads = run_pipeline(cache, layers=3, prefetch=prefetch)
        assert reads[0] == BATCHES  # the first pass: the 4 resident are the last 4 stored
        assert sum(reads) > 6 * (BATCHES - resident), reads  # scan's count, above
        for index, want in enumerate(expected_outputs(3)):
            assert_same(cache.fetch(index)["h"], want)
