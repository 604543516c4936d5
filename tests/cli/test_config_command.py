"""``spillcache config``: every "auto" setting says what it comes to on this machine,
in the table and under "resolved" with --json (device_bytes, direct_io here; host_bytes
and disk_path, and torchrun's shares, in test_cli_runs.py)."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from spillcache import CacheConfig
from spillcache._internal.io import chunkio
from spillcache.cli import main

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


@pytest.fixture
def config(capsys, monkeypatch):
    """``spillcache config`` in this process, with only the given variables set:
    config(env) -> (the --json figures, the table's value column by setting)."""
    for name in [*TORCHRUN, *(k for k in os.environ if k.startswith("SPILLCACHE_"))]:
        monkeypatch.delenv(name, raising=False)

    def call(**env: str) -> tuple[dict, dict[str, str]]:
        with monkeypatch.context() as scoped:
            for name, value in env.items():
                scoped.setenv(name, value)
            assert main(["config", "--json"]) == 0
            figures = json.loads(capsys.readouterr().out)
            assert main(["config"]) == 0
            lines = capsys.readouterr().out.splitlines()[1:]
        # "name  value (note)  source": the value column, the source cut off its end
        table = {
            line.split()[0]: line.split(None, 1)[1].rsplit(None, 1)[0].strip() for line in lines
        }
        return figures, table

    return call


@pytest.fixture
def probes(monkeypatch):
    """Replaces the O_DIRECT probe: records the directories it is asked about, and answers
    from ``probes.answers`` (directory -> True, False or an OSError to raise)."""
    asked = []

    def probe(directory):
        asked.append(str(directory))
        answer = probe.answers.get(str(directory), True)
        if isinstance(answer, OSError):
            raise answer
        return answer

    probe.asked, probe.answers = asked, {}
    monkeypatch.setattr(chunkio, "direct_io_supported", probe)
    return probe


def test_every_auto_setting_says_what_it_comes_to(config):
    figures, table = config()
    defaults = CacheConfig()  # a setting added with an "auto" default is checked too
    autos = [name for name in CacheConfig.field_names() if getattr(defaults, name) == "auto"]
    assert {"device_bytes", "host_bytes", "disk_path", "direct_io"} <= set(autos)
    for name in autos:
        assert figures[name]["value"] == "auto", name
        assert "resolved" in figures[name], name
        assert table[name].startswith("auto (") and table[name].endswith(")"), table[name]


def test_device_bytes_auto_is_none_offloading_to_the_cpu_and_no_limit_otherwise(config):
    figures, table = config()
    device = figures["device_bytes"]
    assert device["value"] == "auto" and device["source"] == "default"
    assert device["resolved"] == {
        "offload_device_cpu": 0, "offload_device_none_or_accelerator": None
    }  # fmt: skip
    assert table["device_bytes"].startswith("auto (= 0 offloading to the CPU, else no limit")


@pytest.mark.skipif(not hasattr(torch, "accelerator"), reason="torch.accelerator: torch 2.6+")
def test_device_bytes_auto_says_whether_this_machine_has_an_accelerator(config, monkeypatch):
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    figures, table = config()
    assert figures["device_bytes"]["accelerator"] is None
    assert table["device_bytes"].endswith("; no accelerator here)")
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 2)
    figures, table = config()
    assert figures["device_bytes"]["accelerator"] == {"type": "cuda", "count": 2}
    assert table["device_bytes"].endswith("; accelerator here: 2 cuda devices)")


def test_device_bytes_set_has_nothing_to_resolve(config):
    figures, table = config(SPILLCACHE_DEVICE_BYTES="8GiB")
    assert figures["device_bytes"] == {"value": 8 * 2**30, "source": "SPILLCACHE_DEVICE_BYTES"}
    assert table["device_bytes"] == "8589934592 (8.0 GiB)"


def test_direct_io_auto_probes_the_disk_path_here(config, tmp_path):
    figures, table = config(SPILLCACHE_DISK_PATH=str(tmp_path))
    takes = chunkio.direct_io_supported(tmp_path)
    assert figures["direct_io"] == {"value": "auto", "source": "default", "resolved": takes}
    verdict = "takes O_DIRECT" if takes else "refuses O_DIRECT (buffered I/O there)"
    assert table["direct_io"] == f"auto (= {str(takes).lower()}: {tmp_path} {verdict})"
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_direct_io_auto_follows_the_probes_answer(config, probes, tmp_path):
    # Not made yet: a store would be made on the filesystem of its nearest parent.
    disk_path = tmp_path / "spill" / "new"
    probes.answers[str(tmp_path)] = False
    figures, table = config(SPILLCACHE_DISK_PATH=str(disk_path))
    assert set(probes.asked) == {str(tmp_path)}
    assert figures["direct_io"]["resolved"] is False
    assert table["direct_io"] == f"auto (= false: {tmp_path} refuses O_DIRECT (buffered I/O there))"
    probes.answers[str(tmp_path)] = True
    figures, table = config(SPILLCACHE_DISK_PATH=str(disk_path))
    assert figures["direct_io"]["resolved"] is True
    assert table["direct_io"] == f"auto (= true: {tmp_path} takes O_DIRECT)"


def test_direct_io_auto_answers_for_each_drive(config, probes, tmp_path):
    drives = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for drive in drives:
        drive.mkdir()
    probes.answers[str(drives[1])] = False
    figures, table = config(SPILLCACHE_DISK_PATH=os.pathsep.join(map(str, drives)))
    assert set(probes.asked) == set(map(str, drives))
    assert figures["direct_io"]["resolved"] == [True, False]
    assert f"= true: {drives[0]} takes O_DIRECT; = false: {drives[1]} refuses" in table["direct_io"]


def test_direct_io_auto_that_cannot_be_probed_is_said_not_raised(config, probes, tmp_path):
    probes.answers[str(tmp_path)] = PermissionError(errno.EACCES, "Permission denied")
    figures, table = config(SPILLCACHE_DISK_PATH=str(tmp_path))
    assert figures["direct_io"]["resolved"] is None
    assert "Permission denied" in figures["direct_io"]["errors"][str(tmp_path)]
    assert table["direct_io"] == f"auto (cannot tell for {tmp_path}: Permission denied)"


def test_direct_io_auto_without_a_disk_tier_is_unused(config, probes):
    figures, table = config(SPILLCACHE_DISK_PATH="none")
    assert figures["direct_io"] == {"value": "auto", "source": "default", "resolved": None}
    assert table["direct_io"] == "auto (unused: no disk tier)"
    assert probes.asked == []


@pytest.mark.parametrize("value", ["true", "false"])
def test_direct_io_set_is_not_probed(config, probes, tmp_path, value):
    figures, table = config(SPILLCACHE_DISK_PATH=str(tmp_path), SPILLCACHE_DIRECT_IO=value)
    assert figures["direct_io"] == {"value": value == "true", "source": "SPILLCACHE_DIRECT_IO"}
    assert table["direct_io"] == value
    assert probes.asked == []


def test_a_host_budget_a_cache_here_would_refuse_is_said_with_the_table(monkeypatch, capsys):
    """The config may be meant for another node: it is shown, and one line on stderr
    says what a cache made here would do with it (issue 23)."""
    for name in [*TORCHRUN, *(k for k in os.environ if k.startswith("SPILLCACHE_"))]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "100TiB")
    assert main(["config"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split() == ["setting", "value", "from"]
    assert err.count("\n") == 1, err
    assert err.startswith(
        "spillcache config: a cache made here would refuse it: host_bytes: "
        "100.0 TiB (SPILLCACHE_HOST_BYTES) is more than this machine's RAM"
    )
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "8GiB")
    monkeypatch.setattr("spillcache._internal.process.resolved.available_ram", lambda: 4 * 2**30)
    ram = (16 * 2**30, "RAM")
    monkeypatch.setattr("spillcache._internal.process.resolved.ram_limit", lambda: ram)
    assert main(["config"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "spillcache config: warning: spillcache's host_bytes, 8.0 GiB "
        "(SPILLCACHE_HOST_BYTES), is more than the memory available now, 4.0 GiB"
    )
