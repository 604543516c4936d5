"""The README's main-job command, run as a user runs it."""

from __future__ import annotations

import subprocess

from spill_testing import console_script


def run(*args: str) -> subprocess.CompletedProcess:
    command = [console_script(), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_demo_spills_and_matches_the_all_in_ram_run(tmp_path):
    # 64 KiB per activation: above the default inline_bytes, so each one is tiered.
    sizes = "--samples 8 --seq-len 128 --hidden 128 --layers 3 --host-bytes 128KiB".split()
    done = run("demo", *sizes)
    assert done.returncode == 0, done.stderr
    assert "bit for bit: yes" in done.stdout
    written = next(line for line in done.stdout.splitlines() if line.startswith("written to disk"))
    assert not written.endswith(" 0 B"), done.stdout


def test_demo_bad_size_is_one_clear_line():
    done = run("demo", "--host-bytes", "lots")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "--host-bytes" in done.stderr and "'lots'" in done.stderr


def test_demo_missing_config_file_is_one_clear_line(tmp_path):
    done = run("demo", "--config", str(tmp_path / "nope.toml"))
    assert done.returncode == 2
    assert "nope.toml" in done.stderr and "Traceback" not in done.stderr
