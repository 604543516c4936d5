"""Read buffers are reused between reads, never under a value the caller still holds:
the pool's arena slots (host_bytes > 0), or without a region (host_bytes = 0) the
read-buffer pool."""

from __future__ import annotations

import pytest
import torch

from spill_testing import assert_same, bits, random_tensor
from spillcache import CacheConfig, IntermediatesCache

SHAPE = (128, 256)  # 128 KiB of float32


@pytest.mark.parametrize("region", [False, True], ids=["no-region", "arena"])
@pytest.mark.parametrize("direct_io", [True, False])
def test_values_held_by_the_caller_survive_later_reads(tmp_path, direct_io, region):
    # With the arena: no host tier (1 MiB, all of it for writes and reads), so every
    # read lands in a slot.
    config = CacheConfig(
        host_bytes="1MiB" if region else 0,
        write_behind_bytes="512KiB" if region else "auto",
        read_buffer_bytes="512KiB" if region else "auto",
        inline_bytes=0,
        disk_path=str(tmp_path),
        direct_io=direct_io,
    )
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
        if not region:
            assert pool.reused > 0, "dropped values' buffers should have been reused"
            assert pool.nbytes <= cache._core.pool.budgets.read_buffer_bytes
            return
        arena = cache._core.pool.arena
        assert pool is arena
        stats = arena.stats()
        # 14 reads of 128 KiB and 4 values copied in, in 1 MiB: slots were reused, and
        # never one a held value was in (checked above, bit for bit).
        assert arena.taken >= 18 and stats["peak_bytes"] <= arena.capacity
        assert stats["overflows"] == 0
