"""Every documented method, with the stock cache's meaning, in every placement.

Tests about values going to disk and back call ``flush()`` before fetching, so that a
spilled value is read from its chunk file, not from the write-behind area (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheClosedError, CacheConfig, IntermediatesCache, IntermediateValue


def big(seed: int, dtype=torch.float32) -> torch.Tensor:
    """Large enough to be tiered under the default inline_bytes too."""
    return random_tensor(dtype, (64, 300), seed)


def disk_reads(cache: IntermediatesCache) -> int:
    return cache.stats()["disk"]["hits"]


def test_fetch_filters_by_list_or_set_and_skips_absent_names(make_cache, placement):
    """A filtered fetch reads from disk only the names asked for."""
    cache = make_cache(num_batches=1)
    a, b = big(1), big(2)
    cache.update(0, {"a": a, "b": b, "n": 3})
    cache.flush()
    spilled = int(placement != "ram")  # a and b are above every spilling placement's RAM
    fetched = cache.fetch(0, ["b", "missing"])
    assert list(fetched) == ["b"] and disk_reads(cache) == spilled
    assert_same(fetched["b"], b)
    assert_same(cache.fetch(0, {"a"})["a"], a)
    assert disk_reads(cache) == 2 * spilled
    assert cache.fetch(0, []) == {}
    assert list(cache.fetch(0)) == ["a", "b", "n"]


def test_update_replaces_and_keeps_other_names(make_cache):
    cache = make_cache(num_batches=1)
    old, new, other = big(1), big(2), big(3)
    cache.update(0, {"x": old, "y": other})
    cache.flush()
    cache.update(0, {"x": new})
    cache.flush()
    got = cache.fetch(0)
    assert_same(got["x"], new)
    assert_same(got["y"], other)


def test_delete_some_then_all(make_cache):
    cache = make_cache(num_batches=1)
    b = big(2)
    cache.update(0, {"a": big(1), "b": b, "c": 1})
    cache.flush()
    cache.delete(0, ["a"])
    got = cache.fetch(0)
    assert list(got) == ["b", "c"]
    assert_same(got["b"], b)
    cache.delete(0, {"b"})
    cache.delete(0)
    assert cache.fetch(0) == {}
    cache.flush()  # a write still in flight frees its disk bytes when it is done
    assert cache.stats()["host"]["bytes"] == 0 and cache.stats()["disk"]["bytes"] == 0


@pytest.mark.placements_only("a refused delete: nothing reaches the I/O threads")
def test_delete_of_an_absent_name_deletes_nothing(make_cache):
    cache = make_cache(num_batches=1)
    a = big(1)
    cache.update(0, {"a": a})
    with pytest.raises(KeyError, match="nope"):
        cache.delete(0, ["a", "nope"])
    assert_same(cache.fetch(0)["a"], a)


def test_append_len_iter(make_cache):
    cache = make_cache(num_batches=0)
    values = [big(seed) for seed in range(3)]
    for value in values:
        cache.append({"h": value, "i": len(cache)})
    cache.flush()
    assert len(cache) == 3
    for fetched, value, index in zip(cache.iter(["h", "i"]), values, range(3), strict=True):
        assert_same(fetched["h"], value)
        assert fetched["i"] == index
    assert [b["i"] for b in cache] == [0, 1, 2]
    assert [b["i"] for b in cache.iter_prefetch()] == [0, 1, 2]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_iter_prefetch_equals_iter(make_cache, depth):
    cache = make_cache(num_batches=5, prefetch_depth=depth)
    for index in range(5):
        cache.update(index, {"h": big(index), "i": index})
    cache.flush()
    prefetched = list(cache.iter_prefetch(["h"]))
    assert len(prefetched) == 5
    for index, values in enumerate(prefetched):
        assert list(values) == ["h"]
        assert_same(values["h"], big(index))


def test_pipeline_pattern_update_and_delete_while_prefetching(make_cache):
    """The sequential pipeline's propagation pass: fetch b, update b, delete b's input."""
    cache = make_cache(num_batches=6, prefetch_depth=2)
    # int64, so that x + 1 + 1 == x + 2 exactly.
    for index in range(6):
        cache.update(index, {"hidden": big(index, torch.int64), "mask": index})
    cache.flush()  # the first layer reads its inputs from disk
    for layer in range(3):
        for index, inputs in enumerate(cache.iter_prefetch(["hidden", "mask"])):
            assert inputs["mask"] == index
            assert_same(inputs["hidden"], big(index, torch.int64) + layer)
            cache.delete(index, ["hidden"])
            cache.update(index, {"hidden": inputs["hidden"] + 1})


@pytest.mark.placements_only("index checks, on batches holding no tensor")
def test_batch_index_errors_and_negative_indices(make_cache):
    cache = make_cache(num_batches=2)
    cache.update(-1, {"x": 1})
    assert cache.fetch(1) == {"x": 1}
    for call in (lambda: cache.fetch(2), lambda: cache.update(5, {}), lambda: cache.delete(-3)):
        with pytest.raises(IndexError, match="out of range"):
            call()
    with pytest.raises(TypeError):
        cache.fetch("0")


@pytest.mark.placements_only("values refused before anything is stored")
def test_bad_values_are_refused_and_nothing_changes(make_cache):
    cache = make_cache(num_batches=1)
    x = big(1)
    cache.update(0, {"x": x})
    with pytest.raises(TypeError, match="keys must be str"):
        cache.update(0, {"ok": big(2), 3: big(3)})
    with pytest.raises(TypeError, match="dict"):
        cache.update(0, [("x", 1)])
    with pytest.raises(TypeError, match="dict"):
        cache.append(["not", "a", "dict"])
    assert list(cache.fetch(0)) == ["x"] and len(cache) == 1
    assert_same(cache.fetch(0)["x"], x)


@pytest.mark.placements_only("which records are stored is placement's; no I/O mode changes it")
def test_shared_tensor_is_stored_once(make_cache, placement):
    cache = make_cache(num_batches=2)
    shared, own = big(1), big(2)
    cache.update(0, {"a": shared, "b": (shared, own)})
    cache.update(1, {"a": shared})
    stats = cache.stats()
    stored = stats["host"]["bytes"] + stats["disk"]["bytes"] - _clean_copies(cache)
    # Two records; the host tier counts one as the arena slot it takes (whole pages:
    # 76800 bytes take 77824), the disk as its bytes.
    engine = cache._core.placement
    records = list(engine.records.values())
    room = engine.host.room
    assert len(records) == 2
    assert stored == sum(room(r.nbytes) if r.resident == "host" else r.nbytes for r in records)
    if placement == "ram":
        assert cache.size() == {torch.device("cpu"): shared.nbytes + own.nbytes}
    cache.delete(0)
    cache.flush()  # batch 1 reads the shared chunk file, still there
    assert_same(cache.fetch(1)["a"], shared)


@pytest.mark.placements_only("each key's onload device is the entry's; no I/O mode changes it")
def test_regression_one_tensor_stored_for_two_devices_goes_back_to_each(make_cache):
    """Caught by issue 11's view tests: the second store of a tensor shared the first's
    record, and with it the first's onload device."""
    cache = make_cache(num_batches=1)
    shared = big(3)
    cache.update(0, {"here": shared, "there": IntermediateValue(shared, torch.device("meta"))})
    fetched = cache.fetch(0)
    assert_same(fetched["here"], shared)
    assert fetched["there"].device == torch.device("meta")


def _clean_copies(cache: IntermediatesCache) -> int:
    """Bytes that are both in memory and on disk (disk copies kept to make eviction free)."""
    placement = cache._core.placement
    return sum(r.nbytes for r in placement.records.values() if r.on_disk and r.resident)


@pytest.mark.placements_only("size() counts memory, not disk I/O")
def test_size_counts_memory_by_device(make_cache, placement):
    cache = make_cache(num_batches=1)
    x = big(1)
    cache.update(0, {"x": x, "small": torch.zeros(3), "n": None})
    cache.flush()  # until its disk write is done, a spilled value is also in memory
    size = cache.size()
    in_memory = sum(size.values())
    if placement == "ram":
        assert in_memory == x.nbytes + 12
    elif placement == "zero":
        assert in_memory == 0
    assert all(isinstance(device, torch.device) for device in size)


def test_constructor_takes_stock_batch_intermediates(tmp_path):
    x = big(1)
    batches = [{"x": IntermediateValue(x, torch.device("cpu")), "n": IntermediateValue(4, None)}]
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache(batches, "cpu", config=config) as cache:
        assert len(cache) == 1
        got = cache.fetch(0)
        assert got["n"] == 4
        assert_same(got["x"], x)


def test_from_dataloader_onloads_to_model_device(tmp_path):
    batches = [
        {"input_ids": torch.arange(200 * i, 200 * i + 200).reshape(2, 100)} for i in range(3)
    ]
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    with IntermediatesCache.from_dataloader(loader, "cpu", "cpu", config=config) as cache:
        assert len(cache) == 3
        for got, expected in zip(cache, batches, strict=True):
            assert_same(got["input_ids"], expected["input_ids"])
    with pytest.raises(TypeError, match="dicts"):
        IntermediatesCache.from_dataloader([(1, 2)], config=config)


def test_offload_device_none_keeps_values_where_they_are(tmp_path):
    # On the CPU: in host memory, so in the pool's arena (a copy: the caller's tensor
    # is theirs to free), on the device the value came from.
    config = CacheConfig(host_bytes="1GiB", disk_path=str(tmp_path))
    with IntermediatesCache(None, offload_device=None, config=config) as cache:
        x = big(1)
        cache.append({"x": x})
        got = cache.fetch(0)["x"]
        assert got.device == x.device and got.data_ptr() != x.data_ptr()
        assert_same(got, x)
        assert cache._core.pool.arena.holds(got)


def test_bad_offload_device_and_config_are_refused():
    with pytest.raises(ValueError, match="offload_device"):
        IntermediatesCache(None, offload_device="not-a-device")
    with pytest.raises(TypeError, match="CacheConfig"):
        IntermediatesCache(None, config={"host_bytes": 1})


def test_pin_memory_brings_spilled_values_up(tmp_path):
    config = CacheConfig(
        # A host tier of one value, one value's room for writes and for reads.
        **tier_sizes(256 * 1024, 256 * 1024),
        inline_bytes=0,
        disk_path=str(tmp_path),
        eviction="lru",
    )
    with IntermediatesCache.empty(3, "cpu", config=config) as cache:
        for index in range(3):
            cache.update(index, {"h": random_tensor(torch.float32, (256, 256), index)})  # 256 KiB
        cache.flush()
        record = cache._core._batches[0]["h"].leaves[0]
        assert record.resident is None  # the least recently used: spilled by batch 2
        cache.pin_memory(0, ["h"])
        assert record.resident == "host"
        assert_same(cache.fetch(0)["h"], random_tensor(torch.float32, (256, 256), 0))


@pytest.mark.placements_only("a closed cache refuses calls before any I/O")
def test_use_after_close_is_a_clear_error(make_cache):
    cache = make_cache(num_batches=1)
    cache.close()
    cache.close()  # twice is fine
    with pytest.raises(CacheClosedError, match="closed"):
        cache.fetch(0)
    with pytest.raises(CacheClosedError):
        cache.update(0, {"x": 1})
    for call in (cache.flush, lambda: cache.fetch(0), lambda: cache.update(0, {"x": 1})):
        with pytest.raises(CacheClosedError, match="create a new one"):  # the fix, every call
            call()
