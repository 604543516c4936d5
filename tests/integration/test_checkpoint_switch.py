"""enable(checkpoint_dir=...) puts the checkpointing pipeline in the place of
llm-compressor's sequential pipeline, and disable() puts llm-compressor's own back."""

from __future__ import annotations

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from llmcompressor.pipelines.sequential.pipeline import SequentialPipeline  # noqa: E402

from spillcache.integrations import llmcompressor as integration  # noqa: E402

STOCK = vars(SequentialPipeline)["__call__"]


def test_checkpoint_dir_switches_the_pipeline_and_disable_puts_it_back(tmp_path):
    with integration.enable(checkpoint_dir=tmp_path) as switch:
        assert switch.checkpoint_dir == tmp_path
        assert vars(SequentialPipeline)["__call__"] is not STOCK
    assert vars(SequentialPipeline)["__call__"] is STOCK


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
