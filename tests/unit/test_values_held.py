"""A cache's tiered values counted once each wherever they are, and their peak
(``CacheCore.values_held``, kept by the record registry): the metrics file's
``values_bytes`` and ``values_peak_bytes``."""

from __future__ import annotations

import torch

from spillcache import CacheConfig, IntermediatesCache

KIB = 1024


def test_values_are_counted_once_and_the_peak_is_kept_until_reset(tmp_path):
    config = CacheConfig(host_bytes=64 * KIB, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(3, "cpu", config=config) as cache:
        core = cache._core
        shared = torch.zeros(4 * KIB, dtype=torch.uint8)
        cache.update(0, {"a": shared, "b": shared})  # one tensor, stored once
        cache.update(1, {"a": torch.ones(16 * KIB, dtype=torch.uint8)})
        cache.update(2, {"a": torch.ones(64 * KIB, dtype=torch.uint8)})  # to disk
        cache.flush()
        assert core.values_held() == (84 * KIB, 84 * KIB)
        cache.delete(2)
        assert core.values_held(reset_peak=True) == (20 * KIB, 84 * KIB)
        assert core.values_held() == (20 * KIB, 20 * KIB)  # the peak starts again from now
        cache.update(2, {"a": torch.ones(KIB, dtype=torch.uint8)})
        cache.delete(1)
        assert core.values_held() == (5 * KIB, 21 * KIB)
