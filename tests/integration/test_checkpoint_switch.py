"""enable(checkpoint_dir=...) puts the checkpointing pipeline in the place of
llm-compressor's sequential pipeline, and disable() puts llm-compressor's own back. A
checkpointed run calibrates what the same run without checkpoint_dir calibrates, and
the independent pipeline is checkpointed only where a rerun could resume it."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from llmcompressor.pipelines.independent.pipeline import IndependentPipeline  # noqa: E402
from llmcompressor.pipelines.sequential.pipeline import SequentialPipeline  # noqa: E402

from spill_testing import bits  # noqa: E402
from spillcache import ConfigError  # noqa: E402
from spillcache._internal.store import checkpoints  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402
from tiny_llama import RECIPES, calibrate, hidden_state_bytes  # noqa: E402

STOCK = vars(SequentialPipeline)["__call__"]
STOCK_INDEPENDENT = vars(IndependentPipeline)["__call__"]


def test_checkpoint_dir_switches_the_pipeline_and_disable_puts_it_back(tmp_path):
    with integration.enable(checkpoint_dir=tmp_path) as switch:
        assert switch.checkpoint_dir == tmp_path
        assert vars(SequentialPipeline)["__call__"] is not STOCK
        assert vars(IndependentPipeline)["__call__"] is not STOCK_INDEPENDENT
    assert vars(SequentialPipeline)["__call__"] is STOCK
    assert vars(IndependentPipeline)["__call__"] is STOCK_INDEPENDENT


def test_the_environment_variable_names_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("SPILLCACHE_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    with integration.enable() as switch:
        assert switch.checkpoint_dir == tmp_path / "ckpt"
        assert vars(SequentialPipeline)["__call__"] is not STOCK
    assert vars(SequentialPipeline)["__call__"] is STOCK


def test_without_a_directory_the_stock_pipeline_runs(monkeypatch):
    monkeypatch.delenv("SPILLCACHE_CHECKPOINT_DIR", raising=False)
    with integration.enable() as switch:
        assert switch.checkpoint_dir is None
        assert vars(SequentialPipeline)["__call__"] is STOCK


def spill_config(tmp_path) -> dict:
    (tmp_path / "spill").mkdir(exist_ok=True)
    return {"host_bytes": hidden_state_bytes() // 2, "disk_path": str(tmp_path / "spill")}


def test_a_shuffled_run_calibrates_the_same_samples_with_checkpoint_dir_as_without(tmp_path):
    """oneshot draws the calibration samples (8 of 16 here) from torch's generator,
    which tiny_llama seeds. Reading the samples for the checkpoint's fingerprint must
    leave that generator as it found it: the same weights with and without it."""

    def run(**checkpoint) -> dict:
        with integration.enable(**spill_config(tmp_path), **checkpoint):
            return calibrate(
                tmp_path / "model", RECIPES["gptq"](), prefetch=False,
                shuffle_calibration_samples=True, num_calibration_samples=8,
            )  # fmt: skip

    without = run()
    checkpointed = run(checkpoint_dir=str(tmp_path / "ckpt"))
    differ = [name for name, tensor in without.items() if bits(checkpointed[name]) != bits(tensor)]
    assert differ == [], "checkpoint_dir changed the samples these were calibrated on"


def count_subgraph_calls(monkeypatch) -> list:
    """A list that grows by one at each subgraph forward call."""
    from llmcompressor.pipelines.sequential import helpers

    calls, forward = [], helpers.Subgraph.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(helpers.Subgraph, "forward", counting)
    return calls


def test_the_independent_pipeline_of_several_calibrating_modifiers_is_refused_up_front(
    tmp_path, monkeypatch
):
    """oneshot's default pipeline runs a checkpointed pipeline per modifier, and a run
    killed in a later one could not be resumed: refused before anything is calibrated,
    naming the modifiers and the pipeline to use."""
    calls = count_subgraph_calls(monkeypatch)
    with integration.enable(**spill_config(tmp_path), checkpoint_dir=str(tmp_path / "ckpt")):
        with pytest.raises(ConfigError) as refused:
            calibrate(
                tmp_path / "model", RECIPES["awq+gptq"](), prefetch=False, pipeline="independent"
            )
    message = str(refused.value)
    assert "AWQModifier, GPTQModifier" in message and "pipeline='sequential'" in message
    assert calls == [] and not (tmp_path / "ckpt").exists()


def test_the_independent_pipeline_of_one_calibrating_modifier_is_checkpointed(
    tmp_path, monkeypatch
):
    """One modifier that calibrates (AWQ; the W4A16 quantization after it needs no
    data): one sequential pipeline, checkpointed after each subgraph."""
    saved = []
    save_states = checkpoints.save_states
    monkeypatch.setattr(checkpoints, "save_states", lambda *a: saved.append(1) or save_states(*a))
    with integration.enable(**spill_config(tmp_path), checkpoint_dir=str(tmp_path / "ckpt")):
        calibrate(tmp_path / "model", RECIPES["awq"](), prefetch=False, pipeline="independent")
    assert len(saved) == 3  # 2 layers: 3 subgraphs
    assert not (tmp_path / "ckpt").exists()
