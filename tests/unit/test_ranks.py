"""This process under torchrun-like environments (resolved.py): rank and run detection,
each rank's share of the node's budgets, the run directory layout (and store_dirs.py's
run-directory helpers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.distributed as dist

from spillcache._internal.process import resolved
from spillcache._internal.process.resolved import (
    RankInfo,
    process_budgets,
    rank_info,
    run_id,
    store_parent,
)
from spillcache._internal.store import store_dirs, tensor_store
from spillcache.config import CacheConfig
from spillcache.errors import ConfigError, StoreError

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
JOB = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
GiB = 2**30
MiB = 2**20


@pytest.fixture(autouse=True)
def lone_process(monkeypatch):
    """Every test starts outside torchrun; it sets what it needs."""
    for name in TORCHRUN + JOB:
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()


def torchrun(monkeypatch, rank=3, world=8, local_rank=3, local_world=4, **more) -> None:
    """The variables torchrun sets for one worker."""
    values = dict(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=local_rank, LOCAL_WORLD_SIZE=local_world)
    for name, value in {**values, **more}.items():
        monkeypatch.setenv(name, str(value))


# ------------------------------------------------------------------ rank_info


def test_a_lone_process_is_no_rank():
    assert rank_info() is None
    assert store_parent("/nvme/spill") == Path("/nvme/spill")


def test_torchrun_variables_give_the_rank(monkeypatch):
    torchrun(monkeypatch, TORCHELASTIC_RUN_ID="3f2a-job")
    assert rank_info() == RankInfo(
        rank=3, world_size=8, local_rank=3, local_world_size=4, run_id="3f2a-job"
    )


def test_rank_and_world_size_alone_put_every_rank_on_this_node(monkeypatch):
    """Without LOCAL_WORLD_SIZE the safe guess: all ranks share this node's budgets."""
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "6")
    info = rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 6, 5, 6)


def test_local_variables_alone_are_a_one_node_job(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    info = rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (1, 2, 1, 2)


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("RANK", "")
    monkeypatch.setenv("LOCAL_RANK", " ")
    assert rank_info() is None


@pytest.mark.parametrize(
    ("name", "text", "least"),
    [
        ("RANK", "x", 0),
        ("RANK", "-1", 0),
        ("WORLD_SIZE", "0", 1),
        ("WORLD_SIZE", "8 ranks", 1),
        ("LOCAL_RANK", "1.5", 0),
        ("LOCAL_WORLD_SIZE", "0", 1),
    ],
)
def test_a_malformed_variable_names_itself_and_the_fix(monkeypatch, name, text, least):
    torchrun(monkeypatch)
    monkeypatch.setenv(name, text)
    with pytest.raises(ConfigError, match=rf"^{name}={text!r}: expected a whole number, {least}"):
        rank_info()
    with pytest.raises(ConfigError, match="unset it outside a torchrun job"):
        process_budgets(CacheConfig())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (dict(rank=8, world=8), r"RANK \(8\) must be below WORLD_SIZE \(8\)"),
        (dict(local_rank=4, local_world=4), r"LOCAL_RANK \(4\) must be below LOCAL_WORLD_SIZE"),
        (dict(local_world=16), r"LOCAL_WORLD_SIZE \(16\) is larger than the job's WORLD_SIZE"),
    ],
)
def test_inconsistent_variables_are_an_error(monkeypatch, values, message):
    torchrun(monkeypatch, **values)
    with pytest.raises(ConfigError, match=message):
        rank_info()


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (dict(RANK="0"), "RANK is set but WORLD_SIZE is not"),
        (dict(WORLD_SIZE="2"), "WORLD_SIZE is set but RANK is not"),
        (dict(LOCAL_RANK="0"), "LOCAL_RANK is set but LOCAL_WORLD_SIZE is not"),
        (dict(RANK="0", LOCAL_WORLD_SIZE="2"), "RANK is set but WORLD_SIZE is not"),
    ],
)
def test_half_a_pair_is_an_error_saying_what_to_set(monkeypatch, given, message):
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{message}: .*set both, as torchrun does"):
        rank_info()


def test_an_initialised_process_group_gives_rank_and_world_without_collectives(monkeypatch):
    """torch.distributed's own rank and size win over stale variables; LOCAL_WORLD_SIZE
    still says how many ranks share the node. No collective may be called."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 6)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 16)

    def collective(*args, **kwargs):
        raise AssertionError("spillcache must never call a collective")

    for name in ("barrier", "all_reduce", "broadcast", "all_gather", "all_gather_object",
                 "broadcast_object_list", "monitored_barrier"):  # fmt: skip
        monkeypatch.setattr(dist, name, collective)
    assert rank_info().rank == 6 and rank_info().local_world_size == 16  # all here: safe guess
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    info = rank_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (6, 16, 6, 8)
    assert process_budgets(CacheConfig(host_bytes="64GiB")).host_bytes == 8 * GiB


def test_a_real_process_group(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1
    )
    try:
        assert rank_info() == RankInfo(0, 1, 0, 1, run_id())
    finally:
        dist.destroy_process_group()
    assert rank_info() is None


# ------------------------------------------------------------------ budgets

CONFIG = CacheConfig(
    host_bytes="64GiB", device_bytes="20GiB", disk_bytes="800GiB",
    write_behind_bytes="1GiB", read_buffer_bytes="512MiB",
)  # fmt: skip


def test_auto_host_bytes_is_this_rank_share_of_half_the_ram(monkeypatch):
    ram = 256 * GiB
    alone = process_budgets(CacheConfig(), ram_available=ram).host_bytes
    assert alone == 128 * GiB
    torchrun(monkeypatch, local_world=4)
    assert process_budgets(CacheConfig(), ram_available=ram).host_bytes == alone // 4
    # "auto" is the node's RAM whatever the scope says.
    rank_scope = CacheConfig(budget_scope="rank")
    assert process_budgets(rank_scope, ram_available=ram).host_bytes == alone // 4


def test_auto_host_bytes_with_almost_no_ram_available_is_refused_not_unbounded(monkeypatch):
    # Half of nothing is 0, which maps no region: values in transit would take ordinary
    # memory without bound, the opposite of what "auto" promises.
    with pytest.raises(ConfigError, match=r'host_bytes "auto" .* 1\.5 MiB .* set host_bytes'):
        process_budgets(CacheConfig(), ram_available=3 * MiB // 2)
    torchrun(monkeypatch, local_world=8)
    with pytest.raises(ConfigError, match=r"shared by 8 rank\(s\)"):
        process_budgets(CacheConfig(), ram_available=8 * MiB)
    assert process_budgets(CacheConfig(), ram_available=16 * MiB).host_bytes == MiB


def test_write_behind_and_reads_are_parts_of_host_bytes_and_the_tier_holds_the_rest(monkeypatch):
    budgets = process_budgets(CacheConfig(host_bytes="1GiB"))
    # "auto": an eighth of host_bytes each.
    assert (budgets.write_behind_bytes, budgets.read_buffer_bytes) == (128 * MiB, 128 * MiB)
    assert budgets.host_tier_bytes == 768 * MiB
    # ... at most 512 MiB each.
    big = process_budgets(CacheConfig(host_bytes="64GiB"))
    assert big.write_behind_bytes == big.read_buffer_bytes == 512 * MiB
    assert big.host_tier_bytes == 63 * GiB
    # Explicit parts are taken as written.
    parts = process_budgets(CacheConfig(host_bytes="1GiB", write_behind_bytes="300MiB"))
    assert (parts.write_behind_bytes, parts.host_tier_bytes) == (300 * MiB, 596 * MiB)
    # Under torchrun "auto" parts come from the rank's share of host_bytes.
    torchrun(monkeypatch, local_world=4)
    shared = process_budgets(CacheConfig(host_bytes="4GiB"))
    assert (shared.host_bytes, shared.write_behind_bytes) == (GiB, 128 * MiB)


def test_no_region_keeps_the_old_transit_sizes_and_no_host_tier():
    budgets = process_budgets(CacheConfig(host_bytes=0))
    assert (budgets.write_behind_bytes, budgets.read_buffer_bytes) == (256 * MiB, 256 * MiB)
    assert budgets.host_tier_bytes == 0


def test_parts_larger_than_host_bytes_are_refused_naming_all_three():
    config = CacheConfig(host_bytes="1GiB", write_behind_bytes="768MiB", read_buffer_bytes="512MiB")
    with pytest.raises(
        ConfigError,
        match=r"write_behind_bytes \(768\.0 MiB\) and read_buffer_"
        r"bytes \(512\.0 MiB\) are parts of host_bytes \(1\.0 GiB\)",
    ):
        process_budgets(config)


def test_auto_host_bytes_measures_the_ram_when_not_given(monkeypatch):
    monkeypatch.setattr(resolved, "available_ram", lambda: 16 * GiB)
    torchrun(monkeypatch, local_rank=1, local_world=2)
    assert process_budgets(CacheConfig()).host_bytes == 4 * GiB


def test_node_scope_divides_the_node_sizes_among_its_ranks(monkeypatch):
    """host_bytes = 64GiB with 8 ranks on the node: the node holds 64 GiB, 8 per rank."""
    torchrun(monkeypatch, rank=11, world=16, local_rank=3, local_world=8)
    budgets = process_budgets(CONFIG)
    assert budgets.host_bytes == 8 * GiB and budgets.disk_bytes == 100 * GiB
    assert budgets.write_behind_bytes == 128 * 2**20
    assert budgets.read_buffer_bytes == 64 * 2**20
    assert budgets.device_bytes == 20 * GiB, "each rank has its own GPU"
    assert budgets.shares == 8
    assert CONFIG.host_bytes == 64 * GiB, "the config itself is unchanged"


def test_rank_scope_gives_each_rank_the_sizes_as_written(monkeypatch):
    torchrun(monkeypatch, local_world=8)
    budgets = process_budgets(CONFIG.replace(budget_scope="rank"))
    assert (budgets.host_bytes, budgets.disk_bytes) == (64 * GiB, 800 * GiB)
    assert (budgets.write_behind_bytes, budgets.read_buffer_bytes) == (GiB, 512 * 2**20)
    assert budgets.shares == 1


def test_outside_torchrun_nothing_is_divided():
    budgets = process_budgets(CONFIG, ram_available=GiB)
    assert (budgets.host_bytes, budgets.disk_bytes, budgets.shares) == (64 * GiB, 800 * GiB, 1)
    assert process_budgets(CacheConfig(), ram_available=GiB).disk_bytes is None


def test_budget_scope_is_a_checked_setting(tmp_path):
    assert CacheConfig().budget_scope == "node"
    assert CacheConfig(budget_scope=" Rank ").budget_scope == "rank"
    assert CacheConfig.from_env({"SPILLCACHE_BUDGET_SCOPE": "rank"}).budget_scope == "rank"
    (tmp_path / "spill.toml").write_text('budget_scope = "rank"\n')
    assert CacheConfig.from_file(tmp_path / "spill.toml").budget_scope == "rank"
    with pytest.raises(ConfigError, match="^budget_scope: unknown scope 'gpu'; choose one of"):
        CacheConfig(budget_scope="gpu")


# ------------------------------------------------------------------ runs and their directories


def test_run_id_is_torchelastic_run_id_made_safe():
    assert run_id({"TORCHELASTIC_RUN_ID": "5c1e-77"}) == "5c1e-77"
    for hostile in ("../../etc", "a/../b", "..", "/", ".hidden", "-rf", "x" * 300):
        name = run_id({"TORCHELASTIC_RUN_ID": hostile})
        assert name and "/" not in name and ".." not in name and len(name) <= 100, name
        assert not name.startswith((".", "-")), name
        assert Path("/d", name).parent == Path("/d")


def test_without_a_run_id_the_job_is_named_by_its_master_and_launcher(monkeypatch):
    """torchrun's default run id ("none") names nothing: the master's address and port
    (the job's) and the parent pid (torchrun's agent, the same for every local rank)."""
    job = {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29500"}
    monkeypatch.setattr(os, "getppid", lambda: 4242)
    assert run_id(job) == run_id({**job, "TORCHELASTIC_RUN_ID": ""}) == "job-10.1.2.3-29500-p4242"
    monkeypatch.setattr(os, "getppid", lambda: 4343)
    assert run_id(job) == "job-10.1.2.3-29500-p4343", "another launcher is another run"
    assert run_id({}) == "job-p4343"


def test_store_parent_is_the_rank_directory_of_the_run(monkeypatch):
    torchrun(monkeypatch, rank=11, world=16, TORCHELASTIC_RUN_ID="nightly/../x")
    assert store_parent("/nvme/spill") == Path("/nvme/spill/nightly_._x/rank11")


AGREE = textwrap.dedent(
    """
    import sys
    from spillcache._internal.process.resolved import store_parent
    print(store_parent(sys.argv[1]))
    """
)


def test_two_ranks_agree_on_their_run_directory_without_talking(tmp_path):
    """Two workers started by one launcher, torchrun's default run id: the same run."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN + JOB}
    job = dict(base, WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29555", TORCHELASTIC_RUN_ID="none")  # fmt: skip
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", AGREE, str(tmp_path)],
            env=dict(job, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for rank in range(2)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), outputs
    parents = [Path(out.strip()) for out, _ in outputs]
    assert [parent.name for parent in parents] == ["rank0", "rank1"]
    assert parents[0].parent == parents[1].parent
    assert parents[0].parent.parent == tmp_path
    assert parents[0].parent.name == f"job-127.0.0.1-29555-p{os.getpid()}"


# ------------------------------------------------------------------ format: run directories


def make_run(root: Path, name: str = "job", ranks_: tuple[int, ...] = (0, 1)) -> Path:
    for rank in ranks_:
        store_dirs.run_store_parent(root, name, rank).mkdir(parents=True)
    return root / name


def test_run_directories_are_found_under_a_directory_and_as_one(tmp_path):
    run = make_run(tmp_path, ranks_=(0, 1, 10))
    (tmp_path / "other" / "rank0").mkdir(parents=True)
    (tmp_path / "other" / "notes.txt").write_text("not a run: it holds more than ranks")
    (tmp_path / "empty").mkdir()
    expected = {0: run / "rank0", 1: run / "rank1", 10: run / "rank10"}
    assert store_dirs.find_runs(tmp_path) == {run: expected}
    assert store_dirs.find_runs(run) == {run: expected}
    assert store_dirs.rank_dirs(tmp_path / "other") == {}
    assert store_dirs.rank_dirs(tmp_path / "empty") == {}
    assert store_dirs.rank_dirs(tmp_path / "absent") == {}
    (run / "rank01").mkdir()  # not a name spillcache makes
    assert store_dirs.find_runs(tmp_path) == {}


def test_remove_empty_dirs_stops_at_anything_held_and_at_stop(tmp_path):
    run = make_run(tmp_path)
    (run / "rank1" / "spillcache-1-abc").mkdir()
    assert store_dirs.remove_empty_dirs(run / "rank0", stop=tmp_path) == [run / "rank0"]
    assert store_dirs.remove_empty_dirs(run / "rank1", stop=tmp_path) == []
    (run / "rank1" / "spillcache-1-abc").rmdir()
    assert store_dirs.remove_empty_dirs(run / "rank1", stop=tmp_path) == [run / "rank1", run]
    assert tmp_path.is_dir(), "stop itself is never removed"
    assert store_dirs.remove_empty_dirs(tmp_path / "x", stop=tmp_path / "x") == []


def test_a_store_is_made_even_if_its_emptied_rank_directory_is_removed_meanwhile(
    tmp_path, monkeypatch
):
    """gc (or another rank) may rmdir an empty rank directory between Store.create
    making it and making the store inside it: the directory is made again."""
    parent = store_dirs.run_store_parent(tmp_path, "job", 0)
    real_mkdir, raced = Path.mkdir, []

    def mkdir(self, mode=0o777, parents=False, exist_ok=False):
        if self.name.startswith("spillcache-") and not raced:
            raced.append(self)
            store_dirs.remove_empty_dirs(self.parent, stop=tmp_path)
        return real_mkdir(self, mode, parents, exist_ok)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    try:
        store = tensor_store.Store.create(parent)
    except StoreError as error:  # pragma: no cover - the failure this test guards against
        pytest.fail(f"Store.create lost the race: {error}")
    assert raced and store.path.parent == parent and store.path.is_dir()
    store.remove()
