"""The ``spillcache`` console script, run as a user runs it, on real stores.

Each run is a process of its own, forked from one that imported spillcache already
(``spill_testing.run_console``); one (``test_verify_of_no_store_is_one_clear_line``)
starts a new interpreter, to see that importing spillcache adds nothing to what a
command prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap

import numpy
import pytest
import torch

from spill_testing import assert_same, console_script, run_console, run_preloaded_python
from spillcache import CacheConfig, IntermediatesCache


def run(*args: str, env: dict | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """The console script with ``args`` (``fresh``: in a new interpreter)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_")}
    environ.update(env or {})
    if not fresh:
        return run_console(*args, env=environ)
    return subprocess.run(
        [console_script(), *args], capture_output=True, text=True, timeout=120, env=environ
    )


def one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr


# ------------------------------------------------------------------ config


def test_config_shows_each_value_and_where_it_came_from(tmp_path):
    file = tmp_path / "spill.toml"
    file.write_text('host_bytes = "2GiB"\neviction = "lru"\n')
    done = run("config", env={"SPILLCACHE_CONFIG": str(file), "SPILLCACHE_EVICTION": "scan"})
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines()[1:]}
    assert lines["host_bytes"][1:] == ["2147483648", "(2.0", "GiB)", str(file)]
    assert lines["eviction"][1:] == ["scan", "SPILLCACHE_EVICTION"]  # the variable wins
    assert lines["io_threads"][1:] == [str(CacheConfig.io_threads), "default"]
    assert set(lines) == set(CacheConfig.field_names())


def test_config_json_and_file_option(tmp_path):
    file = tmp_path / "other.toml"
    file.write_text("prefetch_depth = 5\n")
    done = run("config", "--file", str(file), "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["prefetch_depth"] == {"value": 5, "source": str(file)}
    assert figures["disk_bytes"] == {"value": None, "source": "default"}


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("host_bytes = 'lots'\n", ["host_bytes", "'lots'"]),
        ("hots_bytes = 1\n", ["unknown setting", "'hots_bytes'"]),
        ("host_bytes = \n", ["not valid TOML"]),
    ],
)
def test_config_invalid_file_is_one_clear_line(tmp_path, text, needles):
    file = tmp_path / "bad.toml"
    file.write_text(text)
    one_line_error(run("config", "--file", str(file)), str(file), *needles)


def test_config_missing_file_and_bad_variable():
    one_line_error(run("config", "--file", "/no/such.toml"), "/no/such.toml", "does not exist")
    one_line_error(run("config", env={"SPILLCACHE_HOST_BYTE": "1"}), "SPILLCACHE_HOST_BYTE")


# ------------------------------------------------------------------ du and gc

CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from spillcache import CacheConfig, IntermediatesCache
    keep = sys.argv[2] == "keep"
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=sys.argv[1], keep_store=keep,
                         remove_dead_stores=False)  # the crashed store stays, for gc to find
    cache = IntermediatesCache([{"h": torch.ones(64, 64)}], config=config)
    cache.flush()
    print(cache.store_path, flush=True)
    if keep:
        cache.close()
    else:
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


@pytest.fixture
def stores(tmp_path):
    """Three stores: a live one (this process), one left by a process killed with
    SIGKILL, and a kept (complete) one of a process that exited."""
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    live = IntermediatesCache([{"h": torch.ones(64, 64)}], config=config)
    live.flush()
    killed = run_preloaded_python("-c", CHILD, str(tmp_path), "crash")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    crashed = killed.stdout.strip()  # printed once the store held its flushed value
    done = run_preloaded_python("-c", CHILD, str(tmp_path), "keep")
    assert done.returncode == 0, done.stderr
    kept = done.stdout.strip()
    yield {"live": live.store_path, "crashed": crashed, "kept": kept, "dir": str(tmp_path)}
    live.close()


def test_du_lists_every_store_with_size_owner_and_state(stores):
    done = run("du", stores["dir"], "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["path"]: row for row in json.loads(done.stdout)}
    assert set(rows) == {stores["live"], stores["crashed"], stores["kept"]}
    assert rows[stores["live"]]["alive"] is True and rows[stores["live"]]["pid"] == os.getpid()
    assert rows[stores["crashed"]]["alive"] is False
    assert rows[stores["crashed"]]["complete"] is False
    assert rows[stores["kept"]]["alive"] is False and rows[stores["kept"]]["complete"] is True
    assert all(row["bytes"] >= 64 * 64 * 4 for row in rows.values())
    table = run("du", stores["dir"])
    assert table.returncode == 0
    assert "alive" in table.stdout and "dead" in table.stdout and "total" in table.stdout
    assert "KiB" in table.stdout


def test_gc_is_a_dry_run_by_default_and_never_touches_a_live_store(stores):
    dry = run("gc", stores["dir"])
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {stores['crashed']}" in dry.stdout and "--yes" in dry.stdout
    assert stores["kept"] not in dry.stdout and stores["live"] not in dry.stdout
    assert os.path.exists(stores["crashed"])
    done = run("gc", stores["dir"], "--yes")
    assert done.returncode == 0, done.stderr
    assert f"removed {stores['crashed']}" in done.stdout
    assert not os.path.exists(stores["crashed"])
    assert os.path.exists(stores["kept"]) and os.path.exists(stores["live"])
    everything = run("gc", stores["dir"], "--yes", "--all")
    assert f"removed {stores['kept']}" in everything.stdout
    assert not os.path.exists(stores["kept"]) and os.path.exists(stores["live"])


def test_du_and_gc_of_a_missing_directory_are_one_clear_line(tmp_path):
    one_line_error(run("du", str(tmp_path / "nope")), "no directory", "nope")
    one_line_error(run("gc", str(tmp_path / "nope")), "no directory", "nope")


def test_du_defaults_to_the_configured_disk_path(tmp_path):
    done = run("du", env={"SPILLCACHE_DISK_PATH": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].split()[:3] == ["total", "0", "B"]


# ------------------------------------------------------------------ inspect


def test_inspect_a_kept_store_shows_its_keys(tmp_path):
    config = CacheConfig(host_bytes=0, disk_path=str(tmp_path), keep_store=True)
    batches = [{"h": torch.ones(4, 64, 64), "pos": (torch.arange(300), 3)} for _ in range(3)]
    cache = IntermediatesCache(batches, config=config)
    path = cache.store_path
    cache.close()
    info = json.loads(run("inspect", path, "--json").stdout)
    assert info["complete"] is True and info["batches"] == 3 and info["format_version"] == 1
    assert info["keys"]["h"] == {
        "batches": 3,
        "bytes": 3 * 4 * 64 * 64 * 4,
        "tensors": [{"shape": [4, 64, 64], "dtype": "float32"}],
    }
    assert info["keys"]["pos"]["tensors"] == [{"shape": [300], "dtype": "int64"}]
    assert info["bytes"] == 3 * (4 * 64 * 64 * 4 + 300 * 8)
    done = run("inspect", path)
    assert done.returncode == 0, done.stderr
    assert "complete (kept when its cache closed)" in done.stdout
    assert "'h'" in done.stdout and "(4, 64, 64)" in done.stdout and "192.0 KiB" in done.stdout


def test_inspect_a_store_left_by_a_killed_process(stores):
    info = json.loads(run("inspect", stores["crashed"], "--json").stdout)
    assert info["complete"] is False and info["owner_alive"] is False
    assert info["arrays"] == 1 and info["bytes"] == 64 * 64 * 4 and info["keys"] == {}
    done = run("inspect", stores["crashed"])
    assert "left by a run that did not close" in done.stdout
    assert "no keys recorded" in done.stdout


def test_inspect_errors_are_one_clear_line(tmp_path, stores):
    one_line_error(run("inspect", str(tmp_path / "nope")), "no store at", "does not exist")
    one_line_error(run("inspect", str(tmp_path)), "is not a spillcache store")
    root = os.path.join(stores["kept"], "zarr.json")
    metadata = json.loads(open(root).read())
    metadata["attributes"]["spillcache"]["format_version"] = 99
    with open(root, "w") as handle:
        json.dump(metadata, handle)
    one_line_error(run("inspect", stores["kept"]), "version 99", "reads version(s) 1")


# ------------------------------------------------------------------ show


@pytest.fixture
def kept_store(tmp_path):
    """A kept store: batch 0 has a bf16 tensor with a NaN and an inf, and a nested value."""
    hidden = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]]).to(torch.bfloat16)
    batches = [
        {"h": hidden, "pos": (torch.arange(3), 3, {"m": None}), "pair": (hidden, hidden * 2)}
    ]
    config = CacheConfig(host_bytes=0, disk_path=str(tmp_path / "spill"), keep_store=True)
    cache = IntermediatesCache(batches, config=config)
    cache.close()  # the values are small (inline): the store is made when it is kept
    return cache.store_path, hidden


def test_show_prints_structure_and_statistics(kept_store):
    path, _ = kept_store
    done = run("show", path, "0", "h", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["structure"] == ["tensor #0 (2, 2) bfloat16"]
    assert figures["tensors"] == [
        {"of": "values", "count": 4, "nan": 1, "inf": 1, "min": 1.0, "max": 3.0,
         "mean": 2.0, "std": 1.0}
    ]  # fmt: skip
    nested = run("show", path, "0", "pos")
    assert nested.returncode == 0, nested.stderr
    assert nested.stdout.splitlines()[:5] == [
        "tuple", "  0: tensor #0 (3,) int64", "  1: 3", "  2: dict", "    'm': None"
    ]  # fmt: skip


def test_show_exports_a_tensor_bit_for_bit(kept_store, tmp_path):
    path, hidden = kept_store
    done = run("show", path, "0", "h", "--export", str(tmp_path / "h.pt"))
    assert done.returncode == 0, done.stderr
    assert_same(torch.load(tmp_path / "h.pt"), hidden)
    done = run("show", path, "0", "h", "--export", str(tmp_path / "h.npy"))
    assert "widened exactly from bfloat16" in done.stdout
    assert torch.equal(
        torch.from_numpy(numpy.load(tmp_path / "h.npy")).to(torch.bfloat16).view(torch.int16),
        hidden.view(torch.int16),
    )
    done = run("show", path, "0", "pair", "--leaf", "1", "--export", str(tmp_path / "p.pt"))
    assert done.returncode == 0, done.stderr
    assert_same(torch.load(tmp_path / "p.pt"), hidden * 2)


def test_show_errors_are_one_clear_line(kept_store, stores, tmp_path):
    path, _ = kept_store
    one_line_error(run("show", path, "0", "nope"), "no key 'nope'", "'h'")
    for leaf in ("2", "-1"):  # refused without --export too, and before any statistics
        done = run("show", path, "0", "pair", "--leaf", leaf)
        one_line_error(done, f"--leaf: {leaf} is not a tensor", "numbered 0 to 1")
        assert done.stdout == "", done.stdout
    one_line_error(run("show", path, "0", "h", "--leaf", "1", "--json"), "it holds one: give 0")
    one_line_error(run("show", path, "7", "h"), "batch 7 is out of range", "1 batches")
    one_line_error(run("show", path, "0", "pair", "--export", "x.pt"), "2 tensors", "--leaf")
    one_line_error(run("show", path, "0", "h", "--export", str(tmp_path / "h.csv")), ".pt or .npy")
    one_line_error(run("show", stores["crashed"], "0", "h"), "records no batch structures")
    one_line_error(run("show", str(tmp_path / "nope"), "0", "h"), "no store at")


# ------------------------------------------------------------------ verify


@pytest.fixture
def checksummed(tmp_path):
    """A kept store written with the defaults: every chunk carries a CRC32C."""
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path / "spill"), keep_store=True
    )
    cache = IntermediatesCache([{"h": torch.ones(64, 64), "g": torch.zeros(8)}], config=config)
    cache.close()
    return cache.store_path, cache._core._batches[0]["h"].leaves[0].array


def test_verify_a_sound_store(checksummed):
    path, _ = checksummed
    done = run("verify", path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2 arrays checked, 2 with a CRC32C; 0 bad"


def test_verify_names_a_flipped_and_a_truncated_chunk_and_fails(checksummed):
    path, name = checksummed
    chunk = os.path.join(path, "tensors", name, "c.0.0")
    with open(chunk, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xff")
    done = run("verify", path)
    assert done.returncode == 1
    assert f"BAD {name} (batch 0, key 'h'):" in done.stdout and "CRC32C" in done.stdout
    assert done.stdout.splitlines()[-1] == "2 arrays checked, 2 with a CRC32C; 1 bad"
    with open(chunk, "r+b") as handle:
        handle.truncate(100)
    report = json.loads(run("verify", path, "--json").stdout)
    assert [bad["array"] for bad in report["bad"]] == [name]
    assert "holds 100 bytes" in report["bad"][0]["error"]


def test_a_store_without_checksums_says_everywhere_that_rot_goes_undetected(tmp_path):
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), keep_store=True, checksum=False
    )
    cache = IntermediatesCache([{"h": torch.ones(64, 64)}], config=config)
    cache.close()
    path = cache.store_path
    name = cache._core._batches[0]["h"].leaves[0].array
    with open(os.path.join(path, "tensors", name, "c.0.0"), "r+b") as handle:
        handle.write(b"\xff")  # rot that only a checksum would catch
    said = "written without checksums (checksum = false): bit rot in it cannot be detected"
    done = run("verify", path)
    assert done.returncode == 0, done.stderr
    assert f"WARNING this store: {said}" in done.stdout
    assert done.stdout.splitlines()[-1] == "1 arrays checked, 0 with a CRC32C; 0 bad"
    assert json.loads(run("verify", path, "--json").stdout)["unchecksummed"] == 1
    done = run("inspect", path)
    assert done.returncode == 0, done.stderr
    assert f"checksums  this store: {said}" in done.stdout
    done = run("show", path, "0", "h")
    assert done.returncode == 0, done.stderr
    assert f"WARNING batch 0, key 'h': {said}" in done.stderr
    assert json.loads(run("show", path, "0", "h", "--json").stdout)["checksummed"] is False


def test_a_store_with_checksums_says_so_and_warns_of_nothing(checksummed):
    path, _ = checksummed
    inspected = run("inspect", path)
    assert "checksums  a CRC32C on every chunk, checked on every read" in inspected.stdout
    shown = run("show", path, "0", "h")
    assert shown.returncode == 0 and "WARNING" not in shown.stderr, shown.stderr
    assert json.loads(run("show", path, "0", "h", "--json").stdout)["checksummed"] is True


def test_verify_of_no_store_is_one_clear_line():
    one_line_error(run("verify", "/no/such/store", fresh=True), "no store at")
