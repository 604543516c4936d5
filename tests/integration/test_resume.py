"""A oneshot killed with SIGKILL resumes from its checkpoint_dir: same weights, bit for bit.

Each run is a child process (resume_child.py) that kills itself at a forward call
counted from the subgraphs' calls (never by timing): as subgraph 3 of 5 begins, in the
middle of a calibrating pass and of a propagating pass. The same command run again with
the same checkpoint_dir must finish with the weights of an uninterrupted run with
llm-compressor's own cache, without calibrating the committed subgraphs again, and
leave no activation store and no checkpoint behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

import torch  # noqa: E402

from spill_testing import assert_same  # noqa: E402
from spillcache import CheckpointError  # noqa: E402
from spillcache._internal import checkpoints  # noqa: E402
from spillcache._internal.checkpoints import Part  # noqa: E402
from tiny_llama import RECIPES, calibrate, stock_pin_memory_without_accelerator  # noqa: E402

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("resume_child.py")
LAYERS = 4  # 5 subgraphs: 4 decoder layers and the head


@pytest.fixture(scope="module")
def stock_weights(tmp_path_factory):
    """The reference: each recipe's uninterrupted run with llm-compressor's own cache."""
    weights = {}
    for name, recipe in RECIPES.items():
        with stock_pin_memory_without_accelerator():
            weights[name] = calibrate(
                tmp_path_factory.mktemp(name), recipe(), prefetch=False, layers=LAYERS
            )
    return weights


def run_child(work: Path, *options: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(CHILD), str(work / "ckpt"), str(work / "spill"),
         str(work / "weights.pt"), "--layers", str(LAYERS), *options],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def progress_labels(output: str, pass_name: str) -> list[int]:
    """The subgraphs llm-compressor's progress bars announced for a pass."""
    found = set()
    for number in range(1, LAYERS + 2):
        if f"({number}/{LAYERS + 1}): {pass_name}" in output:
            found.add(number)
    return sorted(found)


@pytest.mark.parametrize(
    ("recipe", "kill_pass", "kill_batch"),
    [
        ("gptq", "calibrating", 1),
        pytest.param("gptq", "calibrating", 9, marks=pytest.mark.slow),
        ("gptq", "propagating", 5),
        ("awq", "calibrating", 9),
        pytest.param("awq", "propagating", 3, marks=pytest.mark.slow),
    ],
    ids=[
        "gptq-subgraph-3-begins", "gptq-mid-calibrating", "gptq-mid-propagating",
        "awq-mid-calibrating", "awq-mid-propagating",
    ],
)  # fmt: skip
def test_a_killed_oneshot_resumes_with_the_stock_weights(
    recipe, kill_pass, kill_batch, stock_weights, tmp_path
):
    (tmp_path / "spill").mkdir()
    killed = run_child(
        tmp_path, "--recipe", recipe, "--kill-subgraph", "3", "--kill-pass", kill_pass,
        "--kill-batch", str(kill_batch),
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    found = checkpoints.committed(Part(tmp_path / "ckpt"))
    assert found is not None and found.done == 2 and found.subgraphs == LAYERS + 1

    resumed = run_child(tmp_path, "--recipe", recipe)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "resuming from checkpoint_dir" in output and "2 of 5 subgraphs done" in output
    # The committed subgraphs are not calibrated again; the rest are, in order.
    assert progress_labels(output, "Calibrating") == [3, 4, 5]
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    reference = stock_weights[recipe]
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert_same(weights[name], tensor)
    assert not (tmp_path / "ckpt").exists()  # the checkpoint went with the finished run
    assert list((tmp_path / "spill").iterdir()) == []


@pytest.mark.parametrize("step", ["states", pytest.param("commit", marks=pytest.mark.slow)])
def test_a_checkpoint_cut_short_resumes_from_the_one_before(step, stock_weights, tmp_path):
    """Killed inside subgraph 3's checkpoint (its state file written, or its commit
    about to be written): the rerun resumes after subgraph 2, drops the state file no
    commit names, and finishes with the stock weights."""
    (tmp_path / "spill").mkdir()
    killed = run_child(tmp_path, "--kill-in-checkpoint", "3", "--kill-step", step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "ckpt" / "states" / "0002.pt").exists()  # written, not committed
    found = checkpoints.committed(Part(tmp_path / "ckpt"))
    assert found is not None and found.done == 2
    resumed = run_child(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert progress_labels(resumed.stdout + resumed.stderr, "Calibrating") == [3, 4, 5]
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    for name, tensor in stock_weights["gptq"].items():
        assert_same(weights[name], tensor)
    assert not (tmp_path / "ckpt").exists()


def test_without_error_propagation_a_killed_oneshot_resumes_with_the_stock_weights(tmp_path):
    """propagate_error off: each subgraph's outputs are cached in its calibrating pass
    (no propagating pass), and the checkpoint follows that pass."""
    with stock_pin_memory_without_accelerator():
        reference = calibrate(
            tmp_path / "stock", RECIPES["gptq"](), prefetch=False, layers=LAYERS,
            propagate_error=False,
        )  # fmt: skip
    (tmp_path / "spill").mkdir()
    killed = run_child(
        tmp_path, "--no-propagate-error", "--kill-subgraph", "3", "--kill-batch", "9"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = run_child(tmp_path, "--no-propagate-error")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert progress_labels(output, "Calibrating") == [3, 4, 5]
    assert progress_labels(output, "Propagating") == []
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    for name, tensor in reference.items():
        assert_same(weights[name], tensor)
    assert not (tmp_path / "ckpt").exists()


def test_a_run_ended_by_an_exception_keeps_only_its_checkpoint(stock_weights, tmp_path):
    """An exception in the middle of subgraph 3's propagating pass unwinds through the
    pipeline and the interpreter's exit, which close the activation store: it stays as
    subgraph 2's checkpoint left it (not with the half-propagated values), and the
    rerun finishes with the stock weights."""
    (tmp_path / "spill").mkdir()
    failed = run_child(
        tmp_path, "--kill-subgraph", "3", "--kill-pass", "propagating", "--kill-batch", "9",
        "--raise-instead",
    )  # fmt: skip
    assert failed.returncode == 1 and "RuntimeError: injected at subgraph 3" in failed.stderr
    found = checkpoints.committed(Part(tmp_path / "ckpt"))
    assert found is not None and found.done == 2
    resumed = run_child(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert progress_labels(resumed.stdout + resumed.stderr, "Calibrating") == [3, 4, 5]
    weights = torch.load(tmp_path / "weights.pt", weights_only=True)
    for name, tensor in stock_weights["gptq"].items():
        assert_same(weights[name], tensor)
    assert not (tmp_path / "ckpt").exists()


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    (tmp_path / "spill").mkdir()
    killed = run_child(tmp_path, "--kill-subgraph", "2", "--kill-batch", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    other = run_child(tmp_path, "--recipe", "awq")
    assert other.returncode != 0
    assert "CheckpointError" in other.stderr
    assert "holds a checkpoint of another calibration" in other.stderr
    assert "recipe" in other.stderr and "remove that directory" in other.stderr
    found = checkpoints.committed(Part(tmp_path / "ckpt"))
    assert found is not None and found.done == 1  # the refusal changed nothing


def test_a_damaged_state_file_is_refused_and_nothing_is_loaded(tmp_path):
    (tmp_path / "spill").mkdir()
    killed = run_child(tmp_path, "--kill-subgraph", "3", "--kill-batch", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = tmp_path / "ckpt" / "states" / "0001.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    resumed = run_child(tmp_path)
    assert resumed.returncode != 0
    assert "is damaged" in resumed.stderr and "0001.pt" in resumed.stderr
    assert "does not match its CRC-32C" in resumed.stderr
    with pytest.raises(CheckpointError, match="does not match its CRC-32C"):
        part = Part(tmp_path / "ckpt")
        checkpoints.check_states(part, checkpoints.committed(part))
