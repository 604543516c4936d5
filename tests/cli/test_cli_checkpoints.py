"""``spillcache du``, ``inspect`` and ``gc`` on a calibration's checkpoint_dir: they show
what each checkpoint holds and how far it got, and gc never removes one."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from spill_testing import run_preloaded_python
from spillcache.cli import main

# Made by a process that ends without closing its caches, as a killed calibration
# does: one process's checkpoint_dir (2 of 5 subgraphs done, one state file), and a
# torchrun job's (2 ranks, its stores under activations/<run>/rank<R>/).
MAKER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    import torch
    from spillcache import CacheConfig, IntermediatesCache
    from spillcache._internal.store import checkpoints
    from spillcache._internal.store.checkpoints import NOTE_KEY, Checkpoint, Part

    def checkpoint(directory, rank=None):
        part = Part(Path(directory), rank)
        state = checkpoints.save_states(part, 1, {"w": torch.ones(256)})
        config = CacheConfig(host_bytes=0, disk_path=str(part.activations), keep_store=True)
        cache = IntermediatesCache.empty(1, "cpu", config=config)
        cache.update(0, {"h": torch.ones(64, 64)})
        cache._core.flush(note={NOTE_KEY: Checkpoint.note("f", {}, 2, 5, [state])})
        return cache

    kept = [checkpoint(sys.argv[1])]
    for rank in range(2):
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", TORCHELASTIC_RUN_ID="job7")
        kept.append(checkpoint(sys.argv[2], rank))
    os._exit(0)  # no close: the stores stay as the flushes left them
    """
)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    one, job = root / "one", root / "job"
    done = run_preloaded_python("-c", MAKER, str(one), str(job))
    assert done.returncode == 0, done.stderr
    return one, job


def stores(directory: Path) -> list[Path]:
    return sorted(directory.glob("activations/**/spillcache-*"))


def test_du_of_a_checkpoint_dir_says_how_far_each_checkpoint_got(made, capsys):
    one, job = made
    assert main(["du", str(one)]) == 0
    out = capsys.readouterr().out
    assert str(stores(one)[0]) in out
    assert "checkpoint, 2 of 5 subgraphs done (1 state files" in out
    assert main(["du", str(one), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["checkpoint"]["subgraphs_done"] == 2 and row["checkpoint"]["state_files"] == 1
    assert (
        row["checkpoint"]["checkpoint_dir"] == str(one) and row["checkpoint"]["state_bytes"] > 1024
    )
    assert main(["du", str(job)]) == 0
    out = capsys.readouterr().out
    assert "(2 ranks)" in out and out.count("checkpoint, 2 of 5 subgraphs done") == 2


def test_inspect_says_how_to_resume_or_start_afresh(made, capsys):
    one, _ = made
    assert main(["inspect", str(stores(one)[0])]) == 0
    out = capsys.readouterr().out
    assert "checkpoint  2 of 5 subgraphs done" in out
    assert f"the same script with checkpoint_dir {one} resumes it" in out


def test_gc_never_removes_a_checkpoint(made, capsys):
    one, job = made
    before = stores(one) + stores(job)
    assert len(before) == 3
    for directory in (one, job, one / "activations"):
        assert main(["gc", str(directory), "--all", "--yes"]) == 0
        out = capsys.readouterr().out
        assert "kept " in out and "a calibration's checkpoint, 2 of 5 subgraphs done" in out
        assert "removing that directory drops it" in out
    assert stores(one) + stores(job) == before
