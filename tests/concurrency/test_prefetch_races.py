"""Races between the prefetch thread and the caller, forced with Events, never sleeps."""

from __future__ import annotations

import threading

import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache


def make(tmp_path, batches: int, **settings) -> IntermediatesCache:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), **settings)
    cache = IntermediatesCache.empty(batches, config=config)
    for index in range(batches):
        cache.update(index, {"h": random_tensor(torch.int64, (32, 32), index)})
    return cache


def drain_worker(cache: IntermediatesCache) -> None:
    """Return once every fetch queued before now has finished (the worker runs in order)."""
    cache._core.worker.submit(lambda: None).result()


def test_batch_updated_after_its_prefetch_is_fetched_again(tmp_path):
    with make(tmp_path, 3, prefetch_depth=2) as cache:
        replacement = random_tensor(torch.int64, (32, 32), 100)
        iterator = cache.iter_prefetch(["h"])
        first = next(iterator)
        drain_worker(cache)  # batch 1 is now prefetched: its old value is in hand
        cache.update(1, {"h": replacement})
        assert_same(first["h"], random_tensor(torch.int64, (32, 32), 0))
        assert_same(next(iterator)["h"], replacement)
        assert_same(next(iterator)["h"], random_tensor(torch.int64, (32, 32), 2))


def test_batch_deleted_after_its_prefetch_is_seen_deleted(tmp_path):
    with make(tmp_path, 2, prefetch_depth=1) as cache:
        iterator = cache.iter_prefetch()
        next(iterator)
        drain_worker(cache)
        cache.delete(1)
        assert next(iterator) == {}


def test_update_waits_for_a_fetch_in_flight(tmp_path, monkeypatch):
    """A caller's update of batch b while the worker reads batch b+1: both see a
    consistent cache (the worker's read completes first, then the update applies)."""
    with make(tmp_path, 2, prefetch_depth=1) as cache:
        placement = cache._core.placement
        reading, release = threading.Event(), threading.Event()
        original_load = placement.load

        def slow_load(record):
            if threading.current_thread().name.startswith("spillcache-prefetch"):
                reading.set()
                assert release.wait(timeout=30)
            return original_load(record)

        monkeypatch.setattr(placement, "load", slow_load)
        future = cache._core.submit_fetch(1, None)
        assert reading.wait(timeout=30)
        updater = threading.Thread(
            target=cache.update, args=(0, {"h": torch.zeros(32, 32, dtype=torch.int64)})
        )
        updater.start()
        updater.join(timeout=0.2)
        assert updater.is_alive(), "update must wait for the lock held by the read in flight"
        release.set()
        updater.join(timeout=30)
        assert not updater.is_alive()
        _, values = future.result(timeout=30)
        assert_same(values["h"], random_tensor(torch.int64, (32, 32), 1))
        assert_same(cache.fetch(0)["h"], torch.zeros(32, 32, dtype=torch.int64))


def test_abandoned_iteration_and_close_join_the_worker(tmp_path):
    cache = make(tmp_path, 4, prefetch_depth=3)
    iterator = cache.iter_prefetch()
    next(iterator)
    iterator.close()  # queued prefetches are cancelled
    cache.close()
    assert not any(t.name.startswith("spillcache-prefetch") for t in threading.enumerate())
