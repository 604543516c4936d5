"""llm-compressor's ``oneshot`` with its own cache and with spillcache: same weights.

A tiny Llama goes through the sequential pipeline with a GPTQ and an AWQ recipe, once
with the stock cache (the reference) and then with spillcache under a host budget far
below the activations, so most of them live on disk, with and without prefetch. Every
resulting tensor must match the reference bit for bit, and every store must be gone
afterwards although llm-compressor never closes its caches.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from spill_testing import assert_same  # noqa: E402
from spillcache import CacheConfig, IntermediatesCache  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402
from tiny_llama import (  # noqa: E402
    RECIPES,
    calibrate,
    gptq_recipe,
    hidden_state_bytes,
    stock_pin_memory_without_accelerator,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stock_weights(tmp_path_factory):
    """The reference: each recipe calibrated with llm-compressor's own cache."""
    weights = {}
    for name, recipe in RECIPES.items():
        with stock_pin_memory_without_accelerator():
            weights[name] = calibrate(tmp_path_factory.mktemp(name), recipe(), prefetch=False)
    return weights


def small_host_config(spill_dir) -> CacheConfig:
    # An eighth of one layer's hidden states: nearly every batch lives on disk.
    return CacheConfig(
        host_bytes=hidden_state_bytes() // 8,
        inline_bytes=1024,
        disk_path=str(spill_dir),
    )


@pytest.mark.parametrize("prefetch", [False, True], ids=["no-prefetch", "prefetch"])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_spillcache_gives_the_stock_weights_bit_for_bit(recipe, prefetch, stock_weights, tmp_path):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    with integration.enable(small_host_config(spill_dir)) as switch:
        weights = calibrate(tmp_path / "model", RECIPES[recipe](), prefetch=prefetch)
    totals = switch.stats()

    reference = stock_weights[recipe]
    assert sorted(weights) == sorted(reference)
    for name, tensor in reference.items():
        assert_same(weights[name], tensor)

    # GPTQ: the pipeline's one cache; AWQ adds one per parent module it replays.
    assert totals["caches"] == 1 if recipe == "gptq" else totals["caches"] > 1, totals
    assert totals["open"] == 0, totals
    # Most values were read back from disk, not from the host tier.
    assert totals["disk"]["bytes_written"] >= hidden_state_bytes(), totals
    assert totals["disk"]["hits"] > totals["host"]["hits"], totals
    assert os.listdir(spill_dir) == [], "a store outlived its cache"


def test_the_docs_inspect_example_is_what_a_kept_store_shows(tmp_path):
    """docs/llmcompressor.md shows `spillcache inspect` of this very run's store."""
    import importlib.metadata
    import re

    made_with = (0, 14)  # llm-compressor 0.13 caches None for the causal mask instead
    installed = tuple(
        int(part) for part in importlib.metadata.version("llmcompressor").split(".")[:2]
    )
    if installed != made_with:
        pytest.skip(f"the docs example shows what llm-compressor {made_with} caches")
    from pathlib import Path

    from spill_testing import run_console

    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    config = small_host_config(spill_dir).replace(keep_store=True)
    with integration.enable(config):
        calibrate(tmp_path / "model", gptq_recipe(), prefetch=True)
    (store,) = spill_dir.iterdir()
    done = run_console("inspect", str(store))
    assert done.returncode == 0, done.stderr
    shown = done.stdout
    page = (Path(__file__).resolve().parents[2] / "docs" / "llmcompressor.md").read_text()
    (example,) = re.findall(r"```console\n\$ spillcache inspect .*?\n\.\.\.\n(.*?)```", page, re.S)
    assert example.strip() in shown


def test_awq_caches_share_one_host_budget(stock_weights, tmp_path):
    """AWQ builds the pipeline's cache and one per mapping parent; with one config they
    share one host budget (a host tier of a quarter of one layer's hidden states here),
    so the host tier over all of them never holds more, and the weights are still the
    stock ones."""
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    budget = hidden_state_bytes() // 4
    # host_bytes holds the tier and, besides it, the parts for values waiting for their
    # writes (as much as the tier) and for values read back or copied in (a whole layer's
    # hidden states: the pipeline and AWQ hold many at once). The pool's region then
    # never fills in this run (its peak stays under three quarters of host_bytes), so no
    # value goes outside it.
    writes, reads = budget, hidden_state_bytes()
    config = CacheConfig(
        host_bytes=budget + writes + reads,
        write_behind_bytes=writes,
        read_buffer_bytes=reads,
        inline_bytes=1024,
        disk_path=str(spill_dir),
    )
    # A cache of the same config kept open all run: the pool, and its peak, outlive
    # each of llm-compressor's caches.
    with integration.enable(config) as switch, IntermediatesCache(config=config) as witness:
        weights = calibrate(tmp_path / "model", RECIPES["awq"](), prefetch=True)
        pool = witness.stats()["pool"]
    assert switch.stats()["caches"] > 1
    assert pool["host"]["budget"] == budget
    assert budget // 2 < pool["host"]["peak_bytes"] <= budget, pool
    for name, tensor in stock_weights["awq"].items():
        assert_same(weights[name], tensor)
    assert os.listdir(spill_dir) == []


@pytest.mark.parametrize("recipe", ["awq", "gptq"])
def test_with_checkpoint_dir_the_pipeline_cache_has_a_budget_beside_awqs(
    recipe, tmp_path, monkeypatch
):
    """docs/llmcompressor.md, "Memory": with checkpoint_dir the pipeline's cache is a
    kept store in the checkpoint directory, built with another config than the switch's,
    so it has a host budget of its own beside the one AWQ's caches share (two budgets of
    host_bytes, each kept); a recipe without AWQ has the pipeline's alone."""
    from spillcache._internal.runtime import core

    pools = {}
    pool_for = core.pool_for

    def recording(config):
        pool = pool_for(config)
        pools[id(pool)] = pool  # kept alive: no id is used twice
        return pool

    monkeypatch.setattr(core, "pool_for", recording)
    (tmp_path / "spill").mkdir()
    host_bytes = hidden_state_bytes() // 2
    config = CacheConfig(
        host_bytes=host_bytes, inline_bytes=1024, disk_path=str(tmp_path / "spill")
    )
    with integration.enable(config, checkpoint_dir=str(tmp_path / "ckpt")):
        calibrate(tmp_path / "model", RECIPES[recipe](), prefetch=False)
    pipelines = str(tmp_path / "ckpt" / "activations")
    expected = {pipelines, str(tmp_path / "spill")} if recipe == "awq" else {pipelines}
    assert {pool.config.disk_path for pool in pools.values()} == expected
    for pool in pools.values():
        assert pool.budgets.host_bytes == host_bytes
        assert pool.placement.host.peak <= pool.budgets.host_tier_bytes
