"""Kept stores are plain zarr v3: readable with zarr alone, bit for bit, keys safe."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import zarr

from spill_testing import ALL_DTYPES, assert_same, bits, random_tensor
from spillcache import CacheConfig, ConfigError, IntermediatesCache, StoreError
from spillcache._internal.dtypes import dtype_name
from spillcache._internal.io import chunkio


def _kept(tmp_path, batches: list[dict], **settings) -> str:
    config = CacheConfig(disk_path=str(tmp_path), keep_store=True, **settings)
    cache = IntermediatesCache(batches, config=config)
    cache.close()
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("spillcache-")]
    return str(path)


def _array_bits(array) -> bytes:
    return np.ascontiguousarray(array[...]).tobytes()


@pytest.mark.parametrize("host_bytes", [0, "1GiB"], ids=["spilled", "in-ram"])
def test_plain_zarr_reads_every_dtype_bit_for_bit(tmp_path, host_bytes):
    originals = {dtype_name(d): random_tensor(d, (3, 5), i) for i, d in enumerate(ALL_DTYPES)}
    originals["scalar"] = random_tensor(torch.bfloat16, (), 99)
    originals["empty"] = random_tensor(torch.float16, (0, 4), 98)
    originals["tiny"] = torch.arange(3)  # inline under the default inline_bytes
    path = _kept(tmp_path, [originals], host_bytes=host_bytes)

    group = zarr.open_group(path, mode="r")
    root = group.attrs["spillcache"]
    assert root["format_version"] == 1 and root["complete"] is True and root["num_batches"] == 1
    entries = group["batches/0"].attrs["spillcache"]["entries"]
    assert list(entries) == list(originals)
    for key, original in originals.items():
        node = entries[key]
        assert node["type"] == "tensor" and node["device"] == "cpu"
        array = group[node["array"]]
        assert array.shape == tuple(original.shape)
        assert array.attrs["spillcache"]["torch_dtype"] == dtype_name(original.dtype)
        assert _array_bits(array) == bits(original), key


def test_numpy_known_dtypes_read_as_values(tmp_path):
    original = torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(3, 4)
    path = _kept(tmp_path, [{"x": original}], host_bytes=0, inline_bytes=0)
    group = zarr.open_group(path, mode="r")
    node = group["batches/0"].attrs["spillcache"]["entries"]["x"]
    assert np.array_equal(group[node["array"]][...], original.numpy())


def test_structure_is_json_not_pickle(tmp_path):
    value = {"h": (random_tensor(torch.float32, (4, 4)), None, 3, "s")}
    path = _kept(tmp_path, [value], host_bytes=0, inline_bytes=0)
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                head = handle.read(2)
            assert head != b"\x80\x04" and head != b"\x80\x05", f"{name} looks pickled"
    with open(os.path.join(path, "batches", "0", "zarr.json")) as handle:
        entries = json.load(handle)["attributes"]["spillcache"]["entries"]
    node = entries["h"]
    assert node["type"] == "tuple"
    assert [item["type"] for item in node["items"]] == ["tensor", "none", "int", "str"]


def test_keys_never_become_paths(tmp_path):
    keys = ["../escape", "a/b", "/abs", "..", ".", "", "ключ", "zarr.json", "c.0"]
    values = {key: random_tensor(torch.float32, (4, 4), i) for i, key in enumerate(keys)}
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path / "spill"), keep_store=True
    )
    cache = IntermediatesCache([values], config=config)
    fetched = cache.fetch(0)
    assert list(fetched) == keys
    for key in keys:
        assert bits(fetched[key]) == bits(values[key])
    path = cache.store_path
    cache.close()
    # Nothing outside the store, and no file or directory named after a key.
    assert sorted(os.listdir(tmp_path)) == ["spill"]
    assert os.listdir(tmp_path / "spill") == [os.path.basename(path)]
    names = {name for _, dirs, files in os.walk(path) for name in dirs + files}
    assert not names & {"escape", "b", "abs", "ключ"}
    group = zarr.open_group(path, mode="r")
    assert list(group["batches/0"].attrs["spillcache"]["entries"]) == keys


def test_keep_store_without_a_disk_tier_is_refused():
    with pytest.raises(ConfigError, match="disk_path"):
        IntermediatesCache(None, config=CacheConfig(keep_store=True, disk_path=None))


def _spill_one(config: CacheConfig) -> IntermediatesCache:
    cache = IntermediatesCache.empty(1, "cpu", config=config)
    cache.update(0, {"h": random_tensor(torch.float32, (64, 64))})
    return cache


def test_direct_io_auto_falls_back_to_buffered_where_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkio, "direct_io_supported", lambda directory: False)
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with _spill_one(config) as cache:
        assert cache._core.tenant.store.direct is False
        cache.flush()
        assert_same(cache.fetch(0)["h"], random_tensor(torch.float32, (64, 64)))


def test_direct_io_auto_uses_o_direct_where_allowed(tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with _spill_one(config) as cache:
        assert cache._core.tenant.store.direct is chunkio.direct_io_supported(tmp_path)


def test_direct_io_true_where_refused_is_a_clear_error_and_stores_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(chunkio, "direct_io_supported", lambda directory: False)
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), direct_io=True)
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        with pytest.raises(StoreError, match=r'refuses O_DIRECT; set direct_io = "auto"'):
            cache.update(0, {"h": random_tensor(torch.float32, (64, 64))})
        assert cache.fetch(0) == {}
        assert list(tmp_path.iterdir()) == []


def test_mmap_reads_are_zero_copy_and_not_promoted(tmp_path):
    config = CacheConfig(
        host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path), read_mode="mmap"
    )
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        big = random_tensor(torch.bfloat16, (1024, 1024))  # 2 MiB: does not fit the host tier
        cache.update(0, {"h": big})
        cache.flush()
        got = cache.fetch(0)["h"]
        assert_same(got, big)
        assert cache.stats()["disk"]["hits"] == 1
        assert cache.stats()["host"]["bytes"] == 0  # the page cache holds it, not the host tier
        cache.delete(0)  # the file goes; the mapping stays valid
        assert_same(got, big)
