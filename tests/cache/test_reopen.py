"""IntermediatesCache.open: a kept store comes back as a cache, read-write."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, random_tensor, tensor_variants
from spillcache import (
    CacheConfig,
    IntermediatesCache,
    StoreCorruptError,
    StoreFormatError,
    StoreNotFoundError,
)
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


@pytest.mark.parametrize("number", ["²0", "9" * 20], ids=["foreign digit", "past int64"])
def test_a_partial_file_numbered_as_no_writer_numbers_is_passed_over(tmp_path, number):
    """Only names the writer makes give record numbers: "²".isdigit() is true, but "²"
    is no number (int() refuses it); a leftover numbered past what a reader takes would
    number the new records past what the writer may name (close then failed)."""
    path = kept(tmp_path, [{"h": torch.ones(64, 64)}], inline_bytes=0)
    (Path(path) / "tensors" / f"{number}.0a1b2c3d.partial").write_bytes(b"x")
    # No host tier, no inline values: the new value is written under a record number.
    with IntermediatesCache.open(path, config=CacheConfig(host_bytes=0, inline_bytes=0)) as cache:
        assert_same(cache.fetch(0)["h"], torch.ones(64, 64))
        cache.update(0, {"g": torch.zeros(64, 64)})
    with IntermediatesCache.open(path) as again:
        assert_same(again.fetch(0)["g"], torch.zeros(64, 64))


def test_a_complete_store_with_a_bad_array_nothing_names_is_refused(tmp_path):
    """Only a crash leaves arrays that do not read (and only a crashed store drops
    them): in a complete store a symbolic link where a chunk should be is damage, named,
    even in an array no batch refers to."""
    path = kept(tmp_path, [{"h": torch.ones(64, 64)}], inline_bytes=0)
    tensors = Path(path) / "tensors"
    (array,) = [entry for entry in tensors.iterdir() if entry.is_dir()]
    shutil.copytree(array, tensors / "7")
    (tensors / "7" / "c.0.0").unlink()
    (tensors / "7" / "c.0.0").symlink_to(array / "c.0.0")
    with pytest.raises(StoreCorruptError, match=r"damaged.*tensors/7: .* is a symbolic link"):
        IntermediatesCache.open(path)


def test_values_of_a_gpu_this_host_lacks_are_fetched_to_the_cpu(tmp_path, monkeypatch):
    """A store written on cuda:7 of an 8-GPU node, opened on a 1-GPU one: its values go
    to the CPU (cuda:7 is an invalid ordinal there); those of cuda:0 stay on cuda:0."""
    path = kept(tmp_path, [{"h0": torch.ones(8), "h7": torch.zeros(8)}], inline_bytes=0)
    batch = f"{path}/batches/0/zarr.json"
    metadata = json.loads(open(batch).read())
    for key in ("h0", "h7"):
        metadata["attributes"]["spillcache"]["entries"][key]["device"] = f"cuda:{key[1]}"
    with open(batch, "w") as handle:
        json.dump(metadata, handle)
    with monkeypatch.context() as gpus:  # a 1-GPU host; nothing is fetched meanwhile
        gpus.setattr(torch.cuda, "is_available", lambda: True)
        gpus.setattr(torch.cuda, "device_count", lambda: 1)
        cache = IntermediatesCache.open(path)
    core = cache._core
    onload = {record.key: record.onload_device for record in core.placement.records_of(core.tenant)}
    cache.close()
    assert onload == {"h0": torch.device("cuda:0"), "h7": torch.device("cpu")}
