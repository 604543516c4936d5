"""A data-parallel oneshot (2 gloo ranks under torchrun) killed with SIGKILL resumes
from its checkpoint_dir on both ranks, from the same subgraph, with the weights of an
uninterrupted run bit for bit (made by the ranks of the killed launch before the run
they kill, ``--reference``; for the slow test, by a launch of its own).

The ranks run ``ddp_resume_worker.py``: GPTQ over their halves of the samples, waiting
for each other after each layer's compression (``gptq_barrier``), which makes two
uninterrupted runs give the same weights (``test_ddp_oneshot.py`` explains why
llm-compressor's own DDP path does not). The kills are counted, never timed:

- rank 1 dies about to commit subgraph 3's checkpoint once rank 0 has committed its
  own, so rank 0's part is one checkpoint ahead: the rerun takes rank 0 back to the
  checkpoint before, and both go on with subgraph 3;
- (slow) every rank dies as subgraph 3 begins; torchrun stops a rank that had not got
  there, maybe inside its checkpoint: both resume from the same subgraph, whichever.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from spillcache._internal.store import checkpoints  # noqa: E402

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("ddp_resume_worker.py")
WORLD = 2
SUBGRAPHS = 5
TIMEOUT_S = 240  # about 10 s a launch on 2 cores; a hung rank fails the test here
RESUMED = re.compile(r"(\d+) of 5 subgraphs done, going on with subgraph (\d+)")


def launch(
    work: Path, checkpoint_dir: Path, out: Path, *options: str
) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(WORLD), str(WORKER), str(checkpoint_dir), str(work), str(out),
        *options,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    log = out.with_suffix(".log")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Output to a file, not a pipe: torchrun starts each rank in a session of its own,
    # and a rank left behind would hold a pipe open.
    with open(log, "w") as sink:
        finished = subprocess.run(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, timeout=TIMEOUT_S
        )
    return subprocess.CompletedProcess(command, finished.returncode, log.read_text(), "")


def records(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("ddp-resume")
    run = launch(root, root / "ckpt", root / "out")
    assert run.returncode == 0, run.stdout[-6000:]
    return records(root / "out")


def uninterrupted_before(reference: Path) -> list[dict]:
    """The records of the uninterrupted run a launch with ``--reference reference``
    made before its killed run (in the same processes: one launch, one import of
    llm-compressor per rank, for both)."""
    found = records(reference / "out")
    assert not (reference / "ckpt").exists()  # it finished: its checkpoint went with it
    return found


def resumed_from(record: dict) -> tuple[int, int]:
    """(subgraphs done, the one it went on with), from what the rank's run said."""
    found = [RESUMED.search(line) for line in record["said"]]
    (match,) = [m for m in found if m]
    return int(match.group(1)), int(match.group(2))


def calibrated(record: dict) -> list[int]:
    """The subgraphs whose calibrating pass this rank's progress bars announced."""
    return [
        int(line.split("(")[1].split("/")[0])
        for line in record["said"]
        if line.startswith("progress") and line.endswith("Calibrating")
    ]


def assert_resumed(
    tmp_path: Path, uninterrupted: list[dict], done: int | None, *options: str
) -> None:
    """Run again (with the worker's ``options``): every rank resumes from the same
    subgraph (``done`` if given) and finishes with the uninterrupted run's weights;
    nothing of the checkpoint stays."""
    run = launch(tmp_path, tmp_path / "ckpt", tmp_path / "out", *options)
    assert run.returncode == 0, run.stdout[-6000:]
    ranks = records(tmp_path / "out")
    points = {resumed_from(record) for record in ranks}
    assert len(points) == 1, points  # the same subgraph on every rank
    ((got, going_on),) = points
    assert going_on == got + 1 and (done is None or got == done), points
    for record, reference in zip(ranks, uninterrupted, strict=True):
        assert calibrated(record) == list(range(got + 1, SUBGRAPHS + 1))
        assert record["weights"] == reference["weights"], f"rank {record['rank']}"
    assert not (tmp_path / "ckpt").exists()
    assert list((tmp_path / "spill").iterdir()) == []


def test_a_rank_one_checkpoint_ahead_goes_back_and_both_resume(tmp_path):
    killed = launch(
        tmp_path, tmp_path / "ckpt", tmp_path / "killed",
        "--kill-in-checkpoint", "3", "--kill-rank", "1", "--reference", str(tmp_path / "ref"),
    )  # fmt: skip
    assert killed.returncode != 0 and "rank 1: killing before the commit" in killed.stdout
    uninterrupted = uninterrupted_before(tmp_path / "ref")
    parts = [checkpoints.committed(checkpoints.Part(tmp_path / "ckpt", r)) for r in (0, 1)]
    assert [part.done for part in parts] == [3, 2]  # rank 0 committed, rank 1 did not

    # A copy with rank 1's first state file damaged: found as rank 1 loads its part,
    # after the ranks agreed; every rank's oneshot stops with an error naming it (none
    # hangs). Run from the copy first by the launch that then resumes.
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "ckpt", damaged / "ckpt", symlinks=True)
    state = damaged / "ckpt" / "states" / "rank1" / "0001.pt"
    state.write_bytes(state.read_bytes()[:-1])

    assert_resumed(tmp_path, uninterrupted, 2, "--refused", str(damaged / "ckpt"))
    raised = [
        json.loads((damaged / "ckpt" / "refusal" / f"rank{rank}.json").read_text())["raised"]
        for rank in range(WORLD)
    ]
    assert all(raised), raised
    assert raised[0].startswith("CheckpointError: rank 1 of 2 could not get ready: CheckpointError")
    assert raised[1].startswith("CheckpointError: ") and "0001.pt holds" in raised[1]
    # What rank 0 said as it resumed (not as it was refused: that went back too).
    said = records(tmp_path / "out")[0]["said"]
    assert any("rank 0 got further than another rank before the run ended" in s for s in said)


@pytest.mark.slow
def test_ranks_killed_as_subgraph_3_begins_resume_from_the_same_subgraph(tmp_path, uninterrupted):
    killed = launch(tmp_path, tmp_path / "ckpt", tmp_path / "killed", "--kill-subgraph", "3")
    assert killed.returncode != 0, killed.stdout[-6000:]
    assert "killing at subgraph 3" in killed.stdout
    assert_resumed(tmp_path, uninterrupted, done=None)
