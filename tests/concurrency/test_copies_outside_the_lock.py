"""A slow offload copy holds up no other thread: copies run before the cache's lock."""

from __future__ import annotations

import threading

import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache


def test_another_threads_fetch_completes_during_a_slow_transfer(tmp_path):
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        stored = random_tensor(torch.float32, (32, 32), 1)
        cache.update(1, {"h": stored})
        slow = random_tensor(torch.float32, (32, 64), 2)[:, ::2]  # a view: it is copied
        transfers = cache._core.transfers
        plain_to_host = transfers.to_host
        copying, release = threading.Event(), threading.Event()

        def slow_to_host(tensor, **options):
            if tensor.data_ptr() == slow.data_ptr():
                copying.set()
                release.wait()  # the transfer "takes" until the test lets it finish
            return plain_to_host(tensor, **options)

        transfers.to_host = slow_to_host
        updater = threading.Thread(target=cache.update, args=(0, {"h": slow}))
        updater.start()
        try:
            assert copying.wait(timeout=30)
            fetched: list = []
            reader = threading.Thread(target=lambda: fetched.append(cache.fetch(1)["h"]))
            reader.start()
            reader.join(timeout=30)
            assert not reader.is_alive(), "fetch of another batch waited for the transfer"
            assert_same(fetched[0], stored)
            assert updater.is_alive()  # the transfer was still going on meanwhile
        finally:
            release.set()
            updater.join(timeout=30)
        assert not updater.is_alive()
        assert_same(cache.fetch(0)["h"], slow.contiguous())
