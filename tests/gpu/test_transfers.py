"""Side-stream copies on a real accelerator: run with `python -m pytest -m gpu`."""

from __future__ import annotations

import pytest
import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.io.transfers import Ready, Transfers
from spillcache._internal.runtime import unlocked

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


def test_offload_waits_for_the_value_still_being_computed():
    """The value is produced by a long kernel queue on the caller's stream; the side
    stream must wait for it, and the host copy must be the final value."""
    a = torch.randn(2048, 2048, device=CUDA)
    for _ in range(20):
        a = a @ a / 2048**0.5  # queued, not finished, when to_host is called
    copy = Transfers().to_host(a, pin=True)
    assert copy.device.type == "cpu" and copy.is_pinned()
    assert_same(copy, a.cpu())


def test_prefetch_onload_is_a_side_stream_copy_the_consumer_waits_for():
    host = random_tensor(torch.bfloat16, (1024, 1024)).pin_memory()
    ready = Ready()
    moved = Transfers().onload(host, CUDA, False, ready)
    assert moved.device.type == "cuda" and ready
    ready.wait()
    assert not ready
    assert_same(moved.cpu(), host)


@pytest.mark.parametrize("host_bytes", [0, "64MiB", "1GiB"])
def test_iter_prefetch_onto_the_gpu_is_bit_exact(tmp_path, host_bytes):
    config = CacheConfig(
        host_bytes=host_bytes, inline_bytes=0, disk_path=str(tmp_path), prefetch_depth=2
    )
    values = [random_tensor(torch.bfloat16, (1024, 4096), seed) for seed in range(8)]
    loader = [{"h": value.to(CUDA)} for value in values]
    with IntermediatesCache.from_dataloader(loader, CUDA, "cpu", config=config) as cache:
        for _ in range(2):
            for index, batch in enumerate(cache.iter_prefetch(["h"])):
                assert batch["h"].device.type == "cuda"
                # consume on the default stream right away: the wait must have been queued
                assert_same(batch["h"].cpu(), values[index])


def test_spilled_values_for_the_gpu_are_read_into_pinned_memory(tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        values = [torch.randn(1024, 1024, device=CUDA) for _ in range(2)]
        for index, value in enumerate(values):
            cache.update(index, {"h": value})
        cache.flush()
        record = cache._core._batches[0]["h"].leaves[0]
        assert record.resident is None and record.on_disk
        core = cache._core  # the disk read a fetch does:
        read = unlocked._read_record(record, core.placement.pin_host, core.config.read_mode)
        assert read.is_pinned() and read.device.type == "cpu"
        assert_same(cache.fetch(0)["h"], values[0])
