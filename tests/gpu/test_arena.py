"""The arena on a real GPU: one pinned region, copies into and out of it asynchronous,
and torch's pinned host allocator untouched by the cache. Run with `pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.io.arena import Arena
from spillcache._internal.io.transfers import Ready, Transfers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")
MIB = 2**20


def _pinned_host_bytes() -> int:
    """Bytes torch's caching host allocator holds (pinned blocks of its own)."""
    stats = torch.cuda.host_memory_stats()
    return stats.get("allocated_bytes.current", stats.get("reserved_bytes.current", 0))


def test_the_region_is_registered_once_and_its_slots_are_pinned():
    arena = Arena(64 * MIB, pin=True)
    slot = arena.take(MIB)
    assert arena.registered and slot.is_pinned()
    assert arena.stats()["pinned"]
    del slot
    arena.close()
    assert not arena.registered  # unpinned before the region goes


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_a_gpu_value_lands_in_a_slot_and_comes_back_bit_for_bit(dtype):
    arena = Arena(64 * MIB, pin=True)
    value = random_tensor(dtype, (256, 64)).to(CUDA)
    host = Transfers().to_host(value, pin=True, arena=arena)
    assert host.device.type == "cpu" and arena.holds(host) and host.is_pinned()
    assert_same(host, value.cpu())
    ready = Ready()
    back = Transfers().onload(host, CUDA, False, ready)
    ready.wait()
    assert_same(back.cpu(), value.cpu())


def test_offloading_and_prefetching_takes_no_pinned_block_of_torchs(tmp_path):
    config = CacheConfig(host_bytes="256MiB", inline_bytes=0, disk_path=str(tmp_path))
    values = [torch.randn(1024, 2048, device=CUDA) for _ in range(64)]  # 8 MiB each
    torch.cuda.synchronize()
    before = _pinned_host_bytes()
    with IntermediatesCache.empty(len(values), "cpu", config=config) as cache:
        for index, value in enumerate(values):
            cache.update(index, {"h": value})
        for index, batch in enumerate(cache.iter_prefetch(["h"])):
            assert_same(batch["h"].cpu(), values[index].cpu())
        arena = cache.stats()["pool"]["arena"]
        assert arena["pinned"] and arena["peak_bytes"] <= arena["capacity"]
        assert arena["overflows"] == 0
        assert cache.stats()["disk"]["bytes_written"] > 0  # it spilled, and read back
    assert _pinned_host_bytes() == before  # torch's pinned blocks did not grow
