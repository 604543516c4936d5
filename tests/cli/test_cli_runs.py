"""`spillcache du`, `inspect`, `gc` and `config` on the run directories of torchrun jobs
(<disk_path>/<run>/rank<R>/): a line per rank, totals, and dead ranks cleaned up."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from spill_testing import run_console, run_preloaded_python
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.process.resolved import store_parent
from spillcache._internal.text import format_bytes
from spillcache.cli import main

RUN = "nightly-7f3a"
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The console script, as a user runs it (a process of its own: run_console)."""
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_") and k not in TORCHRUN
    }
    environ.update(env or {})
    return run_console(*args, env=environ)


@pytest.fixture
def cli(capsys, monkeypatch):
    """``spillcache`` in this process: cli("du", DIR, env={...}) -> (status, stdout, stderr)."""
    for name in [*TORCHRUN, *(k for k in os.environ if k.startswith("SPILLCACHE_"))]:
        monkeypatch.delenv(name, raising=False)

    def call(*args: str, env: dict | None = None) -> tuple[int, str, str]:
        with monkeypatch.context() as scoped:
            for name, value in (env or {}).items():
                scoped.setenv(name, value)
            status = main(list(args))
        out, err = capsys.readouterr()
        return status, out, err

    return call


def worker_env(rank: int) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "3", "TORCHELASTIC_RUN_ID": RUN}  # fmt: skip


# A rank that spills one tensor (into its rank directory: the cache puts it there), then
# is killed with SIGKILL.
RANK_CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from spillcache import CacheConfig, IntermediatesCache
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=sys.argv[1])
    cache = IntermediatesCache([{"h": torch.ones(64, 64)}], config=config)
    cache.flush()
    print(cache.store_path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def make_job(tmp_path: Path) -> dict:
    """A run of three ranks: rank 0 alive (this process), rank 1 killed with SIGKILL
    (its store left behind), rank 2 closed cleanly (its directory left empty); and a
    store of a lone process beside the run."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in worker_env(0).items():
            patch.setenv(name, value)
        rank0 = store_parent(tmp_path)
    assert rank0 == tmp_path / RUN / "rank0"
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(rank0))
    live = IntermediatesCache([{"h": torch.ones(32, 64)}], config=config)
    live.flush()
    alone = config.replace(disk_path=str(tmp_path))
    lone = IntermediatesCache([{"h": torch.ones(16, 64)}], config=alone)
    lone.flush()
    (tmp_path / RUN / "rank2").mkdir()
    # Killed once this process's caches are made (making one removes the stores of dead
    # processes it finds), as a rank that dies while the others run.
    environ = {k: v for k, v in os.environ.items() if k not in TORCHRUN}
    killed = run_preloaded_python("-c", RANK_CHILD, str(tmp_path), env={**environ, **worker_env(1)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    crashed = killed.stdout.strip()
    assert Path(crashed).parent == tmp_path / RUN / "rank1"
    return {"dir": tmp_path, "run": tmp_path / RUN, "live": live, "crashed": crashed,
            "lone": lone, "lone_path": lone.store_path}  # fmt: skip


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One job for the tests that only look at it."""
    made = make_job(tmp_path_factory.mktemp("job"))
    yield made
    made["live"].close()
    made["lone"].close()


@pytest.fixture
def fresh_job(tmp_path):
    """A job of its own, for a test that changes it."""
    made = make_job(tmp_path)
    yield made
    made["live"].close()
    made["lone"].close()


def _size(nbytes: int) -> list[str]:
    return format_bytes(nbytes).split()


def test_du_lists_a_line_per_rank_and_the_run_total(job, cli):
    status, out, _ = cli("du", str(job["dir"]), "--json")
    rows = {row["path"]: row for row in json.loads(out)}
    assert status == 0 and len(rows) == 3
    assert rows[job["crashed"]]["run"] == str(job["run"]) and rows[job["crashed"]]["rank"] == 1
    assert rows[job["crashed"]]["alive"] is False
    assert rows[job["live"].store_path]["rank"] == 0 and rows[job["live"].store_path]["alive"]
    assert rows[job["lone_path"]]["run"] is None and rows[job["lone_path"]]["rank"] is None
    size = {path: _size(row["bytes"]) for path, row in rows.items()}
    done = run("du", str(job["dir"]))  # the table, as a user sees it
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[0].split() == ["store", "size", "pid", "process", "state"]
    assert job["lone_path"] in out
    _, _, block = out.partition(f"\n\nrun {job['run']} (3 ranks)\n")
    assert block, out
    block, _, rest = block.partition("\n\n")
    lines = {line.split()[0]: line.split() for line in block.splitlines()}
    assert lines["rank"] == ["rank", "stores", "size", "owners"]
    assert lines["0"] == ["0", "1", *size[job["live"].store_path], "pid", str(os.getpid()), "alive"]
    assert lines["1"] == ["1", "1", *size[job["crashed"]], "pid", lines["1"][5], "dead"]
    assert lines["2"] == ["2", "0", "0", "B", "-"]
    in_run = rows[job["live"].store_path]["bytes"] + rows[job["crashed"]]["bytes"]
    assert lines["total"] == ["total", "2", *_size(in_run), "1", "alive,", "1", "dead"]
    everything = sum(row["bytes"] for row in rows.values())
    assert rest == f"total {' '.join(_size(everything))} in 3 stores (1 run)\n"


def test_du_of_the_run_directory_itself(job, cli):
    status, out, _ = cli("du", str(job["run"]))
    assert status == 0
    assert out.startswith(f"run {job['run']} (3 ranks)\nrank")
    assert job["lone_path"] not in out
    assert out.splitlines()[-1].endswith(" in 2 stores (1 run)")


def test_inspect_a_run_directory_lists_each_rank_and_totals(job, cli):
    status, out, _ = cli("inspect", str(job["run"]))
    assert status == 0
    lines = out.splitlines()
    assert lines[0].split() == ["run", str(job["run"])]
    assert lines[1].split() == ["ranks", "3", "(0,", "1,", "2)"]
    assert lines[2].split() == ["stores", "2,", "2", "arrays,", "24.0", "KiB"]
    assert lines[4].split() == ["rank", "store", "state", "owner", "arrays", "bytes"]
    table = {line.split()[0]: line.split() for line in lines[5:]}
    assert table["0"] == ["0", Path(job["live"].store_path).name, "open", "pid", str(os.getpid()),
                          "(alive)", "1", "8.0", "KiB"]  # fmt: skip
    assert table["1"][1:3] == [Path(job["crashed"]).name, "left"]
    assert table["1"][-4:] == ["(dead)", "1", "16.0", "KiB"]
    assert table["2"] == ["2", "-", "no", "store"]
    assert table["total"] == ["total", "2", "stores", "2", "24.0", "KiB"]
    status, out, _ = cli("inspect", str(job["run"]), "--json")
    info = json.loads(out)
    assert (info["run"], info["stores"], info["bytes"]) == (str(job["run"]), 2, 24 * 1024)
    assert [len(rank["stores"]) for rank in info["ranks"]] == [1, 1, 0]
    assert info["ranks"][1]["stores"][0]["owner_alive"] is False


def test_gc_removes_a_dead_rank_and_the_directories_it_leaves_never_a_live_one(fresh_job, cli):
    job = fresh_job
    status, dry, _ = cli("gc", str(job["dir"]))
    assert status == 0
    assert f"would remove {job['crashed']}" in dry
    assert f"would remove empty directory {job['run'] / 'rank1'}" in dry
    assert f"would remove empty directory {job['run'] / 'rank2'}" in dry
    assert f"empty directory {job['run']}\n" not in dry, "rank 0 is alive"
    assert "dry run" in dry and os.path.exists(job["crashed"])
    status, done, _ = cli("gc", str(job["dir"]), "--yes")
    assert status == 0
    assert f"removed {job['crashed']}" in done
    assert re.search(r"^removed 1 of 3 stores, .* and 2 empty directories$", done, re.M)
    assert sorted(p.name for p in job["run"].iterdir()) == ["rank0"]
    assert os.path.exists(job["live"].store_path) and os.path.exists(job["lone_path"])
    job["live"].close()  # rank 0 ends cleanly: its directory is empty, the run is done
    status, done, _ = cli("gc", str(job["dir"]), "--yes")
    assert f"removed empty directory {job['run'] / 'rank0'}" in done
    assert f"removed empty directory {job['run']}\n" in done
    assert not job["run"].exists() and os.path.exists(job["lone_path"])


def test_gc_leaves_directories_that_are_not_run_directories(tmp_path, cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "mixed" / "rank0").mkdir(parents=True)
    (tmp_path / "mixed" / "README").write_text("not spillcache's")
    assert cli("gc", str(tmp_path), "--yes") == (0, "removed 0 of 0 stores, 0 B\n", "")
    assert (tmp_path / "empty").is_dir() and (tmp_path / "mixed" / "rank0").is_dir()


def test_config_shows_what_auto_and_node_sizes_come_to(tmp_path, cli):
    status, out, _ = cli("config", "--json")
    figures = json.loads(out)
    assert figures["host_bytes"]["value"] == "auto" and figures["host_bytes"]["resolved"] > 0
    assert "rank" not in figures["budget_scope"]
    _, table, _ = cli("config")
    assert "auto (= " in table and "for this process: half the available RAM)" in table
    ranked = {**worker_env(1), "SPILLCACHE_HOST_BYTES": "3GiB",
              "SPILLCACHE_DISK_PATH": str(tmp_path)}  # fmt: skip
    figures = json.loads(cli("config", "--json", env=ranked)[1])
    assert figures["host_bytes"] == {
        "value": 3 * 2**30, "source": "SPILLCACHE_HOST_BYTES", "resolved": 2**30
    }  # fmt: skip
    assert figures["disk_path"]["resolved"] == str(tmp_path / RUN / "rank1")
    assert figures["budget_scope"]["rank"] == {
        "rank": 1, "world_size": 3, "local_rank": 1, "local_world_size": 3, "run_id": RUN
    }  # fmt: skip
    _, table, _ = cli("config", env=ranked)
    assert "3221225472 (3.0 GiB for the node: 1.0 GiB for each of its 3 ranks)" in table
    # "auto" parts of host_bytes come from the rank's share of it.
    assert figures["write_behind_bytes"]["resolved"] == 2**30 // 8
    assert "auto (= 128.0 MiB for this rank: an eighth of host_bytes, at most 512.0" in table
    assert f"this rank's stores in {tmp_path / RUN / 'rank1'}" in table
    _, out, _ = cli("config", "--json", env={**ranked, "SPILLCACHE_BUDGET_SCOPE": "rank"})
    assert "resolved" not in json.loads(out)["host_bytes"]


def test_config_with_a_malformed_rank_variable_is_one_clear_line():
    done = run("config", env={"LOCAL_WORLD_SIZE": "eight", "RANK": "0", "WORLD_SIZE": "8"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("spillcache config: LOCAL_WORLD_SIZE='eight': expected")


def test_inspect_a_run_names_a_store_it_cannot_read_and_goes_on(tmp_path, cli):
    rank_dir = tmp_path / RUN / "rank0"
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(rank_dir), keep_store=True)
    cache = IntermediatesCache([{"h": torch.ones(8, 64)}], config=config)
    cache.close()
    other = IntermediatesCache([{"h": torch.ones(8, 64)}], config=config)
    other.close()
    root = Path(other.store_path, "zarr.json")
    metadata = json.loads(root.read_text())
    metadata["attributes"]["spillcache"]["format_version"] = 99
    root.write_text(json.dumps(metadata))
    status, out, _ = cli("inspect", str(tmp_path / RUN))
    assert status == 0
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("0 ")}
    assert "complete" in rows[Path(cache.store_path).name]
    assert "unreadable: " in rows[Path(other.store_path).name]
    assert "version 99" in rows[Path(other.store_path).name]
    assert out.splitlines()[-1].split()[:3] == ["total", "2", "stores"]


def test_a_disk_path_of_several_drives(tmp_path, cli):
    """disk_path lists one directory per drive: config shows this rank's directory on
    each, and du and gc (without DIR) look at every drive."""
    drives = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for drive in drives:
        (drive / RUN / "rank1").mkdir(parents=True)
    setting = os.pathsep.join(map(str, drives))
    ranked = {**worker_env(1), "SPILLCACHE_DISK_PATH": setting}
    status, out, _ = cli("config", "--json", env=ranked)
    assert status == 0
    assert json.loads(out)["disk_path"]["resolved"] == [str(d / RUN / "rank1") for d in drives]
    _, table, _ = cli("config", env=ranked)
    assert f'["{drives[0]}", "{drives[1]}"] (this rank\'s stores in {drives[0] / RUN}' in table
    status, out, _ = cli("du", env={"SPILLCACHE_DISK_PATH": setting})
    assert status == 0 and all(f"run {d / RUN} (1 rank)" in out for d in drives)
    status, out, _ = cli("gc", "--yes", env={"SPILLCACHE_DISK_PATH": setting})
    assert out.endswith("removed 0 of 0 stores, 0 B and 4 empty directories\n")
    assert [list(d.iterdir()) for d in drives] == [[], []]
