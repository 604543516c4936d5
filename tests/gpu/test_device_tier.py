"""The device tier on a real accelerator: run with `python -m pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, fetch_finishes_during_a_held_copy, random_tensor
from spillcache import CacheConfig, IntermediatesCache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("host_bytes", [0, "1GiB"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_gpu_values_offload_to_cpu_and_come_back_on_gpu(tmp_path, dtype, host_bytes):
    config = CacheConfig(host_bytes=host_bytes, inline_bytes=0, disk_path=str(tmp_path))
    original = random_tensor(dtype, (16, 32)).view(torch.uint8).to(CUDA).view(dtype)
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, {"x": original, "t": original.t()})
        assert cache.size().get(CUDA, 0) == 0  # offloaded: nothing left on the GPU
        got = cache.fetch(0)
        assert_same(got["x"], original)
        assert_same(got["t"], original.t())


def test_offload_device_none_keeps_gpu_values_on_gpu(tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    x = torch.randn(256, 256, device=CUDA)
    with IntermediatesCache(None, offload_device=None, config=config) as cache:
        cache.append({"x": x})
        assert cache.size()[x.device] == x.nbytes
        assert cache.fetch(0)["x"].data_ptr() == x.data_ptr()


def test_device_budget_spills_down_to_host_then_disk(tmp_path):
    mib = 2**20
    config = CacheConfig(device_bytes=mib, host_bytes=mib, inline_bytes=0, disk_path=str(tmp_path))
    values = [torch.randn(256, 1024, device=CUDA) for _ in range(4)]  # 1 MiB each
    with IntermediatesCache.empty(4, "cpu", config=config) as cache:
        for index, value in enumerate(values):
            cache.update(index, {"h": value})
        stats = cache.stats()
        assert stats["device"]["bytes"] == mib and stats["host"]["bytes"] == mib
        assert stats["disk"]["bytes"] >= 2 * mib
        for index, value in enumerate(values):
            assert_same(cache.fetch(index)["h"], value)


def test_host_copies_are_pinned(tmp_path):
    config = CacheConfig(host_bytes="1GiB", inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, {"x": torch.randn(64, 64, device=CUDA)})
        record = cache._core._batches[0]["x"].leaves[0]
        assert cache._core.placement.host.get(record.rid).is_pinned()


def test_a_device_tier_eviction_copies_to_the_host_without_the_pools_lock(tmp_path):
    """The device-tier value an update evicts is copied off the GPU with the pool's lock
    released: another thread's fetch finishes while that copy is held up."""
    mib = 2**20
    config = CacheConfig(
        device_bytes=mib, host_bytes="64MiB", inline_bytes=0, disk_path=str(tmp_path)
    )
    on_host = torch.randn(256, 1024)  # 1 MiB, a CPU value: the host tier
    victim, newcomer = (torch.randn(256, 1024, device=CUDA) for _ in range(2))
    with IntermediatesCache.empty(3, "cpu", config=config) as cache:
        cache.update(2, {"h": on_host})
        cache.update(0, {"h": victim})
        assert cache.stats()["device"]["bytes"] == mib  # the device tier is full
        fetch_finishes_during_a_held_copy(
            cache,
            lambda tensor: tensor.device.type == "cuda" and torch.equal(tensor, victim),
            lambda: cache.update(1, {"h": newcomer}),
            batch=2,
            expected=on_host,
        )
        assert cache.stats()["device"]["bytes"] == mib
        for index, value in enumerate([victim, newcomer, on_host]):
            assert_same(cache.fetch(index)["h"], value)
