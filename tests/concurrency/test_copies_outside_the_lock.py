"""A slow offload copy holds up no other thread: copies run before the cache's lock."""

from __future__ import annotations

import torch

from spill_testing import assert_same, fetch_finishes_during_a_held_copy, random_tensor
from spillcache import CacheConfig, IntermediatesCache


def test_another_threads_fetch_completes_during_a_slow_transfer(tmp_path):
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        stored = random_tensor(torch.float32, (32, 32), 1)
        cache.update(1, {"h": stored})
        slow = random_tensor(torch.float32, (32, 64), 2)[:, ::2]  # a view: it is copied
        fetch_finishes_during_a_held_copy(
            cache,
            lambda tensor: tensor.data_ptr() == slow.data_ptr(),
            lambda: cache.update(0, {"h": slow}),
            batch=1,
            expected=stored,
        )
        assert_same(cache.fetch(0)["h"], slow.contiguous())
