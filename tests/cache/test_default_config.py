"""A cache built with no config (as llm-compressor builds it) reads the environment."""

from __future__ import annotations

import os

import pytest
import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, ConfigError, IntermediatesCache
from spillcache._internal.sysinfo import available_ram


def test_no_config_uses_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "0")
    monkeypatch.setenv("SPILLCACHE_INLINE_BYTES", "0")
    monkeypatch.setenv("SPILLCACHE_DISK_PATH", str(tmp_path))
    with IntermediatesCache.empty(1, "cpu") as cache:
        x = random_tensor(torch.float32, (8, 8))
        cache.update(0, {"x": x})
        assert cache.store_path.startswith(str(tmp_path))
        assert_same(cache.fetch(0)["x"], x)


def test_default_budgets_are_safe_for_this_machine(monkeypatch):
    for name in list(os.environ):
        if name.startswith("SPILLCACHE_"):
            monkeypatch.delenv(name)
    with IntermediatesCache.empty(1, "cpu") as cache:
        stats = cache.stats()
        assert stats["device"]["budget"] == 0  # offloading to the CPU: nothing stays on the GPU
        assert 0 < stats["host"]["budget"] <= available_ram()
        assert stats["disk"]["budget"] is None


def test_bad_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "lots")
    with pytest.raises(ConfigError, match="host_bytes"):
        IntermediatesCache.empty(1, "cpu")


def test_tmpfs_disk_path_warns(monkeypatch):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm here")
    from spillcache._internal.sysinfo import filesystem_type

    if filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("/dev/shm is not tmpfs here")
    with pytest.warns(UserWarning, match="RAM-backed"):
        IntermediatesCache(None, config=CacheConfig(disk_path="/dev/shm")).close()
