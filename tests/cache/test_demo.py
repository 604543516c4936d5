"""``spillcache demo``: the README's main job, its summary and its options.

One run goes through the installed console script, as a user runs it; the rest call
``cli.main`` in this process with small sizes, so these tests take a few seconds.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
from pathlib import Path

import pytest

from spill_testing import run_console
from spillcache import CacheConfig, cli
from spillcache._internal.cli import demo
from spillcache._internal.process.resolved import transit_bytes
from spillcache._internal.text import format_bytes

SMALL = "--samples 8 --seq-len 128 --hidden 128 --layers 3".split()
KiB = 2**10
# The parts of host_bytes for values on their way to and from disk, set for every run:
# two 64 KiB hidden states each ("auto", an eighth of these small host_bytes, is less
# than one). A host tier of 128 KiB is then --host-bytes 384KiB.
PART = 128 * KiB
PARTS = 2 * PART


def run(*args: str) -> subprocess.CompletedProcess:
    return run_console(*args, timeout=300)


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    """No SPILLCACHE_* setting of the caller's leaks in; stores go to tmp_path."""
    for name in [name for name in os.environ if name.startswith("SPILLCACHE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPILLCACHE_DISK_PATH", str(tmp_path))
    monkeypatch.setenv("SPILLCACHE_WRITE_BEHIND_BYTES", str(PART))
    monkeypatch.setenv("SPILLCACHE_READ_BUFFER_BYTES", str(PART))


def tier_table(stdout: str) -> dict[str, list[str]]:
    """The summary's per-tier rows, by tier name: hits, misses, held, budget."""
    lines = stdout.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.split()[:3] == ["tier", "hits", "misses"]
    )
    rows = {}
    for line in lines[start + 1 :]:
        if not line or line.startswith("("):
            break
        name, hits, misses, rest = re.match(r"(\S+)\s+(\S+)\s+(\S+)\s+(.*)", line).groups()
        rows[name] = [hits, misses, *re.split(r"\s{2,}", rest)]
    return rows


def summary_value(stdout: str, name: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith(name))
    return line.split(" : ", 1)[1]


def test_demo_spills_and_matches_the_all_in_ram_run():
    # 64 KiB per hidden state: not below the default inline_bytes, so each one is tiered.
    done = run("demo", *SMALL, "--host-bytes", "384KiB")
    assert done.returncode == 0, done.stderr
    assert "bit for bit: yes" in done.stdout
    assert summary_value(done.stdout, "written to disk") != "0 B", done.stdout
    # host_bytes is all of it; the host tier what the two parts leave of it.
    assert summary_value(done.stdout, "host memory").startswith("384.0 KiB (host_bytes")
    assert summary_value(done.stdout, "host tier") == "128.0 KiB (20% of the activations)"
    assert set(tier_table(done.stdout)) == {"device", "host", "write-behind", "disk"}


def test_summary_shows_each_tiers_hits_and_misses_from_stats(monkeypatch, capsys):
    results = []

    def recorded(**kwargs):
        results.append(run_demo(**kwargs))
        return results[-1]

    run_demo = demo.run_demo
    monkeypatch.setattr(demo, "run_demo", recorded)
    assert cli.main(["demo", *SMALL, "--host-bytes", "384KiB"]) == 0
    out = capsys.readouterr().out
    (result,) = results
    stats = result.stats
    table = tier_table(out)
    for name in ("device", "host", "disk"):
        assert table[name][:2] == [str(stats[name]["hits"]), str(stats[name]["misses"])]
        assert table[name][2] == format_bytes(stats[name]["bytes"])
    assert table["write-behind"][:2] == [str(stats["write_behind"]["hits"]), "-"]
    assert table["host"][3] == "128.0 KiB" and table["disk"][3] == "no limit"
    assert table["write-behind"][3] == format_bytes(PART)
    assert result.host_bytes == 384 * KiB == stats["host"]["budget"] + PARTS
    assert summary_value(out, "host memory") == (
        "384.0 KiB (host_bytes: the host tier, and 256.0 KiB for values on their way to and "
        "from disk)"
    )
    # Figures of this run, not made up: every read of a hidden state (64 KiB, tiered; the
    # 16 KiB masks stay inline) is a host hit or miss, 2 passes of 8 batches for each of
    # 3 layers, and every host miss is served by the write-behind area or the disk.
    host, disk = stats["host"], stats["disk"]
    assert host["hits"] + host["misses"] == 8 * 2 * 3
    assert host["misses"] == stats["write_behind"]["hits"] + disk["hits"] > 0
    assert summary_value(out, "read from disk") == format_bytes(disk["bytes_read"])
    assert summary_value(out, "written to disk") == format_bytes(disk["bytes_written"])
    assert summary_value(out, "stalled on I/O") == f"{stats['stall_seconds']:.2f} s"
    wall = summary_value(out, "wall time")
    assert wall.startswith(f"{result.wall_seconds:.2f} s (all in RAM: ")
    assert f"{result.reference_seconds:.2f} s" in wall
    assert result.identical and out.rstrip().endswith("bit for bit: yes")


def test_keep_store_prints_the_kept_stores_path(capsys, tmp_path):
    assert cli.main(["demo", *SMALL, "--host-bytes", "0", "--keep-store"]) == 0
    path = Path(summary_value(capsys.readouterr().out, "store kept at"))
    assert path.parent == tmp_path and path.is_dir()


def test_a_host_budget_above_the_activations_spills_nothing(capsys):
    assert cli.main(["demo", *SMALL, "--host-bytes", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert summary_value(out, "written to disk") == "0 B"
    assert tier_table(out)["disk"][:2] == ["0", "0"]


def test_default_host_tier_is_a_quarter_of_the_activations(capsys):
    """host_bytes by default: a host tier of a quarter, and the parts set beside it."""
    assert cli.main(["demo", *SMALL]) == 0
    quarter = demo.activation_bytes(8, 128, 128) // 4
    out = capsys.readouterr().out
    assert summary_value(out, "host tier") == f"{format_bytes(quarter)} (25% of the activations)"
    assert summary_value(out, "host memory").startswith(f"{format_bytes(quarter + PARTS)} (")


@pytest.mark.parametrize(
    "sizes", [(8, 128, 128), tuple(demo.DEFAULT_SIZES[k] for k in ("samples", "seq_len", "hidden"))]
)
def test_default_host_bytes_hold_a_quarter_with_auto_parts(sizes):
    """With write_behind_bytes and read_buffer_bytes "auto" (an eighth of host_bytes each),
    the default host_bytes is the least whose tier is exactly a quarter."""
    quarter = demo.activation_bytes(*sizes) // 4
    host = demo.default_host_bytes(demo.activation_bytes(*sizes))
    assert host - 2 * transit_bytes(host) == quarter
    assert all(h - 2 * transit_bytes(h) < quarter for h in range(host - 8, host))
    parts = CacheConfig(write_behind_bytes="1MiB", read_buffer_bytes="2MiB")
    assert demo.default_host_bytes(demo.activation_bytes(*sizes), parts) == quarter + 3 * 2**20


def test_host_bytes_below_its_parts_is_one_clear_line(capsys):
    assert cli.main(["demo", *SMALL, "--host-bytes", "128KiB"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "host_bytes" in err and "read_buffer_bytes" in err


@pytest.mark.parametrize("flag", ["--samples", "--seq-len", "--hidden", "--layers"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_a_size_below_one_is_one_clear_line(flag, value, capsys):
    assert cli.main(["demo", flag, value]) == 2
    err = capsys.readouterr().err
    assert err == f"spillcache demo: {flag}: must be at least 1, got {value}\n"


@pytest.mark.parametrize("flag", ["--samples", "--seq-len", "--hidden", "--layers"])
def test_a_size_that_is_not_a_whole_number_is_refused_by_name(flag, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", flag, "1.5"])
    assert exited.value.code == 2
    assert f"argument {flag}: invalid int value: '1.5'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["lots", "-1MiB"])
def test_demo_bad_host_bytes_is_one_clear_line(value, capsys):
    assert cli.main(["demo", f"--host-bytes={value}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--host-bytes" in err and repr(value) in err


def test_demo_missing_config_file_is_one_clear_line(tmp_path, capsys):
    assert cli.main(["demo", "--config", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.toml" in err


def test_demo_invalid_config_file_is_one_clear_line(tmp_path, capsys):
    file = tmp_path / "spill.toml"
    file.write_text('eviction = "fifo"\n')
    assert cli.main(["demo", "--config", str(file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "spill.toml" in err and "eviction" in err


def test_the_config_files_host_budget_is_used(tmp_path, capsys):
    file = tmp_path / "spill.toml"
    # A host tier of 96 KiB, and the parts (the file's: it is the whole config).
    file.write_text(
        'host_bytes = "352KiB"\nwrite_behind_bytes = "128KiB"\nread_buffer_bytes = "128KiB"\n'
    )
    assert cli.main(["demo", *SMALL, "--config", str(file)]) == 0
    out = capsys.readouterr().out
    assert summary_value(out, "host memory").startswith("352.0 KiB")
    assert summary_value(out, "host tier").startswith("96.0 KiB")


def test_run_demo_refuses_sizes_below_one():
    with pytest.raises(ValueError, match="samples must be a whole number >= 1, got 0"):
        demo.run_demo(samples=0)


def demo_parser() -> argparse.ArgumentParser:
    commands = next(
        action
        for action in cli._build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    return commands.choices["demo"]


def test_every_demo_option_says_what_it_is_and_its_default():
    parser = demo_parser()
    options = [action for action in parser._actions if action.dest != "help"]
    assert {action.dest for action in options} == {
        "samples", "seq_len", "hidden", "layers", "host_bytes", "config", "keep_store", "json",
    }  # fmt: skip
    for action in options:
        assert action.help and "default" in action.help, action.dest
    sizes = {key: parser.get_default(key) for key in demo.DEFAULT_SIZES}
    assert sizes == demo.DEFAULT_SIZES
    # The description's figure is the defaults' own.
    cached = format_bytes(
        demo.activation_bytes(**{k: v for k, v in sizes.items() if k != "layers"})
    )
    assert f"The defaults cache {cached.replace('.0 ', ' ')}" in " ".join(
        parser.description.split()
    )
