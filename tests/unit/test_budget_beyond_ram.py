"""A host budget this machine can never hold is refused when a cache is made, and one it
cannot hold now is warned about (issue 23): naming the figure, where it was set, the RAM,
and the fix. Nothing here maps the budgets it checks: a refused cache allocates nothing.
"""

from __future__ import annotations

import warnings

import pytest

from spillcache import CacheConfig, IntermediatesCache, cli
from spillcache._internal import sysinfo
from spillcache._internal.cli import demo
from spillcache._internal.process.resolved import (
    check_host_budget,
    checked_process_budgets,
    process_budgets,
)
from spillcache._internal.text import format_bytes
from spillcache.errors import ConfigError

GiB = 2**30
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


@pytest.fixture(autouse=True)
def environment(monkeypatch, tmp_path):
    """No SPILLCACHE_* setting or torchrun variable of the caller's leaks in."""
    import os

    for name in [*TORCHRUN, *(k for k in os.environ if k.startswith("SPILLCACHE_"))]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPILLCACHE_DISK_PATH", str(tmp_path))


def torchrun(monkeypatch, local_world: int) -> None:
    for name, value in {"RANK": "1", "WORLD_SIZE": str(local_world), "LOCAL_RANK": "1",
                        "LOCAL_WORLD_SIZE": str(local_world)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)


def refusal(config: CacheConfig, **figures) -> str:
    with pytest.raises(ConfigError) as refused:
        check_host_budget(config, process_budgets(config), **figures)
    message = str(refused.value)
    assert "\n" not in message
    return message


def test_100_tib_from_the_variable_is_refused_naming_it_and_this_machines_ram(monkeypatch):
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "100TiB")
    ram, what = sysinfo.ram_limit()
    with pytest.raises(ConfigError) as refused:
        checked_process_budgets(CacheConfig.from_env())
    message = str(refused.value)
    assert message.startswith("host_bytes: 100.0 TiB (SPILLCACHE_HOST_BYTES) is more than")
    assert f"{what}, {format_bytes(ram)}" in message and "RAM" in what
    assert "set SPILLCACHE_HOST_BYTES to" in message and '"auto"' in message


def test_a_budget_given_in_code_or_a_file_names_where_it_was_set(tmp_path):
    message = refusal(CacheConfig(host_bytes="100TiB"))
    assert "(host_bytes as given in code)" in message and "set host_bytes to" in message
    # replace() keeps where the other fields came from, and host_bytes is still code's
    message = refusal(CacheConfig(host_bytes="100TiB").replace(eviction="lru"))
    assert "(host_bytes as given in code)" in message
    file = tmp_path / "spill.toml"
    file.write_text('host_bytes = "100TiB"\n')
    message = refusal(CacheConfig.from_file(file))
    assert f"(host_bytes in {file})" in message and f"set host_bytes in {file} to" in message


def test_a_cache_refuses_a_budget_beyond_ram_when_it_is_made(monkeypatch):
    """Through the variable and through CacheConfig: refused before anything is stored
    (needs the pool to resolve its budgets with ``resolved.checked_process_budgets``)."""
    ram = format_bytes(sysinfo.ram_limit()[0])
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "100TiB")
    with pytest.raises(ConfigError, match=rf"SPILLCACHE_HOST_BYTES\) is more than .*, {ram}"):
        IntermediatesCache.empty(2, offload_device="cpu")
    monkeypatch.delenv("SPILLCACHE_HOST_BYTES")
    config = CacheConfig(host_bytes="100TiB")
    with pytest.raises(ConfigError, match=rf"host_bytes: 100.0 TiB .*, {ram}"):
        IntermediatesCache.empty(2, offload_device="cpu", config=config)


def test_a_budget_above_what_is_available_now_is_warned_about_naming_both():
    config = CacheConfig(host_bytes="6GiB")
    figures = dict(ram=(10 * GiB, "this machine's RAM"), available=4 * GiB)
    with pytest.warns(UserWarning) as said:
        check_host_budget(config, process_budgets(config), **figures)
    (warning,) = said
    message = str(warning.message)
    assert "host_bytes, 6.0 GiB (host_bytes as given in code)" in message
    assert "available now, 4.0 GiB of 10.0 GiB (this machine's RAM)" in message
    assert "set host_bytes lower, or free memory first" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        within = CacheConfig(host_bytes="3GiB")
        check_host_budget(within, process_budgets(within), **figures)
        # a check ahead of the cache (the demo's) leaves the warning to the cache
        check_host_budget(config, process_budgets(config), **figures, warn=False)


def test_under_torchrun_the_node_figure_is_compared(monkeypatch):
    torchrun(monkeypatch, local_world=8)
    ram = (32 * GiB, "this machine's RAM")
    # budget_scope "node": 64 GiB for the node (8 per rank) is the node's 64 GiB
    node = CacheConfig(host_bytes="64GiB")
    assert process_budgets(node).host_bytes == 8 * GiB
    assert "host_bytes: 64.0 GiB (host_bytes as given in code)" in refusal(node, ram=ram)
    check_host_budget(node, process_budgets(node), ram=(128 * GiB, "RAM"), available=128 * GiB)
    # budget_scope "rank": 8 GiB each is 64 GiB for the node's 8 ranks
    rank = CacheConfig(host_bytes="8GiB", budget_scope="rank")
    message = refusal(rank, ram=ram)
    assert "8.0 GiB for each of this node's 8 ranks" in message and "64.0 GiB in all" in message


def test_auto_and_no_region_are_never_refused():
    tiny = dict(ram=(1, "this machine's RAM"), available=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for config in (CacheConfig(), CacheConfig(host_bytes=0)):
            check_host_budget(config, process_budgets(config, ram_available=GiB), **tiny)


def test_the_cgroup_limit_counts_where_it_is_lower_than_the_ram(tmp_path):
    total = sysinfo.ram_limit(tmp_path / "none", tmp_path / "none")
    assert total[1] == "this machine's RAM" and total[0] > 0
    # cgroup v2: the lowest memory.max from the process's group up to the root
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "step" / "memory.max").write_text("max\n")
    (v2 / "job" / "memory.max").write_text(f"{GiB}\n")
    (tmp_path / "cgroup2").write_text("0::/job/step\n")
    assert sysinfo.ram_limit(v2, tmp_path / "cgroup2") == (
        GiB,
        "this process's cgroup memory limit",
    )
    # cgroup v1: the memory controller's hierarchy; the kernel's "no limit" is none
    v1 = tmp_path / "v1"
    (v1 / "memory" / "slurm" / "job").mkdir(parents=True)
    (v1 / "memory" / "slurm" / "job" / "memory.limit_in_bytes").write_text("9223372036854771712")
    (v1 / "memory" / "slurm" / "memory.limit_in_bytes").write_text(str(2 * GiB))
    (tmp_path / "cgroup1").write_text("5:cpu:/\n4:memory:/slurm/job\n0::/\n")
    assert sysinfo.ram_limit(v1, tmp_path / "cgroup1")[0] == 2 * GiB
    # a limit above the RAM is the RAM
    (v2 / "job" / "memory.max").write_text(str(total[0] * 2))
    assert sysinfo.ram_limit(v2, tmp_path / "cgroup2") == total


def test_auto_host_bytes_is_half_of_what_the_cgroup_still_allows(tmp_path, monkeypatch):
    """In a Slurm job (--mem) or a container the machine's MemAvailable is not this
    process's: what is available is also at most each limited cgroup's limit less what
    its processes hold (page cache the kernel reclaims first not counted), and "auto"
    takes half of the lower figure, so the region cannot outgrow the job."""
    machine = sysinfo.available_ram(tmp_path / "none", tmp_path / "none")
    assert machine > 0
    # cgroup v2: the job's 8 GiB limit, 6 GiB held of which 1 GiB reclaimable page cache
    v2 = tmp_path / "v2"
    (v2 / "job" / "step").mkdir(parents=True)
    (v2 / "job" / "step" / "memory.max").write_text("max\n")
    (v2 / "job" / "memory.max").write_text(f"{8 * GiB}\n")
    (v2 / "job" / "memory.current").write_text(f"{6 * GiB}\n")
    (v2 / "job" / "memory.stat").write_text(f"anon {5 * GiB}\ninactive_file {GiB}\n")
    (tmp_path / "cgroup2").write_text("0::/job/step\n")
    assert sysinfo.available_ram(v2, tmp_path / "cgroup2") == min(machine, 3 * GiB)
    (v2 / "job" / "memory.current").write_text(f"{10 * GiB}\n")  # over it: none, not less
    assert sysinfo.available_ram(v2, tmp_path / "cgroup2") == 0
    # cgroup v1: memory.usage_in_bytes and total_inactive_file, the lowest room wins
    v1 = tmp_path / "v1" / "memory"
    (v1 / "slurm" / "job").mkdir(parents=True)
    for directory, limit, usage in ((v1 / "slurm", 4, 1), (v1 / "slurm" / "job", 3, 1)):
        (directory / "memory.limit_in_bytes").write_text(str(limit * GiB))
        (directory / "memory.usage_in_bytes").write_text(str(usage * GiB))
    (tmp_path / "cgroup1").write_text("4:memory:/slurm/job\n0::/\n")
    assert sysinfo.available_ram(v1.parent, tmp_path / "cgroup1") == min(machine, 2 * GiB)

    monkeypatch.setattr(
        "spillcache._internal.process.resolved.available_ram",
        lambda: sysinfo.available_ram(v1.parent, tmp_path / "cgroup1"),
    )
    assert process_budgets(CacheConfig()).host_bytes == min(machine, 2 * GiB) // 2


def test_the_demo_refuses_it_before_either_run(monkeypatch, capsys):
    monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "100TiB")

    def calibrate(*args, **kwargs):
        raise AssertionError("the demo ran a calibration before refusing its budget")

    monkeypatch.setattr(demo, "calibrate", calibrate)
    assert cli.main(["demo", "--samples", "2", "--seq-len", "8", "--hidden", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "SPILLCACHE_HOST_BYTES" in err and "RAM" in err, err
    monkeypatch.delenv("SPILLCACHE_HOST_BYTES")
    assert cli.main(["demo", "--host-bytes", "100TiB", "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert "(--host-bytes) is more than" in err and "give --host-bytes to" in err, err
