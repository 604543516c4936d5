"""A oneshot run through spillcache, watched: a line per subgraph on stderr, the metrics
file, and ``spillcache report``'s suggested budget checked by running again with it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from spillcache import CacheConfig  # noqa: E402
from spillcache.cli import main  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402
from tiny_llama import RECIPES, calibrate, hidden_state_bytes  # noqa: E402

pytestmark = pytest.mark.integration


def watched_run(tmp_path, name: str, host_bytes: int, **enable) -> tuple[list[dict], dict]:
    """One GPTQ oneshot; its metrics records and the switch's totals."""
    spill = tmp_path / f"spill-{name}"
    spill.mkdir()
    metrics = tmp_path / f"{name}.jsonl"
    config = CacheConfig(host_bytes=host_bytes, inline_bytes=1024, disk_path=str(spill))
    with integration.enable(config, metrics_path=metrics, **enable) as switch:
        calibrate(tmp_path / f"model-{name}", RECIPES["gptq"](), prefetch=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return records, switch.stats()


def test_a_oneshot_prints_a_line_per_subgraph_and_writes_the_metrics_file(tmp_path, capfd):
    records, totals = watched_run(tmp_path, "small", hidden_state_bytes() // 8)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "spillcache: " in line]
    # The tiny Llama's 2 layers make 3 subgraphs (the last one: norm and head).
    assert [r["event"] for r in records] == ["start", "subgraph", "subgraph", "subgraph", "end"]
    assert sum("spillcache: subgraph " in line for line in lines) == 3
    assert any("spillcache: host RAM budget" in line for line in lines)
    assert any("spillcache: done: 3 subgraphs in" in line for line in lines)
    subgraphs, end = records[1:4], records[4]
    assert [(r["subgraph"], r["subgraphs"]) for r in subgraphs] == [(1, 3), (2, 3), (3, 3)]
    # The lines add up to the end's totals, and those to what the caches counted.
    for key in ("written_bytes", "read_bytes"):
        assert sum(r[key] for r in subgraphs) == end[key]
    assert end["written_bytes"] == totals["disk"]["bytes_written"] > 0
    assert end["read_bytes"] == totals["disk"]["bytes_read"] > 0
    assert end["stall_seconds"] == pytest.approx(totals["stall_seconds"])
    assert end["values_peak_bytes"] >= hidden_state_bytes()
    assert 0 < end["watch_seconds"] < end["seconds"] / 10


def test_progress_off_prints_no_line(tmp_path, capfd):
    records, _ = watched_run(tmp_path, "quiet", hidden_state_bytes() // 8, progress=False)
    assert "spillcache: " not in capfd.readouterr().err
    assert records[-1]["event"] == "end"


def test_the_suggested_budgets_do_what_the_report_says(tmp_path, capsys):
    first, _ = watched_run(tmp_path, "first", hidden_state_bytes() // 8)
    assert main(["report", str(tmp_path / "first.jsonl"), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["suggestion"]
    read = first[-1]["read_bytes"]
    assert found["read_bytes"] == read > 0

    no_reads, _ = watched_run(tmp_path, "no-reads", found["no_reads_host_bytes"])
    assert no_reads[-1]["read_bytes"] == 0
    half, _ = watched_run(tmp_path, "half", found["half_reads_host_bytes"])
    # The model counts bytes; the tier holds whole values, and this model's values are
    # large against its tier: "halved" comes out somewhat above half (docs/watching.md).
    assert half[-1]["read_bytes"] <= 0.6 * read
    assert found["half_reads_host_bytes"] < found["no_reads_host_bytes"]
