"""A transaction taken back leaves nothing of itself, and takes nothing of others.

A decision that needs slow work first (a store made, a device value copied to the host)
is made again once that work is done with the pool's lock released (``NeedsFirst``,
``SharedPool.transact``). Meanwhile other threads go on: a cache closes, a kept cache
flushes. These tests hold a transaction at the point where its lock is released
(``threading.Event`` gates on the pool's own steps) and check what a failed or retried
decision leaves: a kept store complete, a flush that succeeds, the disk's room as it
was, a copy made once, no needs left for the next transaction, no store on disk.
The CPU stands in for an accelerator where a device tier is needed (the tenant's
device tier targets the CPU, as tests/unit/test_placement.py does).
"""

from __future__ import annotations

import errno
import threading

import pytest
import torch

from faults.injection import FreeSpace, leftovers
from spill_testing import assert_same
from spillcache import (
    CacheClosedError,
    CacheConfig,
    CapacityError,
    IntermediatesCache,
)  # fmt: skip
from spillcache._internal.engine.tiers import footprint

KIB64 = 64 * 2**10
ROOM = footprint(KIB64)


def value(seed: int, nbytes: int = KIB64) -> torch.Tensor:
    return torch.randn(nbytes // 4, generator=torch.Generator().manual_seed(seed))


def gate(owner, name: str, when=lambda *args, **kwargs: True, *, after: bool = False, patch=None):
    """``owner.name`` made to stop (``reached`` set) until ``go`` is set, where ``when``
    holds for its arguments: before it runs, or ``after`` it returned. An ``owner``
    that outlives the test (a class) is patched with ``patch`` (a MonkeyPatch)."""
    reached, go = threading.Event(), threading.Event()
    real = getattr(owner, name)

    def gated(*args, **kwargs):
        result = real(*args, **kwargs) if after else None
        if when(*args, **kwargs):
            reached.set()
            assert go.wait(30), "the test never let the gated step go on"
        return result if after else real(*args, **kwargs)

    (setattr if patch is None else patch.setattr)(owner, name, gated)
    return reached, go


def run_in_thread(call, name: str | None = None) -> tuple[threading.Thread, list]:
    errors: list[BaseException] = []

    def run():
        try:
            call()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, errors


def with_cpu_device_tier(cache: IntermediatesCache, budget: int) -> None:
    core = cache._core
    core.tenant.device_target = torch.device("cpu")
    core.tenant.device_tier = True
    core.placement.device.budget = budget


def test_a_kept_store_closed_while_an_update_waited_is_not_removed(tmp_path):
    config = CacheConfig(
        host_bytes="256KiB", inline_bytes=0, disk_path=str(tmp_path), keep_store=True
    )
    cache = IntermediatesCache.empty(2, "cpu", config=config)
    cache.update(0, {"h": value(0)})  # in the host tier: the close writes it to the store
    # The update's store is made, then its host copies are made with the lock released.
    made, go = gate(cache._core.pool, "_copy_to_host")
    updater, errors = run_in_thread(lambda: cache.update(1, {"h": value(1, 4 * 2**20)}))
    assert made.wait(30)
    path = cache._core.tenant.store.path
    cache.close()  # completes the kept store
    go.set()
    updater.join(30)
    assert [type(error) for error in errors] == [CacheClosedError]  # decided again: closed
    assert path.exists(), "the failed update took back the store close() completed"
    with IntermediatesCache.open(str(path)) as reopened:
        assert_same(reopened.fetch(0)["h"], value(0))


def test_a_flush_goes_on_when_an_update_that_made_the_store_fails(tmp_path):
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), disk_bytes=KIB64,
        keep_store=True,
    )  # fmt: skip
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        pool = cache._core.pool
        update_made, update_go = gate(pool, "_copy_to_host")
        flush_saw, flush_go = gate(
            pool,
            "make_store",
            lambda *a, **k: threading.current_thread().name == "flusher",
            after=True,
        )
        # Two values, room on disk for one: once its store is made, the update fails.
        updater, update_errors = run_in_thread(
            lambda: cache.update(0, {"a": value(0), "b": value(1)})
        )
        assert update_made.wait(30)
        flusher, flush_errors = run_in_thread(cache.flush, name="flusher")
        assert flush_saw.wait(30)  # the flush found the update's store made
        update_go.set()
        updater.join(30)
        flush_go.set()
        flusher.join(30)
        assert [type(error) for error in update_errors] == [CapacityError]  # disk_bytes
        assert flush_errors == []
        assert cache._core.tenant.has_store_on(0)


def test_an_update_whose_victims_cache_closes_meanwhile_goes_through(tmp_path):
    config = CacheConfig(
        host_bytes="256KiB", inline_bytes=0, disk_path=str(tmp_path), eviction="lru",
        write_behind_bytes=KIB64, read_buffer_bytes=KIB64,
    )  # fmt: skip
    a = IntermediatesCache.empty(2, "cpu", config=config)
    b = IntermediatesCache.empty(2, "cpu", config=config)
    try:
        b.update(0, {"h": value(1)})
        a.update(0, {"h": value(0)})  # a host tier of two values: full
        pool = a._core.pool
        assert pool is b._core.pool and not b._core.tenant.has_store
        # a's next update evicts b's value, which needs b's store made first.
        making, go = gate(pool, "_create_store")
        updater, errors = run_in_thread(lambda: a.update(1, {"h": value(2)}))
        assert making.wait(30)
        b.close()  # b's values leave the pool: room for a's value without evicting
        go.set()
        updater.join(30)
        assert errors == []
        assert_same(a.fetch(1)["h"], value(2))
        assert_same(a.fetch(0)["h"], value(0))
    finally:
        a.close()
        b.close()
    assert leftovers(tmp_path) == []


def test_a_decision_taken_back_leaves_the_disks_room_as_it_was(tmp_path, monkeypatch):
    free_space = FreeSpace(monkeypatch)
    disks = [tmp_path / "d0", tmp_path / "d1"]
    for disk in disks:
        disk.mkdir()
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=[str(d) for d in disks])
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        free_space.set(disks[0], 2**30)
        free_space.set(disks[1], 0)
        cache.update(0, {"x": value(0)})  # only d0 has room: its store is made
        cache.flush()
        # Room for one value on each disk: "a" goes to d0; "b" to d1, whose store is
        # made first, so the decision ("a" queued to d0 included) is taken back once.
        free_space.set(disks[0], ROOM + 4096)
        free_space.set(disks[1], ROOM + 4096)
        cache.update(1, {"a": value(1), "b": value(2)})
        cache.flush()
        assert_same(cache.fetch(1)["a"], value(1))
        assert_same(cache.fetch(1)["b"], value(2))


def test_a_new_values_host_copy_is_made_once_outside_the_lock():
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=None)
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        with_cpu_device_tier(cache, KIB64)
        pool = cache._core.pool
        cache.update(0, {"a": value(0)})  # the device tier is full
        asked: list[int] = []  # how many copies each try asked for
        under_lock: list[int] = []  # bytes copied with the lock held
        real_copy, real_to_host = pool._copy_to_host, pool.transfers.to_host

        def to_host(tensor, **options):
            if pool.lock.locked():
                under_lock.append(tensor.nbytes)
            return real_to_host(tensor, **options)

        def copy_outside(needs):
            asked.append(len(needs.copies))
            return real_copy(needs)

        pool._copy_to_host = copy_outside
        pool.transfers.to_host = to_host
        cache.update(1, {"b": value(1)})  # no room on the device: the host tier
        (b,) = [r for r in cache._core.placement.records_of(cache._core.tenant) if r.batch == 1]
        assert b.resident == "host"
        assert (asked, under_lock) == ([1], [])  # made once, outside the lock, and used
        assert_same(cache.fetch(1)["b"], value(1))


def test_a_failed_decision_leaves_no_needs_for_the_next_transaction():
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=None)
    with IntermediatesCache.empty(3, "cpu", config=config) as cache:
        with_cpu_device_tier(cache, KIB64)
        pool, placement = cache._core.pool, cache._core.placement
        cache.update(0, {"a": value(0)})
        with pytest.raises(CapacityError):
            # "b" asks for a host copy; "c" fits nowhere (no disk tier)
            cache.update(1, {"b": value(1), "c": value(2, 4 * 2**20)})
        assert not placement.needs
        asked: list[list[tuple]] = []
        real_copy = pool._copy_to_host

        def recording(needs):
            asked.append([key[3] for key in needs.copies])  # the shapes asked for
            return real_copy(needs)

        pool._copy_to_host = recording
        d = value(3, 16 * 2**10)
        cache.update(2, {"d": d})
        assert asked == [[tuple(d.shape)]]  # d's own copy, nothing of b's or c's


def test_a_store_made_for_a_transaction_that_fails_later_is_removed(tmp_path):
    disks = [tmp_path / "d0", tmp_path / "d1"]
    for disk in disks:
        disk.mkdir()
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=[str(d) for d in disks])
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        pool = cache._core.pool
        real_create = pool._create_store

        def create(disk):
            if disk == 1:
                raise OSError(errno.EACCES, "no store on d1 today")
            return real_create(disk)

        pool._create_store = create
        with pytest.raises(OSError, match="no store on d1 today"):
            cache.update(0, {"a": value(0), "b": value(1)})  # "a" to d0, "b" to d1
        assert not cache._core.tenant.has_store
        assert leftovers(disks[0]) == [] and leftovers(disks[1]) == []


def test_a_copy_made_for_a_deleted_value_is_not_used_for_a_new_one_in_its_memory():
    """A stored value's memory is the caller's again once it is deleted: a copy made of
    it outside the lock must not stand in for a new value stored in the same memory."""
    config = CacheConfig(host_bytes="1MiB", inline_bytes=0, disk_path=None, eviction="lru")
    with IntermediatesCache.empty(3, "cpu", config=config) as cache:
        with_cpu_device_tier(cache, KIB64)  # the device tier holds one value
        buffer = value(0).clone()  # the caller's buffer, reused from value to value
        cache.update(0, {"x": buffer})  # the device tier holds the buffer itself
        copied, go = gate(cache._core.pool, "_copy_to_host", after=True)
        # The new value takes the device tier: x is evicted to the host tier, and its
        # host copy is made outside the lock.
        updater, errors = run_in_thread(lambda: cache.update(1, {"n": value(1)}))
        assert copied.wait(30)
        cache.delete(0)  # x goes: the caller may use its buffer again
        buffer.copy_(value(2))
        cache.update(2, {"y": buffer})  # in the device tier, where x was
        go.set()
        updater.join(30)
        assert errors == []
        # The retry evicts y, whose bytes' copy_key is x's: x's copy stands in for it.
        assert_same(cache.fetch(1)["n"], value(1))
        got = cache.fetch(2)["y"]
        assert not torch.equal(got, value(0)), "y reads back as x, the value deleted"
        assert_same(got, value(2))
