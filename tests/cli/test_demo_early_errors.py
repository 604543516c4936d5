"""``spillcache demo``: bad input refused before any run, in one line (issue 23), and its
progress as one line per stage where stderr is not a terminal (a log file)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from spill_testing import run_console
from spillcache import cli
from spillcache._internal.cli import demo

SMALL = "--samples 8 --seq-len 128 --hidden 128 --layers 3".split()


def run(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_")}
    start = time.monotonic()
    done = run_console(*args, timeout=300, env={**environ, **env})
    return done, time.monotonic() - start


def test_a_disk_path_that_is_a_file_exits_2_within_5_s_before_any_run(tmp_path):
    """At the default sizes the all-in-RAM run alone takes tens of seconds: the bad
    path is found before it. Starting Python and torch is most of what is left; on a
    loaded machine that alone can take seconds, so it is measured and allowed for."""
    afile = tmp_path / "spill"
    afile.write_text("not a directory")
    _, startup = run("demo", "--help", env={})
    done, seconds = run("demo", env={"SPILLCACHE_DISK_PATH": str(afile)})
    assert done.returncode == 2, done
    assert done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
    line = done.stderr
    assert line.startswith(f"spillcache demo: disk_path: {afile} is not a directory")
    assert "set SPILLCACHE_DISK_PATH to a directory on a local disk" in line, line
    assert seconds < max(5.0, startup + 2.0), (seconds, startup)


def test_a_bad_disk_path_in_the_demos_config_file_names_the_file(tmp_path, capsys, monkeypatch):
    def calibrate(*args, **kwargs):
        raise AssertionError("the demo ran a calibration before checking its disk path")

    monkeypatch.setattr(demo, "calibrate", calibrate)
    afile = tmp_path / "spill"
    afile.write_text("")
    config = tmp_path / "spill.toml"
    config.write_text(f'disk_path = "{afile}"\n')
    assert cli.main(["demo", *SMALL, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"set disk_path in {config} to a directory" in err, err
    assert cli.main(["demo", *SMALL, "--config", str(tmp_path / "absent.toml")]) == 2
    assert "spillcache demo: --config: config file" in capsys.readouterr().err


def test_sizes_whose_all_in_ram_run_cannot_fit_are_refused_first(capsys, monkeypatch):
    monkeypatch.setattr(demo, "calibrate", lambda *a, **k: pytest.fail("a run was started"))
    assert cli.main(["demo", "--samples", str(10**7)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "all-in-RAM reference run" in err, err
    assert "lower --samples, --seq-len or --hidden" in err and "Errno" not in err


def test_a_log_gets_one_line_per_stage_not_a_progress_bar(tmp_path):
    """stderr to a file, as in a batch job's log: no tqdm bar redrawn line after line,
    one line per stage as it ends (the fill, then two passes per subgraph: 9 of the
    all-in-RAM run, 9 of the spilling run)."""
    done, _ = run("demo", *SMALL, "--host-bytes", "384KiB",
                  env={"SPILLCACHE_DISK_PATH": str(tmp_path),
                       "SPILLCACHE_WRITE_BEHIND_BYTES": "128KiB",
                       "SPILLCACHE_READ_BUFFER_BYTES": "128KiB"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "it/s" not in done.stderr, done.stderr
    assert len(lines) == 18, lines
    assert lines[0].startswith("all in RAM: fill the cache: 8 batches, ")
    assert lines[-1].startswith("spilling: subgraph 3 of 3, propagate: 8 batches, ")
    assert "bit for bit: yes" in done.stdout


def test_json_output_leaves_stderr_empty_where_it_is_not_a_terminal(tmp_path):
    done, _ = run("demo", "--samples", "2", "--seq-len", "16", "--hidden", "16", "--json",
                  env={"SPILLCACHE_DISK_PATH": str(tmp_path)})  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert Path(tmp_path).is_dir()
