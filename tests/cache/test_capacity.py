"""When no tier has room, update fails cleanly and nothing stored is lost."""

from __future__ import annotations

import os

import pytest
import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheConfig, CapacityError, DiskFullError, IntermediatesCache, StoreError
from spillcache._internal.store.tensor_store import Store

KIB64 = (64, 256)  # 64 KiB of float32
VALUE = 64 * 1024  # bytes of one KIB64 tensor


def one_value_tier(reads: int = 1) -> dict:
    """Sizes for a host tier of one KIB64 value: host_bytes holds the tier and, besides
    it, the parts for one value waiting for its disk write and for ``reads`` values read
    back or copied in (a tensor the caller holds from fetch keeps its room)."""
    return tier_sizes(VALUE, VALUE, reads * VALUE)


def make(tmp_path, **settings) -> IntermediatesCache:
    config = CacheConfig(inline_bytes=0, disk_path=str(tmp_path), **settings)
    return IntermediatesCache.empty(4, "cpu", config=config)


def snapshot(cache: IntermediatesCache) -> list[dict]:
    return [cache.fetch(index) for index in range(len(cache))]


def assert_unchanged(cache: IntermediatesCache, before: list[dict]) -> None:
    after = snapshot(cache)
    assert [list(b) for b in after] == [list(b) for b in before]
    for old, new in zip(before, after, strict=True):
        for key in old:
            assert_same(new[key], old[key])


def test_full_disk_budget_refuses_update_and_keeps_everything(tmp_path):
    # The two values on disk read back twice over, held by both snapshots at once.
    with make(tmp_path, **one_value_tier(reads=4), disk_bytes="128KiB") as cache:
        assert cache.stats()["host"]["budget"] == VALUE
        for index in range(3):  # 64 KiB in host + 128 KiB on disk: exactly full
            cache.update(index, {"h": random_tensor(torch.float32, KIB64, index)})
        before = snapshot(cache)
        stats_before = cache.stats()
        with pytest.raises(CapacityError, match="disk_bytes"):
            cache.update(3, {"h": random_tensor(torch.float32, KIB64, 9)})
        assert cache.fetch(3) == {}
        assert_unchanged(cache, before)
        assert cache.stats()["disk"]["bytes"] <= stats_before["disk"]["budget"]


def test_failed_replacement_keeps_the_old_value(tmp_path):
    with make(tmp_path, host_bytes=0, disk_bytes="64KiB") as cache:
        cache.update(0, {"h": random_tensor(torch.float32, KIB64, 1)})
        before = snapshot(cache)
        with pytest.raises(CapacityError):
            # Two new tensors under one update: the first fits, the second does not,
            # so neither may be stored.
            cache.update(
                0,
                {
                    "h": random_tensor(torch.float32, (16, 16), 2),
                    "g": random_tensor(torch.float32, KIB64, 3),
                },
            )
        assert_unchanged(cache, before)


def test_tensor_larger_than_every_tier(tmp_path):
    with make(tmp_path, **one_value_tier(), disk_bytes="64KiB") as cache:
        with pytest.raises(CapacityError):
            cache.append({"h": random_tensor(torch.float32, (128, 256), 0)})
        assert len(cache) == 4  # the failed append added no batch
        assert cache.stats()["disk"]["bytes"] == 0


def test_no_disk_tier_and_full_host_names_the_fix(tmp_path):
    config = CacheConfig(**one_value_tier(), inline_bytes=0, disk_path=None)
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        assert cache.stats()["host"]["budget"] == VALUE
        cache.update(0, {"h": random_tensor(torch.float32, KIB64, 0)})
        with pytest.raises(CapacityError, match="disk_path"):
            cache.update(1, {"h": random_tensor(torch.float32, KIB64, 1)})
        assert_same(cache.fetch(0)["h"], random_tensor(torch.float32, KIB64, 0))


def no_space(self, name, tensor, durable=False, owner=None):
    raise StoreError(28, f"cannot write tensor {name}: No space left on device")


def report_free(monkeypatch, free: int) -> None:
    """statvfs says ``free`` bytes are free on every filesystem."""
    real = os.statvfs

    def statvfs(path):
        got = real(path)
        return os.statvfs_result((1, 1, got.f_blocks, free, free, *tuple(got)[5:10]))

    monkeypatch.setattr(os, "statvfs", statvfs)


def test_disk_write_error_is_raised_by_flush_and_loses_nothing(tmp_path, monkeypatch):
    # Room for two values read back or copied in: the value whose write failed stays in
    # host_bytes (over the tier's budget) meanwhile.
    with make(tmp_path, **one_value_tier(reads=2)) as cache:
        assert cache.stats()["host"]["budget"] == VALUE
        report_free(monkeypatch, 2**30)
        cache.update(0, {"h": random_tensor(torch.float32, KIB64, 0)})
        with monkeypatch.context() as failing:
            failing.setattr(Store, "write_tensor", no_space)
            cache.update(1, {"h": random_tensor(torch.float32, KIB64, 1)})  # the write is behind
            with pytest.raises(DiskFullError, match=r"batch 1, key 'h' .*ENOSPC") as raised:
                cache.flush()
        assert raised.value.errno == 28
        cache.flush()  # reported once
        stats = cache.stats()
        # The failed value is back in the host tier, counted against its budget.
        assert stats["write_behind"]["unwritten_bytes"] == 64 * 1024
        assert stats["host"]["bytes"] == 2 * 64 * 1024 > stats["host"]["budget"]
        assert_same(cache.fetch(0)["h"], random_tensor(torch.float32, KIB64, 0))
        assert_same(cache.fetch(1)["h"], random_tensor(torch.float32, KIB64, 1))  # from RAM
        # Until statvfs shows room again, nothing more spills.
        with pytest.raises(DiskFullError, match="until"):
            cache.update(2, {"h": random_tensor(torch.float32, KIB64, 2)})
        assert cache.fetch(2) == {}
        report_free(monkeypatch, 2**31)  # space was freed
        cache.update(2, {"h": random_tensor(torch.float32, KIB64, 2)})
        cache.flush()
        for index in range(3):
            assert_same(cache.fetch(index)["h"], random_tensor(torch.float32, KIB64, index))
        stats = cache.stats()
        unwritten = stats["write_behind"]["unwritten_bytes"]
        assert stats["host"]["bytes"] <= stats["host"]["budget"] + unwritten
        cache.delete(1)
        assert cache.stats()["write_behind"]["unwritten_bytes"] == 0
        assert cache.stats()["host"]["bytes"] <= cache.stats()["host"]["budget"]


def test_disk_write_error_is_raised_by_the_next_call(tmp_path, monkeypatch):
    with make(tmp_path, host_bytes=0) as cache:
        monkeypatch.setattr(Store, "write_tensor", no_space)
        cache.update(0, {"h": random_tensor(torch.float32, KIB64, 0)})
        cache._core.io.wait_idle()  # the write has failed by now
        monkeypatch.undo()
        with pytest.raises(StoreError, match=r"(?s)stay readable from RAM.*batch 0, key 'h'"):
            cache.fetch(0)
        assert_same(cache.fetch(0)["h"], random_tensor(torch.float32, KIB64, 0))
        cache.delete(0)  # an unwritten value can be deleted like any other
        assert cache.stats()["write_behind"]["unwritten_bytes"] == 0
