"""IntermediatesCache.open: a kept store comes back as a cache, read-write."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, random_tensor, tensor_variants
from spillcache import CacheConfig, IntermediatesCache, StoreFormatError, StoreNotFoundError
from spillcache._internal.store.store_format import read_root_attributes


def kept(tmp_path, batches, **settings) -> str:
    config = CacheConfig(host_bytes=0, disk_path=str(tmp_path), keep_store=True, **settings)
    cache = IntermediatesCache(batches, config=config)
    cache.close()
    return cache.store_path


@pytest.mark.parametrize("inline_bytes", [0, "64KiB"])
def test_every_dtype_and_structure_comes_back_bit_for_bit(tmp_path, inline_bytes):
    batches = [
        {
            **{str(dtype): tensor_variants(dtype) for dtype in ALL_DTYPES},
            "nested": ({"a": random_tensor(torch.bfloat16, (3, 5)), "n": None}, [1, "x"]),
        }
    ]
    path = kept(tmp_path, batches, inline_bytes=inline_bytes)
    with IntermediatesCache.open(path) as cache:
        assert len(cache) == 1
        got = cache.fetch(0)
        for dtype in ALL_DTYPES:
            for name, original in batches[0][str(dtype)].items():
                assert_same(got[str(dtype)][name], original)
        value, extra = got["nested"]
        assert_same(value["a"], batches[0]["nested"][0]["a"]) and value["n"] is None
        assert extra == [1, "x"]


def test_a_reopened_cache_is_read_write_and_kept_again(tmp_path):
    values = [random_tensor(torch.float32, (128, 128), seed) for seed in range(3)]
    path = kept(tmp_path, [{"h": v, "i": index} for index, v in enumerate(values)], inline_bytes=0)
    cache = IntermediatesCache.open(path, CacheConfig(host_bytes="64KiB"))
    assert read_root_attributes(cache._core.tenant.store.path)["complete"] is False
    replacement = random_tensor(torch.float32, (128, 128), 99)
    cache.update(1, {"h": replacement})
    cache.append({"h": values[0]})
    cache.delete(2, ["h"])
    seen = [list(inputs) for inputs in cache.iter_prefetch(["h"])]  # through the tiers
    assert seen == [["h"], ["h"], [], ["h"]]
    cache.close()
    assert read_root_attributes(path)["complete"] is True
    with IntermediatesCache.open(path) as again:
        assert len(again) == 4
        assert_same(again.fetch(0)["h"], values[0])
        assert_same(again.fetch(1)["h"], replacement)
        assert again.fetch(2) == {"i": 2}
        assert_same(again.fetch(3)["h"], values[0])


def test_a_store_whose_run_did_not_close_is_refused(tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), keep_store=True)
    live = IntermediatesCache([{"h": torch.ones(8)}], config=config)
    live.flush()
    with pytest.raises(StoreFormatError, match="not complete.*keep_store"):
        IntermediatesCache.open(live.store_path)
    live.close()


def test_unknown_versions_and_non_stores_are_refused(tmp_path):
    path = kept(tmp_path / "a", [{"h": torch.ones(8)}], inline_bytes=0)
    root = f"{path}/zarr.json"
    metadata = json.loads(open(root).read())
    metadata["attributes"]["spillcache"]["format_version"] = 2
    with open(root, "w") as handle:
        json.dump(metadata, handle)
    with pytest.raises(StoreFormatError, match=r"version 2; this spillcache reads version\(s\) 1"):
        IntermediatesCache.open(path)
    with pytest.raises(StoreNotFoundError):
        IntermediatesCache.open(tmp_path / "missing")
    with pytest.raises(StoreFormatError, match="not a spillcache store"):
        IntermediatesCache.open(tmp_path)


def test_opening_never_imports_a_class_named_in_the_store(tmp_path):
    path = kept(tmp_path, [{"h": (torch.ones(8), 1)}], inline_bytes=0)
    batch = f"{path}/batches/0/zarr.json"
    metadata = json.loads(open(batch).read())
    node = metadata["attributes"]["spillcache"]["entries"]["h"]
    node["class"] = "spillcache_never_imported_module:Evil"
    with open(batch, "w") as handle:
        json.dump(metadata, handle)
    with pytest.warns(UserWarning, match="not imported"):
        cache = IntermediatesCache.open(path)
    assert "spillcache_never_imported_module" not in sys.modules
    value = cache.fetch(0)["h"]
    assert type(value) is tuple and value[1] == 1
    cache.close()
