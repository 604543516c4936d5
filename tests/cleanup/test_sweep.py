"""A new cache removes the stores that dead processes left where it spills, never a
kept one nor another host's, and says so in one warning line (issue 10, item 2); who
counts as dead (``store_dirs.owner_alive``)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.process import cleanup
from spillcache._internal.store import store_dirs, store_format
from spillcache._internal.store.store_dirs import owner_alive, store_bytes
from spillcache._internal.store.store_format import read_root_attributes
from spillcache._internal.store.tensor_store import Store
from spillcache._internal.text import format_bytes

# Two caches, one kept, each with a flushed value on disk; killed with SIGKILL.
KILLED = textwrap.dedent(
    """
    import sys, torch
    from spillcache import CacheConfig, IntermediatesCache
    plain = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=sys.argv[1])
    caches = []
    for config in (plain, plain.replace(keep_store=True)):
        cache = IntermediatesCache([{"h": torch.ones(64, 64)}], config=config)
        cache.flush()
        print(cache.store_path, flush=True)
        caches.append(cache)
    sys.stdin.read()
    """
)


def forge(store: Path, **changes) -> Path:
    """A copy of ``store`` (beside it) whose root attributes say ``changes``."""
    copy = store.with_name(f"spillcache-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    shutil.copytree(store, copy)
    root = json.loads((copy / "zarr.json").read_text())
    root["attributes"]["spillcache"].update(changes)
    (copy / "zarr.json").write_text(json.dumps(root))
    return copy


def made_here(parent: Path) -> Path:
    """A store of this process (not kept), its registration dropped: the test owns it."""
    store = Store.create(parent)
    store_dirs.unregister(store.path)
    return store.path


def reused(store: Path) -> Path:
    """A copy of ``store`` whose pid is this live process's, but whose start time is
    not: the pid was reused, its owner is dead."""
    start_time = store_dirs.owner_identity()["start_time"]
    return forge(store, pid=os.getpid(), start_time=start_time - 1)


@pytest.fixture
def sweepable(monkeypatch):
    """Nothing swept yet by this process."""
    monkeypatch.setattr(cleanup, "_swept", set())


def build(disk_path, **settings) -> IntermediatesCache:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=disk_path, **settings)
    return IntermediatesCache([{"h": torch.ones(8, 8)}], config=config)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spillcache"]


def test_a_killed_processs_store_goes_its_kept_one_and_other_hosts_stay(
    tmp_path, sweepable, caplog
):
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    plain, kept = (Path(child.stdout.readline().strip()) for _ in range(2))
    child.send_signal(signal.SIGKILL)
    # Exited, not yet reaped by its parent (this process): a zombie, which still
    # answers kill(pid, 0).
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    try:
        assert Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1][0] == "Z"
        assert owner_alive(read_root_attributes(plain)) is False
        elsewhere = forge(plain, hostname=f"not-{socket.gethostname()}")
        alive = forge(plain, pid=os.getpid(), **store_dirs.owner_identity())
        pid_reused = reused(plain)
        freed = format_bytes(store_bytes(plain) + store_bytes(pid_reused))
        caplog.set_level(logging.WARNING, logger="spillcache")
        with build(str(tmp_path)):
            pass
    finally:
        child.wait()
    assert not plain.exists() and not pid_reused.exists()
    assert kept.is_dir() and elsewhere.is_dir() and alive.is_dir()
    (line,) = warnings_of(caplog)
    assert f"removed 2 stores ({freed}) left by dead processes under {tmp_path} (" in line


def test_run_directories_are_swept_and_the_ones_left_empty_removed(tmp_path, sweepable, caplog):
    rank1 = tmp_path / "nightly" / "rank1"
    mine = made_here(rank1)
    reused(mine)
    shutil.rmtree(mine)
    caplog.set_level(logging.WARNING, logger="spillcache")
    with build(str(tmp_path)):
        pass
    assert not (tmp_path / "nightly").exists()
    assert len(warnings_of(caplog)) == 1


def test_each_directory_of_a_list_is_swept_once_per_process(tmp_path, sweepable, caplog):
    first, second = tmp_path / "a", tmp_path / "b"
    doomed = []
    for directory in (first, second):
        mine = made_here(directory)
        doomed.append(reused(mine))
        shutil.rmtree(mine)
    caplog.set_level(logging.WARNING, logger="spillcache")
    with build([str(first), str(second)]):
        pass
    assert not any(path.exists() for path in doomed)
    (line,) = warnings_of(caplog)
    assert "removed 2 stores" in line and f"{first}, {second}" in line
    later = reused(made_here(first))  # swept already: a second cache does not look again
    with build(str(first)):
        pass
    assert later.is_dir() and len(warnings_of(caplog)) == 1


def test_the_setting_off_sweeps_nothing(tmp_path, sweepable, caplog):
    dead = reused(made_here(tmp_path))
    with build(str(tmp_path), remove_dead_stores=False):
        pass
    assert dead.is_dir() and warnings_of(caplog) == []
    assert CacheConfig.from_env({"SPILLCACHE_REMOVE_DEAD_STORES": "no"}).remove_dead_stores is False


def test_stores_made_to_be_kept_or_by_an_older_spillcache_are_never_swept(tmp_path, sweepable):
    kept = reused(Store.create(tmp_path, keep=True).path)
    complete = forge(kept, keep=False, complete=True)
    older = forge(kept)
    root = json.loads((older / "zarr.json").read_text())
    del root["attributes"]["spillcache"]["keep"]  # written before the attribute existed
    (older / "zarr.json").write_text(json.dumps(root))
    with build(str(tmp_path)):
        pass
    assert kept.is_dir() and complete.is_dir() and older.is_dir()


# ------------------------------------------------------------------ owner_alive


def attributes_of_this_process() -> dict:
    return {"pid": os.getpid(), "hostname": socket.gethostname(), **store_dirs.owner_identity()}


def test_the_root_attributes_record_who_made_the_store_and_whether_it_is_kept(tmp_path):
    plain, kept = Store.create(tmp_path), Store.create(tmp_path, keep=True)
    stat = Path("/proc/self/stat").read_text()
    start_time = int(stat[stat.rfind(")") + 2 :].split()[19])
    for store, keep in ((plain, False), (kept, True)):
        found = read_root_attributes(store.path)
        assert found["keep"] is keep and found["start_time"] == start_time
        assert found["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        assert found["pid_namespace"] == os.readlink("/proc/self/ns/pid")
        store.remove()


def test_a_live_owner_is_alive_and_a_changed_identity_is_not(tmp_path):
    mine = attributes_of_this_process()
    assert owner_alive(mine) is True
    assert owner_alive({**mine, "start_time": mine["start_time"] + 1}) is False  # pid reused
    assert owner_alive({**mine, "boot_id": "another-boot"}) is False
    assert owner_alive({**mine, "hostname": "elsewhere"}) is None
    assert owner_alive({**mine, "pid_namespace": "pid:[1]"}) is None  # another container
    written_before = {"pid": os.getpid(), "hostname": socket.gethostname()}
    assert owner_alive(written_before) is True  # no start time recorded: pid only


def test_a_zombie_and_a_reaped_process_are_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    attributes = {"pid": child.pid, "hostname": socket.gethostname()}
    assert owner_alive(attributes) is False
    child.wait()
    assert owner_alive(attributes) is False


def test_another_users_unreadable_store_neither_stops_the_sweep_nor_the_cache(
    tmp_path, sweepable, monkeypatch
):
    """Stores are private (0700): in a shared temp directory another user's cannot be
    read. (As root, permissions are not checked: the refusal is injected.)"""
    private = made_here(tmp_path)
    dead = reused(private)
    real = store_format.read_root_attributes

    def refused_for_the_private_one(path):
        if Path(path) == private:
            raise PermissionError(13, "Permission denied", str(path / "zarr.json"))
        return real(path)

    monkeypatch.setattr(store_dirs, "read_root_attributes", refused_for_the_private_one)
    with build(str(tmp_path)):
        pass
    assert private.is_dir() and not dead.exists()
