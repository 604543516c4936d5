"""Nothing slow runs under the pool's lock, which every cache and lane of a pool share:
a store is made, a kept store completed on close and a device value copied to the host
with the lock released, each as work a decision asked for (``NeedsFirst``), the
decision then made again (``SharedPool.transact``)."""

from __future__ import annotations

import threading

import pytest
import torch

from faults.test_disk_full import OwnedLock
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.engine.transaction import NeedsFirst
from spillcache._internal.runtime import pool as pool_module
from spillcache._internal.store.tensor_store import Store

KIB64 = 64 * 2**10


def value(seed: int) -> torch.Tensor:
    return torch.randn(KIB64 // 4, generator=torch.Generator().manual_seed(seed))


def owned_lock(*caches: IntermediatesCache) -> OwnedLock:
    """The caches' pool lock (one pool), swapped for one that knows its holder."""
    pool = caches[0]._core.pool
    lock = OwnedLock()
    pool.lock = lock
    for cache in caches:
        cache._core._lock = lock
    pool.write_finished = threading.Condition(lock)
    return lock


def calls_record_the_lock(monkeypatch, owner, function: str, lock_of) -> list[bool]:
    """Every call of ``owner.function`` appends whether its thread held the lock."""
    held: list[bool] = []
    real = getattr(owner, function)

    def recording(*args, **kwargs):
        lock = lock_of()
        held.append(lock is not None and lock.owner == threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, function, recording)
    return held


def test_a_caches_store_is_made_with_the_lock_released(tmp_path, monkeypatch):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        lock = owned_lock(cache)
        made = calls_record_the_lock(monkeypatch, Store, "create", lambda: lock)
        cache.update(0, {"h": value(0)})  # the first spill: the store is made, then it goes
        cache.update(1, {"h": value(1)})
        assert made == [False]  # made once, outside the lock
        assert cache._core.tenant.has_store_on(0)
        cache.flush()
        assert torch.equal(cache.fetch(0)["h"], value(0))


def test_a_kept_store_is_completed_on_close_with_the_lock_released(tmp_path, monkeypatch):
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path),
                         keep_store=True)  # fmt: skip
    cache = IntermediatesCache.empty(3, "cpu", config=config)
    lock = owned_lock(cache)
    written = calls_record_the_lock(monkeypatch, Store, "write_tensor", lambda: lock)
    committed = calls_record_the_lock(monkeypatch, Store, "write_root_attributes", lambda: lock)
    for index in range(3):
        cache.update(index, {"h": value(index)})  # in the host tier: written on close
    assert not cache._core.tenant.has_store  # nothing spilled: made on close
    cache.close()
    assert len(written) == 3 and not any(written)
    assert committed and not any(committed)
    (path,) = tmp_path.iterdir()
    with IntermediatesCache.open(path) as again:
        for index in range(3):
            assert torch.equal(again.fetch(index)["h"], value(index))


def test_a_host_copy_a_decision_needs_is_made_outside_the_lock_then_it_decides_again(
    tmp_path, monkeypatch
):
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        pool = cache._core.pool
        lock = owned_lock(cache)
        copied = calls_record_the_lock(monkeypatch, pool.transfers, "to_host", lambda: lock)
        device_value = value(7)  # stands in for a value on an accelerator
        seen: list[tuple[dict, bool]] = []

        def decide() -> str:
            placement = pool.placement
            seen.append((dict(placement.premade), placement.copies_under_lock))
            if 99 not in placement.premade:
                placement.needs.copies[99] = device_value
                raise NeedsFirst("a host copy")
            return "decided"

        assert pool.transact(decide) == "decided"
        assert copied == [False]  # one copy, made without the lock
        (first, _), (second, _) = seen
        assert first == {} and torch.equal(second[99], device_value)
        assert second[99].data_ptr() != device_value.data_ptr()  # a copy, in the arena
        assert pool.arena.holds(second[99])
        assert pool.placement.premade == {}  # what a transaction made ends with it


def test_copies_taken_by_others_meanwhile_are_made_under_the_lock_on_the_last_try(tmp_path):
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        pool = cache._core.pool
        tries: list[bool] = []

        def decide() -> int:
            placement = pool.placement
            tries.append(placement.copies_under_lock)
            if not placement.copies_under_lock:  # a different victim every time
                placement.needs.copies[len(tries)] = value(len(tries))
                raise NeedsFirst("a host copy")
            return len(tries)

        assert pool.transact(decide) == pool_module._COPY_TRIES
        assert tries == [False] * (pool_module._COPY_TRIES - 1) + [True]


def test_a_store_made_for_an_update_that_then_fails_goes_again(tmp_path):
    """The update needs the store (its second value spills), which is made; deciding
    again, the second value finds no room: the store goes, as the update stored nothing."""
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path),
                         disk_bytes=KIB64)  # fmt: skip
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        with pytest.raises(Exception, match="disk_bytes"):
            cache.update(0, {"a": value(0), "b": value(1)})
        assert not cache._core.tenant.has_store
        assert [p for p in tmp_path.rglob("*")] == []
        cache.update(0, {"a": value(0)})
        assert cache._core.tenant.has_store_on(0)


def test_promotion_waits_for_the_store_its_eviction_needs(tmp_path, monkeypatch):
    """A read's promotion evicts a value of a cache with no store yet: the moves are
    taken back, the store is made with the lock released, then it promotes."""
    config = CacheConfig(host_bytes="256KiB", inline_bytes=0, disk_path=str(tmp_path),
                         eviction="lru", write_behind_bytes=KIB64,
                         read_buffer_bytes=KIB64)  # fmt: skip
    with (
        IntermediatesCache.empty(2, "cpu", config=config) as a,
        IntermediatesCache.empty(2, "cpu", config=config) as b,
    ):
        a.update(0, {"h": value(0)})
        b.update(0, {"h": value(1)})
        a.update(1, {"h": value(2)})  # the host tier (two values) full: a0 to disk
        a.flush()
        assert not b._core.tenant.has_store
        lock = owned_lock(a, b)
        made = calls_record_the_lock(monkeypatch, Store, "create", lambda: lock)
        assert torch.equal(a.fetch(0)["h"], value(0))  # read, then promoted over b0
        assert made == [False] and b._core.tenant.has_store_on(0)
        resident = {r.label: r.resident for r in a._core.placement.records_of(a._core.tenant)}
        assert resident["batch 0, key 'h'"] == "host"
        b.flush()
        assert torch.equal(b.fetch(0)["h"], value(1))
