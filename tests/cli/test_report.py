"""``spillcache report``: a metrics file as a table, a plot and a suggested budget.

The files here are written by hand, record by record, so that every figure the report
prints can be worked out beside it; tests/integration/test_run_watch.py reports a real
run and checks the suggestion against a rerun.
"""

from __future__ import annotations

import json
import sys

import pytest

from spillcache.cli import main

MIB = 2**20
KIB = 2**10


def subgraph(index: int, *, read: int, values: int, tier: int = 12 * MIB, stall=0.5) -> dict:
    return {
        "version": 1, "time": 0.0, "rank": 0, "world": 1, "pid": 1, "event": "subgraph",
        "subgraph": index, "subgraphs": 3, "seconds": 2.0, "elapsed_seconds": 2.0 * index,
        "written_bytes": 8 * MIB, "read_bytes": read, "stall_seconds": stall,
        "host_bytes": tier, "host_tier_budget_bytes": tier, "device_bytes": 0,
        "disk_bytes": values, "values_bytes": values, "values_peak_bytes": values,
        "rss_bytes": 900 * MIB, "rss_peak_bytes": 950 * MIB,
    }  # fmt: skip


START = {
    "version": 1, "time": 0.0, "rank": 0, "world": 1, "event": "start",
    "host_budget_bytes": 16 * MIB, "host_tier_bytes": 12 * MIB, "write_behind_bytes": "auto",
    "read_buffer_bytes": "auto", "disk_paths": ["/nvme"], "ram_bytes": 24 * 2**30, "pid": 1,
}  # fmt: skip
END = {
    "version": 1, "time": 0.0, "rank": 0, "world": 1, "pid": 1, "event": "end",
    "subgraphs_done": 3,
    "seconds": 6.0, "written_bytes": 24 * MIB, "read_bytes": 2 * 52 * MIB, "stall_seconds": 1.5,
    "values_peak_bytes": 64 * MIB, "host_peak_bytes": 12 * MIB,
    "host_tier_budget_bytes": 12 * MIB, "rss_bytes": 900 * MIB, "rss_peak_bytes": 950 * MIB,
    "watch_seconds": 0.004, "error": None,
}  # fmt: skip


def metrics_file(tmp_path, records) -> str:
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


def a_run() -> list[dict]:
    # 64 MiB of values through a 12 MiB tier: each pass reads 52 MiB; two passes each in
    # subgraphs 2 and 3 (subgraph 1 made the values).
    return [
        START,
        subgraph(1, read=0, values=64 * MIB, stall=0),
        subgraph(2, read=2 * 52 * MIB, values=64 * MIB),
        subgraph(3, read=2 * 52 * MIB, values=64 * MIB),
        END,
    ]


def test_the_table_the_totals_and_the_advice(tmp_path, capsys):
    assert main(["report", metrics_file(tmp_path, a_run())]) == 0
    out = capsys.readouterr().out
    rows = out.splitlines()
    assert rows[0].split()[:4] == ["subgraph", "s", "host", "tier"]
    assert rows[2].split()[:2] == ["2/3", "2.0"] and "104.0 MiB" in rows[2]
    assert "total: 6.0 s, wrote 24.0 MiB, read 104.0 MiB, stalled 1.50 s" in out
    assert "would have read nothing back" in out and "would have halved the reads" in out


def test_the_suggested_budgets_follow_the_scan_model(tmp_path, capsys):
    from spillcache._internal.cli.plan import host_bytes_for_tier

    assert main(["report", metrics_file(tmp_path, a_run()), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["suggestion"]
    # Nothing read: a tier of all 64 MiB. Half: the reads (2 passes x 2 subgraphs x
    # (64 - T) MiB) halved from T = 12 MiB, i.e. 64 - T = 26 MiB: T = 38 MiB.
    assert found["no_reads_host_bytes"] == host_bytes_for_tier(64 * MIB)
    assert found["half_reads_host_bytes"] == host_bytes_for_tier(38 * MIB)
    assert found["read_bytes"] == 4 * 52 * MIB and found["stall_seconds"] == 1.0


def test_a_run_that_read_nothing_needs_no_more_budget(tmp_path, capsys):
    records = [START, subgraph(1, read=0, values=8 * MIB, stall=0), END]
    assert main(["report", metrics_file(tmp_path, records)]) == 0
    assert "nothing was read back from disk" in capsys.readouterr().out


def test_a_budget_beyond_the_nodes_ram_says_so(tmp_path, capsys):
    small_node = START | {"ram_bytes": 32 * MIB}
    assert main(["report", metrics_file(tmp_path, [small_node, *a_run()[1:]])]) == 0
    assert "is more than this machine's RAM (32.0 MiB)" in capsys.readouterr().out


def test_a_torn_line_is_skipped_and_said(tmp_path, capsys):
    path = tmp_path / "run.jsonl"
    records = a_run()
    text = "".join(json.dumps(record) + "\n" for record in records)
    path.write_text(text.replace(json.dumps(records[1]), json.dumps(records[1])[:40]))
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 line(s) of the file skipped: line 2: not a spillcache metrics record" in out
    assert "3/3" in out and "1/3" not in out


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('{"event": "checkpoint", "rank": 0, "pid": 1}', "an unknown 'checkpoint' record"),
        ('{"kind": "gpu", "util": 0.9}', "not a spillcache metrics record"),
        ('{"event": "subgraph", "rank": 0, "pid": 1, "subgraph": 4}',
         "a 'subgraph' record without a number for subgraphs, seconds"),
        (json.dumps(subgraph(4, read=0, values=0) | {"seconds": "2.0"}),
         "a 'subgraph' record without a number for seconds"),
        ('{"event": "end", "rank": Infinity}', "not a spillcache metrics record"),
    ],
    ids=["unknown event", "no event", "missing fields", "a string", "rank Infinity"],
)  # fmt: skip
def test_a_foreign_record_is_skipped_and_said(tmp_path, capsys, line, said):
    path = tmp_path / "run.jsonl"
    records = [json.dumps(record) for record in a_run()]
    path.write_text("\n".join([*records[:2], line, *records[2:]]) + "\n")
    assert main(["report", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"1 line(s) of the file skipped: line 3: {said}" in out
    assert "3/3" in out and "total: 6.0 s" in out


def test_a_run_that_did_not_end_is_reported_as_such(tmp_path, capsys):
    assert main(["report", metrics_file(tmp_path, a_run()[:3])]) == 0
    assert "did not reach the end of its calibration" in capsys.readouterr().out


def test_the_last_run_of_the_rank_asked_for(tmp_path, capsys):
    other_rank = [dict(record, rank=1) for record in a_run()]
    first = [START, subgraph(1, read=0, values=MIB, stall=0), END]
    path = metrics_file(tmp_path, first + a_run() + other_rank)
    assert main(["report", path]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path} holds 2 runs of rank 0: the last one")
    assert "read 104.0 MiB" in out
    assert main(["report", path, "--rank", "2"]) == 2
    assert "holds no run of rank 2: see --rank" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no run: no 'start' record"),
        ("{not json\n", "line 1: not a spillcache metrics record"),
        (json.dumps(END) + "\n", "line 1: a 'end' record before its run's 'start'"),
        (
            json.dumps({k: v for k, v in START.items() if k != "host_budget_bytes"}) + "\n",
            "line 1: a 'start' record without a number for host_budget_bytes",
        ),
    ],
    ids=["empty", "not JSON", "no start", "a start without its figures"],
)
def test_a_file_that_is_no_metrics_file_is_one_line_and_exit_2(tmp_path, capsys, text, message):
    path = tmp_path / "run.jsonl"
    path.write_text(text)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("spillcache report: ") and message in err and len(err.splitlines()) == 1


def test_a_missing_file_is_named(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    assert "no metrics file at" in capsys.readouterr().err


def test_the_plot_is_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the test extra installs matplotlib")
    plot = tmp_path / "run.png"
    assert main(["report", metrics_file(tmp_path, a_run()), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10 * KIB
    assert f"plot: {plot}" in capsys.readouterr().out


def test_without_matplotlib_the_plot_says_what_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    path = metrics_file(tmp_path, a_run())
    assert main(["report", path, "--plot", str(tmp_path / "run.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install 'spillcache[report]'" in err
    assert not (tmp_path / "run.png").exists()


def test_a_host_tier_that_shrank_and_another_policy_are_said(tmp_path, capsys):
    shrunk = [subgraph(i, read=r, values=64 * MIB, tier=8 * MIB) for i, r in ((2, MIB), (3, MIB))]
    start = START | {"eviction": "lru"}
    assert main(["report", metrics_file(tmp_path, [start, *shrunk, END])]) == 0
    out = capsys.readouterr().out
    assert "the host tier ran at 8.0 MiB of the 12.0 MiB configured" in out
    assert 'these figures assume eviction = "scan"; with "lru"' in out
