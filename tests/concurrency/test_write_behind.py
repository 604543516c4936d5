"""Write-behind: update returns before the disk write; reads are served from the
buffer meanwhile; updates wait when the buffer budget is spent. Forced with Events."""

from __future__ import annotations

import gc
import threading
import weakref

import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.store.tensor_store import Store

SHAPE = (32, 64)  # 8 KiB of float32
NBYTES = 8 * 1024


class BlockedWrites:
    """Writes on I/O threads wait for ``release``; ``writing`` is set when one starts."""

    def __init__(self, monkeypatch) -> None:
        self.writing, self.release = threading.Event(), threading.Event()
        original = Store.write_tensor

        def write_tensor(store, *args, **kwargs):
            if threading.current_thread().name.startswith("spillcache-io"):
                self.writing.set()
                assert self.release.wait(timeout=30)
            return original(store, *args, **kwargs)

        monkeypatch.setattr(Store, "write_tensor", write_tensor)


class SpyCondition(threading.Condition):
    """The cache's write-finished condition, saying when somebody waits on it."""

    def __init__(self, lock) -> None:
        super().__init__(lock)
        self.waiting = threading.Event()

    def wait_for(self, predicate, timeout=None):
        if not predicate():
            self.waiting.set()
        return super().wait_for(predicate, timeout)


def waits_for_a_write(cache, spy: SpyCondition, blocked: BlockedWrites, call, *args) -> None:
    """``call(*args)``, on a thread, waits for a blocked write with one value in the
    write-behind area (it adds none meanwhile), and ends once the write is released."""
    thread = threading.Thread(target=call, args=args)
    thread.start()
    assert spy.waiting.wait(timeout=30), f"{call.__name__} must wait for a write"
    assert cache.stats()["write_behind"]["bytes"] == NBYTES  # memory did not grow
    blocked.release.set()
    thread.join(timeout=30)
    assert not thread.is_alive()


def make(tmp_path, **settings) -> IntermediatesCache:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), **settings)
    return IntermediatesCache.empty(4, "cpu", config=config)


def test_update_returns_before_the_write_and_reads_come_from_the_buffer(tmp_path, monkeypatch):
    with make(tmp_path) as cache:
        blocked = BlockedWrites(monkeypatch)
        value = random_tensor(torch.float32, SHAPE, 0)
        cache.update(0, {"h": value})  # returns while the write cannot finish
        assert blocked.writing.wait(timeout=30)
        stats = cache.stats()
        assert stats["write_behind"]["writes"] == 1 and stats["write_behind"]["bytes"] == NBYTES
        assert stats["disk"]["bytes_written"] == 0
        assert_same(cache.fetch(0)["h"], value)  # read-your-writes, from the buffer
        assert cache.stats()["disk"]["hits"] == 0
        blocked.release.set()
        cache.flush()
        assert cache.stats()["disk"]["bytes_written"] == NBYTES
        assert cache.stats()["write_behind"]["writes"] == 0
        assert_same(cache.fetch(0)["h"], value)  # now from disk
        assert cache.stats()["disk"]["hits"] == 1


def test_update_waits_when_the_write_behind_budget_is_spent(tmp_path, monkeypatch):
    with make(tmp_path, write_behind_bytes=NBYTES) as cache:
        spy = SpyCondition(cache._core._lock)
        cache._core.pool.write_finished = spy
        blocked = BlockedWrites(monkeypatch)
        values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(2)]
        cache.update(0, {"h": values[0]})  # in flight: exactly the budget
        assert not spy.waiting.is_set()
        waits_for_a_write(cache, spy, blocked, cache.update, 1, {"h": values[1]})
        cache.flush()
        for index, value in enumerate(values):
            assert_same(cache.fetch(index)["h"], value)
        assert cache.stats()["stall_seconds"] > 0


def test_close_during_a_write_joins_and_removes_the_store(tmp_path, monkeypatch):
    cache = make(tmp_path)
    blocked = BlockedWrites(monkeypatch)
    cache.update(0, {"h": random_tensor(torch.float32, SHAPE, 0)})
    cache.update(1, {"h": random_tensor(torch.float32, SHAPE, 1)})  # queued behind it
    assert blocked.writing.wait(timeout=30)
    path = cache.store_path
    closer = threading.Thread(target=cache.close)
    closer.start()
    blocked.release.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert not any(t.name.startswith("spillcache-io") for t in threading.enumerate())
    assert path is not None and not (tmp_path / path).exists()


def test_a_value_larger_than_the_write_behind_budget_waits_only_for_an_empty_area(
    tmp_path, monkeypatch
):
    with make(tmp_path, write_behind_bytes=NBYTES // 2) as cache:
        spy = SpyCondition(cache._core._lock)
        cache._core.pool.write_finished = spy
        blocked = BlockedWrites(monkeypatch)
        values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(2)]
        cache.update(0, {"h": values[0]})  # the area was empty: stored at once
        assert not spy.waiting.is_set()
        waits_for_a_write(cache, spy, blocked, cache.update, 1, {"h": values[1]})
        cache.flush()
        for index, value in enumerate(values):
            assert_same(cache.fetch(index)["h"], value)


def test_keep_store_waits_for_writes_before_completing_the_store(tmp_path, monkeypatch):
    cache = make(tmp_path, keep_store=True)
    blocked = BlockedWrites(monkeypatch)
    values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(2)]
    for index, value in enumerate(values):
        cache.update(index, {"h": value})
    assert blocked.writing.wait(timeout=30)
    closer = threading.Thread(target=cache.close)
    closer.start()
    blocked.release.set()
    closer.join(timeout=30)
    store = Store.open(cache.store_path)
    for index, value in enumerate(values):
        record = cache._core._batches[index]["h"].leaves[0]
        read = store.read_tensor(record.array, tuple(SHAPE), torch.float32, checksum=True)
        assert_same(read, value)


def test_regression_a_written_value_is_freed_without_waiting_for_the_cyclic_gc(tmp_path):
    """flatten() used a recursive closure: a reference cycle that kept every tensor of
    an update alive until the cyclic garbage collector ran, so RSS grew far past the
    budgets; and an idle I/O thread kept its last job's tensor."""
    gc.disable()
    try:
        with make(tmp_path) as cache:
            value = random_tensor(torch.float32, SHAPE, 0)
            alive = weakref.ref(value)
            cache.update(0, {"h": (value, {"again": value})})
            del value
            cache.flush()
            cache._core.io.wait_idle()
            assert alive() is None, "the cache (or a thread) still holds the written value"
            assert_same(cache.fetch(0)["h"][0], random_tensor(torch.float32, SHAPE, 0))
    finally:
        gc.enable()


def test_regression_pin_memory_waits_for_write_room_as_update_does(tmp_path, monkeypatch):
    """pin_memory brings values up from disk, and making room for them evicts values
    that must be written: it skipped the update's backpressure, so a run of pin_memory
    calls while the disk was slow grew the write-behind area past its budget by the
    whole host tier (found by a review of docs/architecture.md against the code)."""
    config = CacheConfig(
        **tier_sizes(3 * NBYTES, NBYTES),  # a host tier of 3 values
        eviction="lru",
        inline_bytes=0,
        disk_path=str(tmp_path),
    )
    with IntermediatesCache.empty(6, "cpu", config=config) as cache:
        values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(6)]
        for index, value in enumerate(values):  # 0-2 end on disk, 3-5 in the host tier
            cache.update(index, {"h": value})
        cache.flush()
        spy = SpyCondition(cache._core._lock)
        cache._core.pool.write_finished = spy
        blocked = BlockedWrites(monkeypatch)
        cache.pin_memory(0)  # evicts 3, which must be written: exactly the budget
        assert not spy.waiting.is_set()
        waits_for_a_write(cache, spy, blocked, cache.pin_memory, 1)  # 4, 5 stay in the host tier
        cache.flush()
        for index, value in enumerate(values):
            assert_same(cache.fetch(index)["h"], value)
