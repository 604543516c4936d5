"""disk_path as a list: arrays spread over several directories (one per drive)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.engine.tiers import DiskTier, Reading
from spillcache._internal.io.io_threads import READ, WRITE, IOPool
from spillcache.errors import ConfigError

SHAPE = (32, 64)  # 4 KiB of bfloat16
NBYTES = 32 * 64 * 2


def arrays_in(directory) -> list[str]:
    return [
        entry.name
        for store in directory.iterdir()
        for entry in (store / "tensors").iterdir()
        if entry.is_dir()
    ]


@pytest.mark.parametrize("prefetch_depth", [0, 2])
def test_values_spread_over_two_directories_and_come_back(tmp_path, prefetch_depth):
    disks = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for disk in disks:
        disk.mkdir()
    config = CacheConfig(
        host_bytes=0,
        inline_bytes=0,
        disk_path=[str(disk) for disk in disks],
        prefetch_depth=prefetch_depth,
    )
    values = [random_tensor(torch.bfloat16, SHAPE, seed) for seed in range(8)]
    with IntermediatesCache.empty(len(values), "cpu", config=config) as cache:
        for index, value in enumerate(values):
            cache.update(index, {"h": value})
        cache.flush()
        # Both directories are on one filesystem here: equally free, so they take turns.
        assert sorted(len(arrays_in(disk)) for disk in disks) == [4, 4]
        per_disk = cache.stats()["disk"]["disks"]
        assert [entry["path"] for entry in per_disk] == [str(disk) for disk in disks]
        assert [entry["bytes"] for entry in per_disk] == [4 * NBYTES, 4 * NBYTES]
        pool_disks = cache.stats()["pool"]["disk"]["disks"]
        assert [entry["bytes"] for entry in pool_disks] == [4 * NBYTES, 4 * NBYTES]
        for index, batch in enumerate(cache.iter_prefetch(["h"])):
            assert_same(batch["h"], values[index])
        assert cache.stats()["disk"]["hits"] == len(values)
        cache.delete(0)
        cache.update(1, {"h": values[0]})  # replaced: the old array goes from its disk
        cache.flush()
        cache._core.io.wait_idle()
        assert sum(len(arrays_in(disk)) for disk in disks) == 7
    assert [list(disk.iterdir()) for disk in disks] == [[], []]


def test_the_freest_disk_is_chosen_and_equals_take_turns():
    free = {0: 10 * 2**30, 1: 50 * 2**30, 2: 50 * 2**30 - 2**20}
    tier = DiskTier(None, disks=3)

    def readings() -> list[Reading]:  # the pool reads them before it takes its lock
        return [Reading(free[disk], *tier.writes_counted(disk)) for disk in range(3)]

    tier.observe(readings())
    # Disks 1 and 2 are equally free (within 64 MiB); disk 0 is far behind.
    assert [tier.choose() for _ in range(4)] == [1, 2, 1, 2]
    free[0] = 60 * 2**30
    tier.observe(readings())
    assert [tier.choose() for _ in range(2)] == [0, 0]


def test_disk_path_from_the_environment_lists_directories_with_pathsep(tmp_path):
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    config = CacheConfig.from_env({"SPILLCACHE_DISK_PATH": f"{first}{os.pathsep}{second}"})
    assert config.disk_path == (first, second)
    assert CacheConfig(disk_path=[first]).disk_path == first  # one directory is a str


def test_keep_store_needs_one_directory(tmp_path):
    config = CacheConfig(disk_path=[str(tmp_path / "a"), str(tmp_path / "b")], keep_store=True)
    with pytest.raises(ConfigError, match="keep_store: .* lists 2; set disk_path to one"):
        IntermediatesCache.empty(1, "cpu", config=config)


def test_each_disk_has_its_own_queue():
    """Work for one drive never waits behind work for another."""
    pool = IOPool("test-lanes", 1, lanes=2)
    release, started = threading.Event(), threading.Event()

    def block() -> None:
        started.set()
        assert release.wait(timeout=30)

    pool.submit(WRITE, block, lane=0)
    assert started.wait(timeout=30)
    try:
        assert pool.submit(READ, lambda: "other disk", lane=1).result(timeout=30) == "other disk"
    finally:
        release.set()
        pool.close()
