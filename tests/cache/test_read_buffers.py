"""Read buffers are reused between reads, never under a value the caller still holds."""

from __future__ import annotations

import pytest
import torch

from spill_testing import assert_same, bits, random_tensor
from spillcache import CacheConfig, IntermediatesCache

SHAPE = (128, 256)  # 128 KiB of float32


@pytest.mark.parametrize("direct_io", [True, False])
def test_values_held_by_the_caller_survive_later_reads(tmp_path, direct_io):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), direct_io=direct_io)
    values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(4)]
    with IntermediatesCache([{"h": value} for value in values], config=config) as cache:
        cache.flush()
        kept = cache.fetch(0)["h"]  # held as a tensor
        kept_array = cache.fetch(1)["h"].numpy()  # held only through numpy
        kept_bits = bits(values[1])
        for _ in range(3):
            for index, batch in enumerate(cache.iter_prefetch(["h"])):
                assert_same(batch["h"], values[index])
        assert_same(kept, values[0])
        assert torch.from_numpy(kept_array).view(torch.uint8).numpy().tobytes() == kept_bits
        pool = cache._core.tenant.store._buffers
        assert pool.reused > 0, "dropped values' buffers should have been reused"
        assert pool.nbytes <= config.read_buffer_bytes
