"""disk_path that cannot hold a store: removed underneath, read-only, a regular file.

Each is one clear error naming the path and what to change; nothing acknowledged is
lost, nothing hangs, and nothing is left behind after close.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults.injection import leftovers, same_bits, unaligned
from spillcache import CacheConfig, ConfigError, IntermediatesCache, StoreError

KIB64 = 64 * 2**10


def make(disk_path, **settings) -> IntermediatesCache:
    settings = {"host_bytes": 0, "inline_bytes": 0, "disk_path": str(disk_path)} | settings
    return IntermediatesCache.empty(4, "cpu", config=CacheConfig(**settings))


@pytest.mark.parametrize("when", ["between-writes", "during-a-write"])
def test_a_store_removed_underneath_is_named_and_nothing_hangs(tmp_path, syscalls, when):
    disk = tmp_path / "spill"
    values = [unaligned(KIB64, seed) for seed in range(3)]
    gate = threading.Event()
    with make(disk) as cache, syscalls.released():
        cache.update(0, {"a": values[0]})
        cache.flush()
        store = cache.store_path
        if when == "during-a-write":  # its chunk file is open, nothing written yet
            held = syscalls.hold("pwrite", gate, path="/c.")
            cache.update(1, {"a": values[1]})
            assert held.arrived.wait(timeout=60)
        shutil.rmtree(store)
        gate.set()
        if when == "between-writes":
            cache.update(1, {"a": values[1]})  # accepted: its write fails in the background
        with pytest.raises(StoreError) as raised:
            cache.flush()
        report = str(raised.value)
        assert raised.value.errno == errno.ENOENT
        assert f"batch 1, key 'a' ({KIB64} bytes) into {store}" in report
        assert f"the store directory {store} was removed while the cache was open" in report
        assert same_bits(cache.fetch(1)["a"], values[1])  # from RAM: not lost
        with pytest.raises(StoreError, match=r"batch 0, key 'a': .* was removed while"):
            cache.fetch(0)  # its file went with the store: said so, naming the entry
        with pytest.raises(StoreError, match="writes nothing more there") as refused:
            cache.update(2, {"a": values[2]})
        assert str(store) in str(refused.value) and cache.fetch(2) == {}
    assert leftovers(disk) == []


def test_disk_path_that_is_a_regular_file_is_refused_when_the_cache_is_made(tmp_path):
    path = tmp_path / "spill"
    path.write_bytes(b"not a directory")
    with pytest.raises(ConfigError, match=f"disk_path: {path} is not a directory"):
        make(path)
    with pytest.raises(ConfigError, match=f"disk_path: {path / 'sub'} is not a directory"):
        make(path / "sub")  # made on first use, under a file
    assert path.read_bytes() == b"not a directory"
    assert leftovers(tmp_path) == ["spill"]


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` read-only: by permissions, or (root ignores them) a read-only bind
    mount of it over itself."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    mount = subprocess.run(
        ["mount", "--bind", "-o", "ro", str(directory), str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.skip(
            "root ignores permissions, and a read-only bind mount is not allowed here: "
            f"{mount.stderr.strip()}"
        )
    try:
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_disk_path_is_refused_when_the_cache_is_made(tmp_path):
    disk = tmp_path / "spill"
    disk.mkdir()
    with read_only(disk), pytest.raises(ConfigError, match=f"disk_path: {disk} is not writable"):
        make(disk)
    assert leftovers(disk) == []


def test_a_disk_path_made_read_only_later_refuses_the_update_that_spills(tmp_path):
    disk = tmp_path / "spill"
    disk.mkdir()
    value = unaligned(KIB64, 0)
    with make(disk) as cache:
        with read_only(disk):
            with pytest.raises(StoreError, match=f"cannot create a store under '{disk}'") as raised:
                cache.update(0, {"a": value})
            assert raised.value.errno in (errno.EROFS, errno.EACCES)
            assert "set disk_path to a writable directory" in str(raised.value)
            assert cache.fetch(0) == {} and cache.store_path is None
        cache.update(0, {"a": value})  # writable again: the same update goes through
        cache.flush()
        assert same_bits(cache.fetch(0)["a"], value)
    assert leftovers(disk) == []
