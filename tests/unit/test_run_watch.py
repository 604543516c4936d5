"""run_watch.py: the progress lines and the metrics file of a run, from a stand-in for
the switch's figures (the real pipeline: tests/integration/test_run_watch.py)."""

from __future__ import annotations

import errno
import json
import os
import types

import pytest

from spillcache import ConfigError
from spillcache._internal.llmcompressor import run_watch
from spillcache._internal.llmcompressor.run_watch import RunWatch, hook_pipeline, watch_options

MIB = 2**20
SETTING = {
    "host_budget_bytes": 64 * MIB,
    "host_tier_bytes": 48 * MIB,
    "write_behind_bytes": "auto",
    "read_buffer_bytes": "auto",
    "disk_paths": ["/nvme/spill"],
    "ram_bytes": 1024 * MIB,
}


class Figures:
    """What the caches did so far, moved on by the test."""

    def __init__(self) -> None:
        self.now = {
            "disk_written_bytes": 0,
            "disk_read_bytes": 0,
            "stall_seconds": 0.0,
            "host_bytes": 0,
            "device_bytes": 0,
            "disk_bytes": 0,
            "values_bytes": 0,
            "values_peak_bytes": 0,
            "host_tier_budget_bytes": 48 * MIB,
            "host_peak_bytes": 0,
        }

    def figures(self, *, reset_peak: bool = False) -> dict:
        return dict(self.now)

    def move(self, **added) -> None:
        for key, value in added.items():
            self.now[key] += value


def watched(tmp_path, **kw):
    lines: list[str] = []
    source = Figures()
    watch = RunWatch(source, write=lines.append, **{"progress": True, "metrics_path": None} | kw)
    return watch, source, lines


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_line_per_subgraph_and_a_record_each(tmp_path):
    path = tmp_path / "run.jsonl"
    watch, source, lines = watched(tmp_path, metrics_path=path)
    watch.begin(SETTING)
    for subgraph in (1, 2):
        watch.pass_started(f"({subgraph}/2): Calibrating")
        source.move(disk_written_bytes=10 * MIB * subgraph, disk_read_bytes=3 * MIB)
        source.now.update(values_peak_bytes=40 * MIB * subgraph, host_bytes=5 * MIB)
        watch.pass_started(f"({subgraph}/2): Propagating")
        source.move(stall_seconds=0.25)
    watch.finish()

    assert lines[0].startswith("spillcache: host RAM budget 64.0 MiB (its host tier 48.0 MiB)")
    assert "spilling to /nvme/spill" in lines[0] and str(path) in lines[0]
    assert lines[1].startswith("spillcache: subgraph 1/2 (")
    assert "host 5.0 MiB/48.0 MiB" in lines[1] and "wrote 10.0 MiB" in lines[1]
    assert "read 3.0 MiB" in lines[1] and "stalled 0.25 s" in lines[1]
    assert "wrote 20.0 MiB" in lines[2] and "subgraph 2/2" in lines[2]
    assert lines[3].startswith("spillcache: done: 2 subgraphs in ")
    assert "wrote 30.0 MiB, read 6.0 MiB, stalled 0.50 s" in lines[3]
    assert len(lines) == 4

    found = records(path)
    assert [r["event"] for r in found] == ["start", "subgraph", "subgraph", "end"]
    assert all(r["version"] == run_watch.METRICS_VERSION and r["rank"] == 0 for r in found)
    start, first, second, end = found
    assert start["host_budget_bytes"] == 64 * MIB and start["disk_paths"] == ["/nvme/spill"]
    assert (first["subgraph"], first["subgraphs"]) == (1, 2)
    assert (first["written_bytes"], second["written_bytes"]) == (10 * MIB, 20 * MIB)
    assert (first["values_peak_bytes"], second["values_peak_bytes"]) == (40 * MIB, 80 * MIB)
    assert end["written_bytes"] == 30 * MIB and end["read_bytes"] == 6 * MIB
    assert end["values_peak_bytes"] == 80 * MIB and end["subgraphs_done"] == 2
    assert end["watch_seconds"] >= 0 and end["error"] is None


def test_progress_off_writes_the_file_and_says_nothing(tmp_path):
    path = tmp_path / "run.jsonl"
    watch, _, lines = watched(tmp_path, progress=False, metrics_path=path)
    watch.begin(SETTING)
    watch.pass_started("(1/1): Calibrating")
    watch.finish()
    assert lines == []
    assert [r["event"] for r in records(path)] == ["start", "subgraph", "end"]


def test_other_bars_and_events_outside_a_run_change_nothing(tmp_path):
    watch, _, lines = watched(tmp_path)
    watch.pass_started("(1/3): Calibrating")  # no cache built yet: no run
    watch.finish()
    watch.begin(SETTING)
    watch.pass_started("Preparing cache")  # a bar of someone else's
    watch.pass_started(None)
    watch.finish()
    assert len(lines) == 2 and "done: 0 subgraphs" in lines[1]


def test_a_new_run_starts_after_the_last_one_ended(tmp_path):
    path = tmp_path / "run.jsonl"
    watch, _, _ = watched(tmp_path, metrics_path=path)
    for _ in range(2):
        watch.begin(SETTING)
        watch.begin(SETTING)  # another cache of the same run (AWQ's): no new run
        watch.pass_started("(1/1): Calibrating")
        watch.finish()
    assert [r["event"] for r in records(path)] == ["start", "subgraph", "end"] * 2


def test_a_metrics_file_that_fails_is_warned_about_once_and_the_run_goes_on(tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    watch, _, lines = watched(tmp_path, metrics_path=path)
    watch.begin(SETTING)
    real_write = os.write

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_watch.os, "write", full)
    with pytest.warns(UserWarning, match="could not write the metrics file .*No space left"):
        watch.pass_started("(1/2): Calibrating")
        watch.pass_started("(2/2): Calibrating")
    monkeypatch.setattr(run_watch.os, "write", real_write)
    watch.finish()  # no second warning, no error: the file is no longer written
    assert len(lines) == 4 and [r["event"] for r in records(path)] == ["start"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d, "is a directory: name a file in it"),
        (lambda d: d / "missing" / "run.jsonl", "does not exist; create it first"),
    ],
    ids=["a directory", "a missing directory"],
)
@pytest.mark.parametrize("given", ["argument", "variable"])
def test_a_bad_metrics_path_names_where_it_came_from_and_the_fix(
    tmp_path, monkeypatch, make, message, given
):
    path = make(tmp_path)
    if given == "variable":
        monkeypatch.setenv(run_watch.METRICS_PATH_VARIABLE, str(path))
        path, name = None, run_watch.METRICS_PATH_VARIABLE
    else:
        name = "metrics_path"
    with pytest.raises(ConfigError, match=rf"^{name} .*{message}"):
        watch_options(None, path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_metrics_directory_is_refused(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="cannot be written by this process"):
            watch_options(None, tmp_path / "run.jsonl")
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize(
    ("value", "progress"), [("", True), ("0", False), ("off", False), ("1", True), ("YES", True)]
)
def test_the_progress_variable(monkeypatch, value, progress):
    monkeypatch.setenv(run_watch.PROGRESS_VARIABLE, value)
    assert watch_options(None, None) == {"progress": progress, "metrics_path": None}
    assert watch_options(not progress, None)["progress"] is (not progress)  # the argument wins


def test_a_progress_variable_that_is_no_switch_is_refused(monkeypatch):
    monkeypatch.setenv(run_watch.PROGRESS_VARIABLE, "quiet")
    with pytest.raises(ConfigError, match=r"SPILLCACHE_PROGRESS='quiet' is not a switch: set"):
        watch_options(None, None)


def test_the_hooks_report_passes_and_the_end_and_go_back(tmp_path):
    calls: list[str] = []

    class Callbacks:
        @classmethod
        def calibration_end(cls, **kwargs):
            calls.append("stock end")

        @classmethod
        def sequential_epoch_end(cls, *args):
            calls.append("epoch end")

    def stock_tqdm(iterable, total=None, desc=None):
        calls.append(f"bar {desc}")
        return iterable

    module = types.ModuleType("pipeline")
    module.tqdm, module.LifecycleCallbacks = stock_tqdm, Callbacks
    watch, _, lines = watched(tmp_path)
    unhook = hook_pipeline(module, watch)
    watch.begin(SETTING)
    assert list(module.tqdm([1, 2], total=2, desc="(1/1): Calibrating")) == [1, 2]
    module.LifecycleCallbacks.sequential_epoch_end()
    module.LifecycleCallbacks.calibration_end()
    assert calls == ["bar (1/1): Calibrating", "epoch end", "stock end"]
    assert [line.split(":")[1].split()[0] for line in lines] == ["host", "subgraph", "done"]
    unhook()
    assert module.tqdm is stock_tqdm and module.LifecycleCallbacks is Callbacks


def test_a_calibration_that_failed_then_a_retry_are_two_runs(tmp_path):
    """No calibration_end came (an exception); the same switch's next calibration
    begins again at subgraph 1: the first run ends, saying why, and a new one starts."""
    path = tmp_path / "run.jsonl"
    watch, source, lines = watched(tmp_path, metrics_path=path)
    watch.begin(SETTING)
    watch.pass_started("(1/3): Calibrating")
    watch.pass_started("(2/3): Calibrating")
    source.move(disk_written_bytes=100)
    watch.pass_started("(1/3): Calibrating")  # the retry
    source.move(disk_written_bytes=7)
    watch.pass_started("(2/3): Calibrating")
    found = records(path)
    events = [r["event"] for r in found]
    assert events == ["start", "subgraph", "subgraph", "end", "start", "subgraph"]
    assert found[3]["error"] == "a new calibration began before this one ended"
    assert found[2]["written_bytes"] == 100 and found[5]["written_bytes"] == 7
    assert any("ended early (a new calibration began" in line for line in lines)


def test_a_run_ended_by_an_exception_says_so(tmp_path):
    path = tmp_path / "run.jsonl"
    watch, _, lines = watched(tmp_path, metrics_path=path)
    watch.begin(SETTING)
    watch.pass_started("(1/2): Calibrating")
    watch.finish(MemoryError("out of memory"))
    assert records(path)[-1]["error"] == "MemoryError: out of memory"
    assert lines[-1].startswith("spillcache: ended early (MemoryError: out of memory): 1 subgraph")


def test_a_watch_that_fails_warns_once_and_never_stops_the_run(tmp_path):
    watch, source, lines = watched(tmp_path, metrics_path=tmp_path / "run.jsonl")
    watch.safely(watch.begin, SETTING)

    def broken(*, reset_peak=False):
        raise KeyError("host")

    source.figures = broken
    with pytest.warns(UserWarning, match="stopped its progress lines and metrics file"):
        watch.safely(watch.pass_started, "(1/2): Calibrating")
        watch.safely(watch.pass_started, "(2/2): Calibrating")  # raises: warned, stopped
    watch.safely(watch.finish)  # stopped: nothing more, and no second warning
    assert len(lines) == 1


def test_only_rank_0_prints_but_every_rank_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = tmp_path / "run.jsonl"
    watch, _, lines = watched(tmp_path, metrics_path=path)
    watch.begin(SETTING)
    watch.pass_started("(1/1): Calibrating")
    watch.finish()
    assert lines == []
    found = records(path)
    assert {(r["rank"], r["world"], r["pid"]) for r in found} == {(1, 2, os.getpid())}


def test_a_pipeline_module_without_the_names_is_not_hooked(tmp_path):
    module = types.ModuleType("pipeline")
    watch, _, _ = watched(tmp_path)
    with pytest.warns(UserWarning, match="has no tqdm or LifecycleCallbacks to watch"):
        unhook = hook_pipeline(module, watch)
    unhook()
    assert not hasattr(module, "tqdm")


def test_a_line_torn_by_a_full_disk_does_not_swallow_the_next_runs_start(tmp_path, monkeypatch):
    from spillcache._internal.cli.report_cli import read_runs

    path = tmp_path / "run.jsonl"
    first, _, _ = watched(tmp_path, metrics_path=path)
    first.begin(SETTING)
    first.pass_started("(1/2): Calibrating")
    real_write = os.write
    monkeypatch.setattr(run_watch.os, "write", lambda fd, data: real_write(fd, data[:10]))
    with pytest.warns(UserWarning, match="could not write the metrics file"):
        first.safely(first.pass_started, "(2/2): Calibrating")  # a torn line; the run goes on
    monkeypatch.setattr(run_watch.os, "write", real_write)
    second, _, _ = watched(tmp_path, metrics_path=path)
    monkeypatch.setattr(run_watch.os, "getpid", lambda: 999_999)  # another process
    second.begin(SETTING)
    second.pass_started("(1/1): Calibrating")
    second.finish()
    runs = read_runs(path)
    assert len(runs) == 2 and runs[1].end is not None


def test_a_retry_after_a_failure_in_the_first_subgraph_is_a_new_run(tmp_path):
    path = tmp_path / "run.jsonl"
    watch, source, _ = watched(tmp_path, metrics_path=path)
    watch.begin(SETTING)
    watch.pass_started("(1/2): Calibrating")
    source.move(disk_written_bytes=100)  # it fails here, and never says calibration_end
    watch.pass_started("(1/2): Calibrating")  # the retry
    source.move(disk_written_bytes=7)
    watch.pass_started("(1/2): Propagating")
    watch.pass_started("(2/2): Calibrating")
    found = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in found] == ["start", "subgraph", "end", "start", "subgraph"]
    assert found[2]["error"] == "a new calibration began before this one ended"
    assert found[1]["written_bytes"] == 100 and found[4]["written_bytes"] == 7
