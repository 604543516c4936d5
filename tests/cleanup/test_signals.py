"""SIGTERM, SIGHUP and SIGINT leave no store behind, and the process still ends as the
signal would have made it (issue 10, item 2).

Delivery is tested in child processes (signal_child.py), synchronised on the lines
they print; what gets installed, and when, is tested in this process with the
signals' actions saved and put back around each test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from spill_testing import child_process
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.process import cleanup
from spillcache._internal.store import store_dirs
from spillcache._internal.store.tensor_store import Store
from spillcache.errors import StoreError

CHILD = Path(__file__).with_name("signal_child.py")


def start(disk_dir: Path, scenario: str) -> tuple[subprocess.Popen, Path]:
    child = child_process(CHILD, disk_dir, scenario)
    word, _, path = child.stdout.readline().strip().partition(" ")
    assert word == "store", child.stderr.read()
    assert Path(path).is_dir() and Path(path).parent == disk_dir
    return child, Path(path)


def finish(child: subprocess.Popen) -> tuple[int, str, str]:
    out, err = child.communicate(timeout=120)
    return child.returncode, out, err


def nothing_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ------------------------------------------------------------------ delivered


@pytest.mark.parametrize(
    ("scenario", "signum"),
    [
        ("writing", signal.SIGTERM),  # sent while the child's I/O threads write
        ("under-lock", signal.SIGHUP),  # raised while the child holds the pool's lock
        ("sigint-default", signal.SIGINT),  # SIGINT whose action is SIG_DFL
    ],
)
def test_a_fatal_signal_removes_the_store_and_kills_the_process(tmp_path, scenario, signum):
    child, _ = start(tmp_path, scenario)
    if scenario != "under-lock":
        child.send_signal(signum)
    status, out, err = finish(child)
    assert status == -signum, err  # killed by the signal: 143 for SIGTERM in a shell
    assert "still running" not in out
    assert nothing_under(tmp_path) == []


def test_a_handler_installed_before_is_called_and_its_exit_removes_the_store(tmp_path):
    child, _ = start(tmp_path, "previous-exits")
    child.send_signal(signal.SIGTERM)
    status, out, err = finish(child)
    assert (status, out) == (3, "previous handler\n"), err
    assert nothing_under(tmp_path) == []  # by the exit finalizers, as sys.exit unwound


def test_sigint_is_a_keyboard_interrupt_that_a_program_may_catch_and_go_on(tmp_path):
    """Python's own SIGINT handler stays: a caught KeyboardInterrupt loses nothing; an
    uncaught one ends the program, and the store goes as it unwinds."""
    child, store = start(tmp_path, "keyboard-interrupt")
    child.send_signal(signal.SIGINT)
    assert child.stdout.readline() == "caught\n"
    assert child.stdout.readline() == "intact\n"
    assert store.is_dir()
    child.send_signal(signal.SIGINT)
    status, _, err = finish(child)
    assert status == -signal.SIGINT and "KeyboardInterrupt" in err
    assert nothing_under(tmp_path) == []


def test_a_forked_child_killed_by_sigterm_leaves_its_parents_store_alone(tmp_path):
    """A fork (a DataLoader worker, say) inherits the handler and the registry, but
    owns none of those stores."""
    child, _ = start(tmp_path, "fork")
    status, out, err = finish(child)
    assert status == 0, err
    assert out.splitlines() == [f"child signal {int(signal.SIGTERM)}", "store there"]
    assert nothing_under(tmp_path) == []


# ------------------------------------------------------------------ installed


@pytest.fixture
def fresh_signals(monkeypatch):
    """Signals as a new process has them (SIG_DFL, Python's SIGINT handler) and nothing
    decided yet; this process's own actions are put back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in cleanup.SIGNALS}
    monkeypatch.setattr(cleanup, "_decided", set())
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, action in saved.items():
        signal.signal(signum, action)


def build(tmp_path: Path, **settings) -> IntermediatesCache:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), **settings)
    return IntermediatesCache([{"h": torch.ones(32, 32)}], config=config)


def test_installed_once_from_the_main_thread_on_default_actions_only(fresh_signals, tmp_path):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a program running under nohup
    with build(tmp_path):
        pass
    assert signal.getsignal(signal.SIGTERM) is cleanup._on_signal
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # ignored stays ignored
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # KeyboardInterrupt
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with build(tmp_path):
        pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # decided once, not again


def test_a_cache_built_on_another_thread_installs_nothing_until_one_on_the_main(
    fresh_signals, tmp_path
):
    built = []
    worker = threading.Thread(target=lambda: built.append(build(tmp_path)))
    worker.start()
    worker.join()
    built[0].close()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with build(tmp_path):
        pass
    assert signal.getsignal(signal.SIGTERM) is cleanup._on_signal


def test_a_handler_the_program_installed_stays_and_the_cache_goes_on(fresh_signals, tmp_path):
    calls = []
    signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    cache = build(tmp_path)
    signal.raise_signal(signal.SIGTERM)  # runs the Python handler before returning
    assert calls == [signal.SIGTERM]
    assert Path(cache.store_path).is_dir() and torch.equal(cache.fetch(0)["h"], torch.ones(32, 32))
    cache.close()


def test_the_setting_off_installs_nothing(fresh_signals, tmp_path):
    with build(tmp_path, remove_stores_on_signal=False):
        pass
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert (
        CacheConfig.from_env({"SPILLCACHE_REMOVE_STORES_ON_SIGNAL": "0"}).remove_stores_on_signal
        is False
    )


# ------------------------------------------------------------------ the registry


def test_only_stores_not_kept_are_registered_and_removing_one_unregisters_it(tmp_path):
    plain = Store.create(tmp_path)
    kept = Store.create(tmp_path, keep=True)
    assert plain.path in store_dirs.registered() and kept.path not in store_dirs.registered()
    plain.remove()
    kept.remove()
    assert plain.path not in store_dirs.registered()


def test_a_store_made_while_a_signal_ends_the_process_removes_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(store_dirs, "_ending", True)
    monkeypatch.setattr(store_dirs, "_live", {})
    with pytest.raises(StoreError, match="a signal is ending this process"):
        Store.create(tmp_path)
    assert nothing_under(tmp_path) == []


def test_removal_tries_again_when_a_writer_adds_a_file_mid_removal(tmp_path, monkeypatch):
    """An I/O thread finishing a chunk while rmtree runs makes a directory non-empty
    just before its rmdir; the store must still go."""
    store = Store.create(tmp_path)
    (store.path / "tensors" / "7").mkdir()
    (store.path / "tensors" / "7" / "c.0").write_bytes(b"x" * 10)
    real_rmdir = os.rmdir
    added = []

    def rmdir_after_a_late_write(path, *, dir_fd=None):
        if not added:  # the first directory emptied gets a file back, as from a writer
            late = os.open(f"{path}/c.0.late.partial", os.O_CREAT | os.O_WRONLY, dir_fd=dir_fd)
            os.close(late)
            added.append(path)
        return real_rmdir(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "rmdir", rmdir_after_a_late_write)
    monkeypatch.setattr(store_dirs, "_live", {str(store.path): store_dirs._live[str(store.path)]})
    cleanup.remove_own_stores()
    assert store_dirs.registered() == []
    monkeypatch.undo()
    assert added and nothing_under(tmp_path) == []
    store_dirs.unregister(store.path)  # made before the registry was swapped for the test's


def test_removing_on_a_signal_empties_the_rank_and_run_directories(tmp_path, monkeypatch):
    rank = tmp_path / "run-1" / "rank3"
    store = Store.create(rank, root=tmp_path)  # as the pool makes it under torchrun
    monkeypatch.setattr(store_dirs, "_live", {str(store.path): store_dirs._live[str(store.path)]})
    cleanup.remove_own_stores()
    assert nothing_under(tmp_path) == []
    store_dirs.unregister(store.path)


def test_removing_on_a_signal_leaves_a_disk_path_named_like_a_rank_directory(tmp_path, monkeypatch):
    """The user's disk_path is itself named rank0, alone in its own directory: both
    look like a run's rank and run directories, but spillcache made neither."""
    disk_path = tmp_path / "mine" / "rank0"
    disk_path.mkdir(parents=True)
    cache = build(disk_path, remove_stores_on_signal=False)
    store = Path(cache.store_path)
    monkeypatch.setattr(store_dirs, "_live", {str(store): store_dirs._live[str(store)]})
    cleanup.remove_own_stores()
    monkeypatch.undo()
    assert not store.exists()
    assert disk_path.is_dir(), "a signal removed the user's own directories"
    cache.close()
