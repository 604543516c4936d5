"""``spillcache demo --json``: the summary as one JSON object, its figures the run's own.

One run goes through the installed console script (stdout must hold the object and
nothing else); the rest call ``cli.main`` in this process with small sizes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from spill_testing import console_script
from spillcache import cli
from spillcache._internal.cli import demo

# 64 KiB per hidden state: not below the default inline_bytes, so each one is tiered.
SIZES = {"samples": 8, "seq_len": 128, "hidden": 128, "layers": 3}
SMALL = "--samples 8 --seq-len 128 --hidden 128 --layers 3".split()
KiB = 2**10
# The parts of host_bytes for values on their way to and from disk, set for every run:
# two 64 KiB hidden states each. A host tier of 128 KiB is then --host-bytes 384KiB.
PART = 128 * KiB
# The keys docs/cli.md promises, with their types (exactly: a byte count is no bool).
KEYS = {
    "identical": {bool}, "samples": {int}, "seq_len": {int}, "hidden": {int}, "layers": {int},
    "cached_bytes": {int}, "host_bytes": {int}, "host_tier_bytes": {int},
    "disk_written_bytes": {int},
    "disk_read_bytes": {int}, "stall_seconds": {float}, "wall_seconds": {float},
    "reference_seconds": {float}, "store_path": {str, type(None)}, "stats": {dict},
}  # fmt: skip


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    """No SPILLCACHE_* setting of the caller's leaks in; stores go to tmp_path."""
    for name in [name for name in os.environ if name.startswith("SPILLCACHE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPILLCACHE_DISK_PATH", str(tmp_path))
    monkeypatch.setenv("SPILLCACHE_WRITE_BEHIND_BYTES", str(PART))
    monkeypatch.setenv("SPILLCACHE_READ_BUFFER_BYTES", str(PART))


@pytest.fixture
def recorded(monkeypatch):
    """The DemoResult of every run_demo the command makes, to check its JSON against."""
    results = []
    run_demo = demo.run_demo

    def record(**kwargs):
        results.append(run_demo(**kwargs))
        return results[-1]

    monkeypatch.setattr(demo, "run_demo", record)
    return results


def demo_json(capsys, *args: str) -> tuple[int, dict]:
    status = cli.main(["demo", *args, "--json"])
    out = capsys.readouterr().out
    return status, json.loads(out)


def test_demo_json_prints_one_object_and_nothing_else(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_")}
    environ["SPILLCACHE_DISK_PATH"] = str(tmp_path)
    environ["SPILLCACHE_WRITE_BEHIND_BYTES"] = environ["SPILLCACHE_READ_BUFFER_BYTES"] = str(PART)
    done = subprocess.run(
        [console_script(), "demo", *SMALL, "--host-bytes", "384KiB", "--json"],
        capture_output=True, text=True, timeout=120, env=environ,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1  # one line: the object, no table, no bar
    figures = json.loads(done.stdout)
    for key, kinds in KEYS.items():
        assert type(figures[key]) in kinds, (key, figures[key])
    assert "fill the cache" not in done.stderr  # no progress bar: stderr is no terminal
    assert figures["identical"] is True
    assert figures["cached_bytes"] == demo.activation_bytes(8, 128, 128)
    assert {k: figures[k] for k in SIZES} == SIZES
    assert figures["host_bytes"] == 384 * KiB  # all of it: the tier and the two parts
    assert figures["host_tier_bytes"] == 128 * KiB
    # 512 KiB of hidden states against a 128 KiB host tier: most of every pass spills.
    assert figures["disk_written_bytes"] > 0 and figures["disk_read_bytes"] > 0
    assert figures["store_path"] is None  # deleted after the run
    assert list(tmp_path.iterdir()) == []


def test_demo_json_figures_are_the_spilling_runs_own(capsys, recorded):
    status, figures = demo_json(capsys, *SMALL, "--host-bytes", "384KiB")
    (result,) = recorded
    stats = result.stats
    assert status == 0
    assert figures["cached_bytes"] == result.cached_bytes == demo.activation_bytes(8, 128, 128)
    assert figures["host_bytes"] == result.host_bytes == 384 * KiB
    assert figures["host_tier_bytes"] == stats["host"]["budget"] == 384 * KiB - 2 * PART
    assert stats["write_behind"]["budget"] == PART
    assert figures["disk_written_bytes"] == stats["disk"]["bytes_written"] > 0
    assert figures["disk_read_bytes"] == stats["disk"]["bytes_read"] > 0
    # Not swapped: the spilling run is the one whose stats these are, and it is timed apart.
    assert figures["wall_seconds"] == result.wall_seconds
    assert figures["reference_seconds"] == result.reference_seconds
    assert figures["stall_seconds"] == stats["stall_seconds"]
    assert figures["stats"] == json.loads(json.dumps(stats))
    assert figures["identical"] is result.identical is True


def test_demo_json_with_a_host_budget_above_the_activations_spills_nothing(capsys):
    status, figures = demo_json(capsys, *SMALL, "--host-bytes", "1GiB")
    assert status == 0 and figures["identical"] is True
    assert figures["host_bytes"] == 2**30
    assert figures["host_tier_bytes"] == 2**30 - 2 * PART > figures["cached_bytes"]
    assert figures["disk_written_bytes"] == figures["disk_read_bytes"] == 0


def test_demo_json_without_a_disk_tier_reads_and_writes_nothing(capsys, monkeypatch):
    monkeypatch.setenv("SPILLCACHE_DISK_PATH", "none")
    status, figures = demo_json(capsys, *SMALL, "--host-bytes", "1GiB")
    assert status == 0 and figures["identical"] is True
    assert figures["stats"]["disk"]["path"] is None  # the run had no disk tier at all
    assert figures["disk_written_bytes"] == figures["disk_read_bytes"] == 0
    assert figures["store_path"] is None


def test_demo_json_names_the_kept_store(capsys, tmp_path):
    status, figures = demo_json(capsys, *SMALL, "--host-bytes", "0", "--keep-store")
    assert status == 0
    path = Path(figures["store_path"])
    assert path.parent == tmp_path and path.is_dir()
    assert figures["disk_written_bytes"] > 0


def test_demo_json_exits_1_when_the_statistics_differ(capsys, monkeypatch):
    monkeypatch.setattr(demo, "identical", lambda a, b: False)
    status, figures = demo_json(capsys, "--samples", "2", "--seq-len", "16", "--hidden", "16")
    assert status == 1  # as without --json
    assert figures["identical"] is False
