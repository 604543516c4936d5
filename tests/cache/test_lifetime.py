"""The store's files go away on close, with, garbage collection and interpreter exit."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
import textwrap
import threading

import torch

from spill_testing import random_tensor
from spillcache import CacheConfig, IntermediatesCache


def spilled_cache(tmp_path, **settings) -> IntermediatesCache:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), **settings)
    cache = IntermediatesCache.empty(1, "cpu", config=config)
    cache.update(0, {"h": random_tensor(torch.float32, (32, 32))})
    assert cache.store_path is not None and os.path.isdir(cache.store_path)
    return cache


def test_close_removes_the_store(tmp_path):
    cache = spilled_cache(tmp_path)
    path = cache.store_path
    cache.close()
    assert not os.path.exists(path)


def test_context_manager_removes_the_store(tmp_path):
    with spilled_cache(tmp_path) as cache:
        path = cache.store_path
    assert not os.path.exists(path)


def test_garbage_collection_removes_the_store_and_joins_nothing_forever(tmp_path):
    cache = spilled_cache(tmp_path)
    list(cache.iter_prefetch())  # starts the prefetch thread
    path = cache.store_path
    del cache
    gc.collect()
    assert not os.path.exists(path)
    assert not any(t.name.startswith("spillcache") for t in threading.enumerate())


def test_interpreter_exit_removes_the_store(tmp_path):
    script = textwrap.dedent(
        f"""
        import torch
        from spillcache import CacheConfig, IntermediatesCache
        config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path={str(tmp_path)!r})
        cache = IntermediatesCache.empty(1, "cpu", config=config)
        cache.update(0, {{"h": torch.ones(64, 64)}})
        list(cache.iter_prefetch())
        print(cache.store_path)
        # no close(): llm-compressor never calls it
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    assert path.startswith(str(tmp_path))
    assert not os.path.exists(path)


def test_keep_store_keeps_it(tmp_path):
    cache = spilled_cache(tmp_path, keep_store=True)
    path = cache.store_path
    cache.close()
    assert os.path.isdir(path)


def test_store_is_private(tmp_path):
    old_umask = os.umask(0)
    try:
        with spilled_cache(tmp_path) as cache:
            mode = stat.S_IMODE(os.stat(cache.store_path).st_mode)
    finally:
        os.umask(old_umask)
    assert mode == 0o700


def test_no_store_until_something_spills(tmp_path):
    config = CacheConfig(host_bytes="1MiB", disk_path=str(tmp_path / "spill"))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, {"h": torch.ones(8)})
        assert cache.store_path is None
    assert not (tmp_path / "spill").exists()


def test_store_path_stays_known_when_the_disk_tier_is_empty(tmp_path):
    """Regression: an empty DiskTier is falsy (it has __len__); the path must not vanish."""
    with spilled_cache(tmp_path) as cache:
        path = cache.store_path
        cache.delete(0)
        cache.flush()
        assert cache.stats()["disk"]["bytes"] == 0
        assert cache.store_path == path and cache.stats()["disk"]["path"] == path


def test_regression_a_cache_collected_while_a_new_pool_is_made_does_not_deadlock(
    tmp_path, monkeypatch
):
    """Making a pool allocates, so the garbage collector may run a finalizer in the
    middle of it, closing another config's last cache: that close leaves its pool,
    which takes the pool registry's lock. Found by the property tests' shrinker with
    the registry lock held across the new pool's construction (a self-deadlock)."""
    from spillcache._internal.runtime import pool as pool_module

    other_config = CacheConfig(host_bytes=4096, inline_bytes=0, disk_path=str(tmp_path / "a"))
    holder = [IntermediatesCache.empty(1, "cpu", config=other_config)]
    holder[0].update(0, {"x": torch.arange(4096)})
    real_disk_dirs = pool_module.checked_disk_dirs

    def disk_dirs_collecting(config):
        holder.clear()  # the last reference: its finalizer runs here, as the GC would run it
        return real_disk_dirs(config)

    monkeypatch.setattr(pool_module, "checked_disk_dirs", disk_dirs_collecting)
    made = threading.Event()

    def make_a_cache_of_another_config():
        config = CacheConfig(host_bytes=8192, inline_bytes=0, disk_path=str(tmp_path / "b"))
        IntermediatesCache.empty(1, "cpu", config=config).close()
        made.set()

    thread = threading.Thread(target=make_a_cache_of_another_config, daemon=True)
    thread.start()
    # A guard against hanging the run, not a timing assertion: the cache is made at once.
    assert made.wait(timeout=60), "making a cache deadlocked in pool_for"
    thread.join()
    assert other_config not in pool_module._pools
    assert list((tmp_path / "a").iterdir()) == []  # the collected cache's store is gone
