"""A oneshot killed with SIGKILL resumes from its checkpoint_dir: same weights, bit for bit.

Each killed run is a child process (resume_child.py, forked from a process that
imported llm-compressor already: preloaded.py) that kills itself at a forward call
counted from the subgraphs' calls (never by timing): as subgraph 3 of 5 begins, in
the middle of a calibrating pass and of a propagating pass. The same run made again
with the same checkpoint_dir must finish with the weights of an uninterrupted run with
llm-compressor's own cache, without calibrating the committed subgraphs again, and
leave no activation store and no checkpoint behind. That run is resume_child.py's own
(``checkpointed_run``), made in this process: llm-compressor is imported here already,
and a child would spend most of its time importing it again. Runs ended by an exception
rather than a kill (a model offloaded to disk) are made in this process too.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

import preloaded  # noqa: E402
from spill_testing import assert_same, bits, progress_spies  # noqa: E402
from spillcache import CheckpointError  # noqa: E402
from spillcache._internal.store import checkpoints  # noqa: E402
from spillcache._internal.store.checkpoints import Part  # noqa: E402
from tiny_llama import RECIPES, calibrate, stock_pin_memory_without_accelerator  # noqa: E402

pytestmark = pytest.mark.integration

CHILD = Path(__file__).with_name("resume_child.py")
LAYERS = 4  # 5 subgraphs: 4 decoder layers and the head


class StockWeights(dict):
    """The reference: a recipe's uninterrupted run with llm-compressor's own cache, run
    the first time a test asks for it."""

    def __init__(self, tmp_path_factory) -> None:
        super().__init__()
        self.tmp_path_factory = tmp_path_factory

    def __missing__(self, name: str) -> dict:
        with stock_pin_memory_without_accelerator():
            self[name] = calibrate(
                self.tmp_path_factory.mktemp(name), RECIPES[name](), prefetch=False,
                layers=LAYERS,
            )  # fmt: skip
        return self[name]


@pytest.fixture(scope="module")
def stock_weights(tmp_path_factory) -> StockWeights:
    return StockWeights(tmp_path_factory)


def child_module():
    """resume_child.py as a module (its ``checkpointed_run`` and nothing else is used)."""
    spec = importlib.util.spec_from_file_location("resume_child", CHILD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


checkpointed_run = child_module().checkpointed_run


# What resume_child.py imports, and what its run imports as it goes: imported once, by
# the process its runs are forked from (preloaded.py), rather than for 8 s in each.
CHILD_MODULES = (
    "tiny_llama", "llmcompressor", "llmcompressor.pipelines.sequential.helpers",
    "llmcompressor.pipelines.sequential.pipeline", "llmcompressor.modifiers.quantization",
    "llmcompressor.modifiers.transform.awq", "llmcompressor.modeling.moe.gpt_oss",
    "compressed_tensors.linear.compressed_linear", "transformers.models.llama.modeling_llama",
    "transformers.models.gpt_oss.modeling_gpt_oss", "torch.utils.serialization",
    "multiprocessing.synchronize", "spillcache.integrations.llmcompressor",
    "spillcache._internal.llmcompressor.resumable_pipeline",
)  # fmt: skip


def run_child(work: Path, *options: str) -> subprocess.CompletedProcess:
    """resume_child.py run with ``options``, as a process of its own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return preloaded.run(
        [CHILD, str(work / "ckpt"), str(work / "spill"), str(work / "weights.pt"),
         "--layers", str(LAYERS), *options],
        preload=CHILD_MODULES, env=env, timeout=300,
    )  # fmt: skip


def resume_here(
    work: Path, *, recipe: str = "gptq", propagate_error: bool = True
) -> tuple[dict, str]:
    """The run ``run_child(work, ...)`` makes when nothing kills it, made in this
    process: its weights, and what it said (each progress bar's title, as
    ``progress <title>``, and every line spillcache logged)."""
    said: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        for module, name, spy in progress_spies(said):
            patch.setattr(module, name, spy)
        weights = checkpointed_run(
            work / "ckpt", work / "spill", work / "weights.pt", recipe=recipe, layers=LAYERS,
            propagate_error=propagate_error,
        )  # fmt: skip
    return weights, "\n".join(said)


def progress_labels(output: str, pass_name: str) -> list[int]:
    """The subgraphs llm-compressor's progress bars announced for a pass."""
    found = set()
    for number in range(1, LAYERS + 2):
        if f"({number}/{LAYERS + 1}): {pass_name}" in output:
            found.add(number)
    return sorted(found)


def assert_resumes_with_stock_weights(tmp_path: Path, stock: dict, done: int) -> None:
    found = checkpoints.committed(Part(tmp_path / "ckpt"))
    assert found is not None and found.done == done
    weights, output = resume_here(tmp_path)
    labels = progress_labels(output, "Calibrating")
    assert labels == list(range(done + 1, LAYERS + 2))
    for name, tensor in stock.items():
        assert_same(weights[name], tensor)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    ("recipe", "kill_pass", "kill_batch"),
    [
        ("gptq", "calibrating", 1),
        pytest.param("gptq", "calibrating", 9, marks=pytest.mark.slow),
        # Killed mid-propagating: the exception test and the torchrun test cover it.
        pytest.param("gptq", "propagating", 5, marks=pytest.mark.slow),
        pytest.param("awq", "calibrating", 1, marks=pytest.mark.slow),
        ("awq", "calibrating", 9),
        pytest.param("awq", "propagating", 3, marks=pytest.mark.slow),
        pytest.param("awq+gptq", "propagating", 5, marks=pytest.mark.slow),
    ],
    ids=[
        "gptq-subgraph-3-begins", "gptq-mid-calibrating", "gptq-mid-propagating",
        "awq-subgraph-3-begins", "awq-mid-calibrating", "awq-mid-propagating",
        "awq+gptq-mid-propagating",
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

    weights, output = resume_here(tmp_path, recipe=recipe)
    assert "resuming from checkpoint_dir" in output and "2 of 5 subgraphs done" in output
    # The committed subgraphs are not calibrated again; the rest are, in order.
    assert progress_labels(output, "Calibrating") == [3, 4, 5]
    reference = stock_weights[recipe]
    assert weights.keys() == reference.keys()
    for name, tensor in reference.items():
        assert_same(weights[name], tensor)
    assert not (tmp_path / "ckpt").exists()  # the checkpoint went with the finished run
    assert list((tmp_path / "spill").iterdir()) == []


# Slow: the system-call kill at call 30 (after the state file) covers both by default.
@pytest.mark.parametrize("step", ["states", "commit"])
@pytest.mark.slow
def test_a_checkpoint_cut_short_resumes_from_the_one_before(step, stock_weights, tmp_path):
    """Killed inside subgraph 3's checkpoint (its state file written, or its commit
    about to be written): the rerun resumes after subgraph 2, drops the state file no
    commit names, and finishes with the stock weights."""
    (tmp_path / "spill").mkdir()
    killed = run_child(tmp_path, "--kill-in-checkpoint", "3", "--kill-step", step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (tmp_path / "ckpt" / "states" / "0002.pt").exists()  # written, not committed
    assert_resumes_with_stock_weights(tmp_path, stock_weights["gptq"], done=2)


def killed_at_call(tmp_path: Path, number: int) -> str:
    """A run killed just before the ``number``-th system call of subgraph 3's
    checkpoint (resume_child.kill_at_call); what it printed."""
    killed = run_child(
        tmp_path, "--kill-in-checkpoint", "3", "--kill-step", "call", "--kill-call", str(number)
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return killed.stdout


def test_killed_at_a_system_call_in_the_middle_of_a_checkpoint(stock_weights, tmp_path):
    """SIGKILL before the 30th system call of subgraph 3's checkpoint (its state file
    written, some of its batch structures rewritten, its root not): the rerun resumes
    after subgraph 2 with the stock weights."""
    (tmp_path / "spill").mkdir()
    said = killed_at_call(tmp_path, 30)
    assert "killing at call 30 of checkpoint 3" in said
    assert_resumes_with_stock_weights(tmp_path, stock_weights["gptq"], done=2)


@pytest.mark.slow
def test_killed_at_system_calls_all_through_a_checkpoint(stock_weights, tmp_path):
    """Counted once, then killed before the first, the second, a middle one and the
    last system call before the store's root is renamed into place (which commits
    subgraph 3's checkpoint): the rerun resumes after subgraph 2. Killed before the
    call after that rename, or the checkpoint's last (deleting what it superseded): it
    resumes after subgraph 3. Every time with the stock weights."""
    (tmp_path / "spill").mkdir()
    counted = run_child(tmp_path, "--kill-in-checkpoint", "3", "--kill-step", "call")
    assert counted.returncode == 0, counted.stderr[-3000:]
    calls = [line for line in counted.stdout.splitlines() if line.startswith("call ")]
    assert f"checkpoint 3 made {len(calls)} calls" in counted.stdout
    (commit,) = [
        number
        for number, line in enumerate(calls, 1)
        if " replace " in line and "/batches/" not in line and "/states/" not in line
    ]
    for number, done in [(1, 2), (2, 2), (commit // 2, 2), (commit, 2), (commit + 1, 3),
                         (len(calls), 3)]:  # fmt: skip
        work = tmp_path / f"call-{number}"
        (work / "spill").mkdir(parents=True)
        killed_at_call(work, number)
        assert_resumes_with_stock_weights(work, stock_weights["gptq"], done=done)


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
    weights, output = resume_here(tmp_path, propagate_error=False)
    assert progress_labels(output, "Calibrating") == [3, 4, 5]
    assert progress_labels(output, "Propagating") == []
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
    assert_resumes_with_stock_weights(tmp_path, stock_weights["gptq"], done=2)


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(tmp_path):
    (tmp_path / "spill").mkdir()
    killed = run_child(tmp_path, "--kill-subgraph", "2", "--kill-batch", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    with pytest.raises(CheckpointError) as other:
        resume_here(tmp_path, recipe="awq")
    refusal = str(other.value)
    assert "holds a checkpoint of another calibration" in refusal
    assert "recipe" in refusal and "remove that directory" in refusal
    found = checkpoints.committed(Part(tmp_path / "ckpt"))
    assert found is not None and found.done == 1  # the refusal changed nothing


@pytest.mark.slow  # by default: tests/unit/test_checkpoints.py, and a torchrun rank's
def test_a_damaged_state_file_is_refused_and_nothing_is_loaded(tmp_path):
    (tmp_path / "spill").mkdir()
    killed = run_child(tmp_path, "--kill-subgraph", "3", "--kill-batch", "1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    state = tmp_path / "ckpt" / "states" / "0001.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10
    state.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as resumed:
        resume_here(tmp_path)
    refusal = str(resumed.value)
    assert "is damaged" in refusal and "0001.pt" in refusal
    assert "does not match its CRC-32C" in refusal
    with pytest.raises(CheckpointError, match="does not match its CRC-32C"):
        part = Part(tmp_path / "ckpt")
        checkpoints.check_states(part, checkpoints.committed(part))


def test_runs_killed_before_their_first_checkpoint_leave_no_store_behind(tmp_path):
    """A run killed once its activations spilled but before its first commit leaves a
    kept store that commits nothing (no sweep removes a kept store): the next run,
    starting afresh, removes it, so attempts killed early do not pile up stores."""
    (tmp_path / "spill").mkdir()
    for _ in range(2):
        killed = run_child(
            tmp_path, "--kill-subgraph", "1", "--kill-pass", "propagating", "--kill-batch", "14"
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # The second attempt started afresh and removed the first's store: its own is left.
    assert len(Part(tmp_path / "ckpt").stores()) == 1


class Interrupted(RuntimeError):
    pass


@pytest.fixture
def interrupt_at(monkeypatch):
    """``interrupt_at(n)``: the n-th subgraph forward call from now raises Interrupted
    in this process (None: none does); a pass is one call per batch."""
    from llmcompressor.pipelines.sequential import helpers

    forward = helpers.Subgraph.forward
    count = {"calls": 0, "at": None}

    def counting(self, *args, **kwargs):
        count["calls"] += 1
        if count["calls"] == count["at"]:
            raise Interrupted(f"interrupted at subgraph call {count['calls']}")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(helpers.Subgraph, "forward", counting)
    return lambda at: count.update(calls=0, at=at)


def test_a_resume_writes_the_saved_weights_into_a_disk_offloaded_model(tmp_path, interrupt_at):
    """llm-compressor offloads the model it calibrates; offloaded to disk (or to the CPU
    from a GPU), each parameter read is an onloaded copy. The rerun must write the
    committed subgraphs' saved weights into the offload itself, so it ends with the
    weights of the run that was not interrupted."""
    from compressed_tensors.offload import dispatch_with_map

    from spillcache.integrations import llmcompressor as integration
    from tiny_llama import hidden_state_bytes, tiny_llama

    (tmp_path / "spill").mkdir()
    checkpointed = {
        "host_bytes": hidden_state_bytes() // 2, "disk_path": str(tmp_path / "spill"),
        "checkpoint_dir": str(tmp_path / "ckpt"),
    }  # fmt: skip

    def run(name: str) -> dict:
        model = tiny_llama(tmp_path / "model")  # 2 layers: 3 subgraphs
        every_module = {
            path: ("cpu", "disk")
            for path, module in model.named_modules()
            if any(True for _ in module.parameters(recurse=False))
            or any(True for _ in module.buffers(recurse=False))
        }
        (tmp_path / name).mkdir()
        dispatch_with_map(model, every_module, offload_dir=str(tmp_path / name),
                          show_progress=False)  # fmt: skip
        with integration.enable(**checkpointed):
            return calibrate(tmp_path / "model", RECIPES["gptq"](), prefetch=False, model=model)

    interrupt_at(None)
    uninterrupted = run("uninterrupted")
    interrupt_at(2 * 16 + 2 * 16 + 5)  # subgraph 3, mid-calibrating: 2 committed
    with pytest.raises(Interrupted):
        run("interrupted")
    assert checkpoints.committed(Part(tmp_path / "ckpt")).done == 2
    interrupt_at(None)
    resumed = run("resumed")
    assert resumed.keys() == uninterrupted.keys()
    differ = [name for name, tensor in uninterrupted.items() if bits(resumed[name]) != bits(tensor)]
    assert differ == [], "the resumed run lost the saved weights of these"
    assert not (tmp_path / "ckpt").exists()
