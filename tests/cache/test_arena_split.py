"""host_bytes is the pool's arena: values live in its slots, the caller's tensors are
let go, disk I/O needs no staging, and the split between the host tier and the values
in transit gives way where the region ran short."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheConfig, IntermediatesCache

SHAPE = (256, 256)  # 256 KiB of float32
NBYTES = 256 * 1024


def config(tmp_path, tier: int, **more) -> CacheConfig:
    """A host tier of ``tier`` values, one value's room each for writes and reads."""
    return CacheConfig(
        **tier_sizes(tier * NBYTES, NBYTES),
        inline_bytes=0,
        disk_path=str(tmp_path),
        **more,
    )


def test_values_live_in_slots_and_the_callers_tensors_are_let_go(tmp_path):
    with IntermediatesCache.empty(4, "cpu", config=config(tmp_path, 2)) as cache:
        arena = cache._core.pool.arena
        originals = [random_tensor(torch.float32, SHAPE, seed) for seed in range(4)]
        for index, original in enumerate(originals):
            value = original.clone()
            alive = weakref.ref(value)
            cache.update(index, {"h": value})
            del value
            gc.collect()
            assert alive() is None, "the cache kept the caller's tensor"
        cache.flush()
        for index, original in enumerate(originals):
            got = cache.fetch(index)["h"]
            assert arena.holds(got)  # from the host tier, or read back into a slot
            assert_same(got, original)
        stats = cache.stats()
        assert stats["disk"]["bytes_read"] > 0 and stats["pool"]["arena"]["overflows"] == 0


def test_direct_io_goes_straight_from_and_to_slots(tmp_path):
    settings = config(tmp_path, 0, direct_io=True)
    with IntermediatesCache.empty(4, "cpu", config=settings) as cache:
        values = [random_tensor(torch.bfloat16, (333, 517), seed) for seed in range(4)]
        for index, value in enumerate(values):
            cache.update(index, {"h": value})
        cache.flush()
        store = cache._core.tenant.store
        assert store.direct
        assert store._staging is None, "a value in a slot went through a staging buffer"
        for index, value in enumerate(values):
            assert_same(cache.fetch(index)["h"], value)
        assert cache.stats()["disk"]["hits"] == 4


def test_a_region_short_of_room_takes_it_from_the_host_tier_down_to_half(tmp_path):
    with IntermediatesCache.empty(16, "cpu", config=config(tmp_path, 8)) as cache:
        values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(16)]
        for index, value in enumerate(values):  # 0-7 in the host tier, 8-15 on disk
            cache.update(index, {"h": value})
        cache.flush()
        assert cache.stats()["host"]["budget"] == 8 * NBYTES
        # The caller holds three values read back: the region (8 resident + 2 of room)
        # has room for two; the third goes outside it.
        with pytest.warns(UserWarning, match="no room for a value of 256.0 KiB"):
            held = [cache.fetch(index)["h"] for index in (8, 9, 10)]
        arena = cache.stats()["pool"]["arena"]
        assert (arena["overflows"], arena["overflow_bytes"]) == (1, NBYTES)
        del held
        # The next store takes that room from the host tier, which evicts to fit it.
        cache.update(0, {"h": values[0] + 1})
        stats = cache.stats()
        assert stats["host"]["budget"] == 7 * NBYTES
        assert stats["host"]["bytes"] <= 7 * NBYTES
        assert stats["pool"]["arena"]["overflows"] == 1
        # Never below half of it, however short the region runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                held = [cache.fetch(index)["h"] for index in range(8, 16)]
                cache.update(1, {"h": values[1] + 1})
                del held
        assert cache.stats()["host"]["budget"] == 4 * NBYTES
        for index in range(2, 16):
            assert_same(cache.fetch(index)["h"], values[index])


def test_a_value_larger_than_the_region_overflows_without_shrinking_the_tier(tmp_path):
    with IntermediatesCache.empty(1, "cpu", config=config(tmp_path, 2)) as cache:
        big = random_tensor(torch.float32, (1024, 1024), 0)  # 4 MiB > 1 MiB region
        with pytest.warns(UserWarning, match="no room for a value of 4.0 MiB"):
            cache.update(0, {"h": big})
        cache.update(0, {"h": big})
        assert cache.stats()["host"]["budget"] == 2 * NBYTES
        cache.flush()
        assert_same(cache.fetch(0)["h"], big)


def test_a_value_the_region_has_no_room_for_is_copied_out_of_the_callers_hands_once(tmp_path):
    # The region (4 values: 2 in the host tier, one's room each for writes and reads)
    # is full of values the caller holds: a new value's one copy, made before the
    # pool's lock, goes outside it and is stored from there.
    values = [random_tensor(torch.float32, SHAPE, seed) for seed in range(7)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with IntermediatesCache.empty(7, "cpu", config=config(tmp_path, 2)) as cache:
            arena = cache._core.pool.arena
            for index in range(6):
                cache.update(index, {"h": values[index]})
            cache.flush()
            held = [cache.fetch(index)["h"] for index in range(6)]
            before = arena.stats()["overflows"]
            cache.update(6, {"h": values[6]})
            after = arena.stats()["overflows"]
            del held
            for index, value in enumerate(values):
                assert_same(cache.fetch(index)["h"], value)
    assert after - before == 1, f"one value stored made {after - before} overflow copies"


def test_values_just_over_a_page_multiple_fit_the_split_with_nothing_held(tmp_path):
    # 65537 bytes take a slot of 17 pages (69632 bytes, 6 % more): counted by their
    # bytes, a host tier of 7.75 MiB (123 such values) would fill slots past the
    # region's 8 MiB, with nothing held by the caller.
    settings = CacheConfig(
        host_bytes=8 * 2**20,
        write_behind_bytes=128 * 1024,
        read_buffer_bytes=128 * 1024,
        inline_bytes=0,
        disk_path=str(tmp_path),
    )
    base = torch.randint(0, 256, (65537,), dtype=torch.uint8)
    with IntermediatesCache.empty(0, "cpu", config=settings) as cache:
        for index in range(200):
            cache.append({"h": base.roll(index)})
        cache.flush()
        for index in (0, 100, 199):
            assert_same(cache.fetch(index)["h"], base.roll(index))
        stats = cache.stats()
    assert stats["pool"]["arena"]["overflows"] == 0, (
        f"{stats['pool']['arena']['overflows']} overflows with nothing held (host tier "
        f"{stats['host']['bytes']} bytes, budget {stats['host']['budget']})"
    )
    assert stats["host"]["bytes"] <= stats["host"]["budget"] == 8 * 2**20 - 256 * 1024


@pytest.mark.parametrize("eviction", ["scan", "lru"])
def test_the_host_tier_comes_down_to_a_budget_the_split_lowered(tmp_path, eviction):
    # A host tier of 3 MiB holds two values of 1.5 MiB and leaves the region 1 MiB: no
    # room for the next value's copy, which overflows, so the tier's budget is lowered
    # (to 1.5 MiB). With "scan" each newcomer is the value needed furthest ahead and
    # bypasses the tier: the tier must still come down to its budget, so that the
    # region has room for the values in transit and the overflows stop.
    settings = CacheConfig(
        host_bytes=4 * 2**20, inline_bytes=0, eviction=eviction, disk_path=str(tmp_path)
    )
    values = [random_tensor(torch.float32, (384, 1024), seed) for seed in range(12)]
    overflows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with IntermediatesCache.empty(0, "cpu", config=settings) as cache:
            for value in values:
                cache.append({"h": value})
                overflows.append(cache.stats()["pool"]["arena"]["overflows"])
            cache.flush()
            for index, value in enumerate(values):
                assert_same(cache.fetch(index)["h"], value)
            host = cache.stats()["pool"]["host"]
    assert host["budget"] < 3 * 2**20, "the region never ran short: nothing to check"
    assert host["bytes"] <= host["budget"], (
        f"host tier {host['bytes']} bytes over its lowered budget {host['budget']}"
    )
    assert overflows[-1] == overflows[-5], f"overflows after each update: {overflows}"
