"""``spillcache plan`` against real llm-compressor ``oneshot`` runs (issue 12): given the
tiny Llama's config.json and the run's sizes and budgets, it predicts the bytes the disk
tier wrote and read within 2 %: GPTQ (the pipeline's cache), and AWQ, whose caches keep
values where they are (offload_device None): on this CPU machine, in the same host tier
(``--awq-offload cpu``)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from spillcache import CacheConfig, cli  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402
from tiny_llama import (  # noqa: E402
    SAMPLES,
    SEQ_LEN,
    awq_recipe,
    calibrate,
    gptq_recipe,
    hidden_state_bytes,
)

pytestmark = pytest.mark.integration

# host_bytes' part for values read back and copied in, set for the run and the plan
# alike: room for what the pipeline holds of fetched and prefetched batches (at 64 KiB,
# four of the tiny Llama's 16 KiB hidden states, some reads go outside host_bytes).
READS = 256 * 2**10


@pytest.mark.parametrize(("recipe", "eighths"), [("gptq", 1), ("gptq", 4), ("awq", 4), ("awq", 16)])
def test_plan_predicts_a_oneshot(tmp_path, capsys, monkeypatch, recipe, eighths):
    spill_dir = tmp_path / "spill"
    spill_dir.mkdir()
    # A host tier of ``eighths`` of one layer's hidden states: host_bytes is that and
    # its part for reads (none for write-behind: writes are synchronous).
    host_bytes = hidden_state_bytes() * eighths // 8 + READS
    # 1 KiB: the tests' tiny tensors (4-16 KiB) are tiered, as a real model's are.
    # Synchronous writes: the plan assumes the disk keeps up; with write-behind, a value
    # read again before its write lands (AWQ re-reads soon) comes from RAM, by timing.
    config = CacheConfig(
        host_bytes=host_bytes, inline_bytes=1024, write_behind_bytes=0,
        read_buffer_bytes=READS, disk_path=str(spill_dir),
    )  # fmt: skip
    with integration.enable(config) as switch:
        recipes = {"gptq": gptq_recipe, "awq": awq_recipe}
        calibrate(tmp_path / "model", recipes[recipe](), prefetch=True)
    measured = switch.stats()["disk"]
    assert measured["bytes_written"] > 0 and measured["bytes_read"] > 0

    monkeypatch.setenv("SPILLCACHE_INLINE_BYTES", "1024")
    monkeypatch.setenv("SPILLCACHE_WRITE_BEHIND_BYTES", "0")
    monkeypatch.setenv("SPILLCACHE_READ_BUFFER_BYTES", str(READS))
    argv = ["plan", "--model", str(tmp_path / "model"), "--samples", str(SAMPLES)]
    argv += ["--seq-len", str(SEQ_LEN), "--host-bytes", str(host_bytes)]
    argv += ["--disk-path", str(spill_dir), "--no-probe", "--json"]
    argv += ["--recipe", recipe, "--awq-offload", "cpu"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["host_tier_bytes"] == hidden_state_bytes() * eighths // 8
    for planned, key in (
        ("disk_written_bytes", "bytes_written"),
        ("disk_read_bytes", "bytes_read"),
    ):
        assert abs(plan[planned] - measured[key]) <= 0.02 * measured[key], (
            planned, plan[planned], measured[key],
        )  # fmt: skip
