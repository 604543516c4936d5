"""``spillcache report``: a run's metrics file read back (docs/watching.md), its
subgraphs as a table and a plot, and what host budget would have spared its disk reads.

The budget comes from the model ``plan`` uses: with the scan eviction policy a pass over
V bytes of values through a host tier of T bytes reads V - T of them from disk (the
tier keeps T of them resident from pass to pass), and ``plan.host_bytes_for_tier`` gives
the ``host_bytes`` whose tier is T. Each subgraph's measured reads calibrate how many
passes read it (reads / (V - T)), so the reads at another tier are estimated subgraph by
subgraph from what was measured.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spillcache.errors import ConfigError, SpillCacheError

from ..text import aligned, format_bytes

__all__ = [
    "MetricsError",
    "Run",
    "add_report_command",
    "advice",
    "read_runs",
    "suggest",
    "table",
]


def add_report_command(commands: argparse._SubParsersAction) -> None:
    report = commands.add_parser(
        "report", help="a run's metrics file: a table per subgraph, a plot, a suggested budget"
    )
    report.add_argument("path", help="the metrics file (enable(metrics_path=...))")
    report.add_argument("--plot", help="draw the run per subgraph into this PNG file")
    report.add_argument("--rank", type=int, default=0, help="which rank's run (torchrun)")
    report.add_argument("--json", action="store_true")
    report.set_defaults(run=_report)


def _report(args: argparse.Namespace) -> int:
    runs = [run for run in read_runs(Path(args.path)) if run.rank == args.rank]
    if not runs:
        raise ConfigError(f"{args.path} holds no run of rank {args.rank}: see --rank")
    run = runs[-1]  # a file appended to by several runs: the last one
    found = suggest(run)
    if args.plot:
        _plot(run, Path(args.plot))
    if args.json:
        print(json.dumps({"start": run.start, "subgraphs": run.subgraphs, "end": run.end,
                          "suggestion": found, "runs_in_file": len(runs)}, indent=2))  # fmt: skip
        return 0
    if len(runs) > 1:
        print(f"{args.path} holds {len(runs)} runs of rank {args.rank}: the last one")
    print(table(run))
    print(advice(found))
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


def _plot(run: Run, path: Path) -> None:
    """Three panels per subgraph: time stalled, disk GB/s, bytes held per tier."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # a file, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'spillcache[report]' (or leave out --plot)"
        ) from None
    if not path.parent.is_dir():
        raise ConfigError(
            f"--plot {str(path)!r}: the directory {str(path.parent)!r} does not exist"
        )
    records = run.subgraphs
    x = [r["subgraph"] for r in records]
    figure, (stall, speed, held) = plt.subplots(3, 1, sharex=True, figsize=(8, 9))
    stall.bar(x, [r["stall_seconds"] for r in records], color="tab:red")
    stall.set_ylabel("stalled s")
    for key, label in (("written_bytes", "write"), ("read_bytes", "read")):
        rates = [r[key] / r["seconds"] / 1e9 if r["seconds"] > 0 else 0 for r in records]
        speed.plot(x, rates, marker="o", label=label)
    speed.set_ylabel("disk GB/s (mean)")
    speed.legend()
    for key, label in (("host_bytes", "host tier"), ("disk_bytes", "disk"),
                       ("values_bytes", "values")):  # fmt: skip
        held.plot(x, [r[key] / 2**30 for r in records], marker="o", label=label)
    held.plot(x, [r["host_tier_budget_bytes"] / 2**30 for r in records], linestyle="--",
              label="host tier budget")  # fmt: skip
    held.set_ylabel("GiB held")
    held.set_xlabel("subgraph")
    held.legend()
    figure.suptitle(f"spillcache run (rank {run.rank}): {len(records)} subgraphs")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png")
    except OSError as error:
        raise ConfigError(f"--plot {str(path)!r} cannot be written: {error.strerror}") from None
    finally:
        plt.close(figure)


# ------------------------------------------------------------ the metrics file


class MetricsError(SpillCacheError, ValueError):
    """A metrics file that cannot be read as one."""


@dataclass
class Run:
    """One run of one rank: its start record, its subgraphs' records, its end record
    (None: the run did not reach the end of its calibration)."""

    start: dict[str, Any]
    subgraphs: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    skipped: list[str] = field(default_factory=list)  # the file's lines that were no records

    @property
    def rank(self) -> int:
        return int(self.start.get("rank", 0))


# The figures the report reads from each event's records (run_watch.py writes them): a
# record of another event, or without one of them as a number (another program's line,
# another version's), is skipped and said like a torn line, not read half-way.
_NUMBERS = {
    "start": ("host_budget_bytes",),
    "subgraph": ("subgraph", "subgraphs", "seconds", "written_bytes", "read_bytes",
                 "stall_seconds", "host_bytes", "host_tier_budget_bytes", "disk_bytes",
                 "values_bytes", "values_peak_bytes", "rss_bytes"),
    "end": ("seconds", "written_bytes", "read_bytes", "stall_seconds", "rss_peak_bytes",
            "watch_seconds"),
}  # fmt: skip
# A start record's figures read where it has them (a default where not): numbers, the
# two parts of host_bytes also "auto".
_START_NUMBERS = ("world", "ram_bytes", "host_tier_bytes")
_START_PARTS = ("write_behind_bytes", "read_buffer_bytes")


def _number(value: Any) -> bool:
    """A figure the report can add and compare: JSON's NaN and Infinity are none."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _record_problem(record: dict[str, Any], event: Any) -> str | None:
    """Why the report cannot read ``record`` (its ``event``), or None."""
    if not isinstance(event, str) or event not in _NUMBERS:
        return f"an unknown {event!r} record, not one spillcache writes"
    bad = [name for name in _NUMBERS[event] if not _number(record.get(name))]
    if event == "start":
        bad += [name for name in _START_NUMBERS if name in record and not _number(record[name])]
        bad += [
            name for name in _START_PARTS
            if name in record and not (_number(record[name]) or record[name] == "auto")
        ]  # fmt: skip
    return f"a {event!r} record without a number for {', '.join(bad)}" if bad else None


def read_runs(path: Path) -> list[Run]:
    """Every run in a metrics file, in the order they started (several ranks, or several
    runs appended to one file). MetricsError naming the file and line otherwise."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise MetricsError(f"no metrics file at {path}: give the path metrics_path named") from None
    except OSError as error:
        raise MetricsError(f"cannot read {path}: {error.strerror or error}") from None
    runs: list[Run] = []
    current: dict[tuple[int, Any], Run] = {}  # (rank, pid) -> its run being read
    skipped: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            event, key = record["event"], (int(record.get("rank", 0)), record.get("pid"))
            hash(key)  # a pid that is a list or an object is no process's
        except (ValueError, KeyError, TypeError, OverflowError) as error:  # rank Infinity
            skipped.append(f"line {number}: not a spillcache metrics record ({error})")
            continue
        if problem := _record_problem(record, event):
            skipped.append(f"line {number}: {problem}")
        elif event == "start":
            current[key] = Run(record)
            runs.append(current[key])
        elif key not in current:
            skipped.append(f"line {number}: a {event!r} record before its run's 'start'")
        elif event == "subgraph":
            current[key].subgraphs.append(record)
        elif event == "end":
            current[key].end = record
    if not runs:
        why = f" ({skipped[0]}; is it the file metrics_path named?)" if skipped else ""
        raise MetricsError(f"{path} holds no run: no 'start' record it can read{why}")
    for run in runs:
        run.skipped = skipped  # a torn line (ranks appending over NFS): said, not fatal
    return runs


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f}" if seconds > 0 else "-"


def table(run: Run) -> str:
    """The run at a glance: a row per subgraph, then the totals."""
    rows = [["subgraph", "s", "host tier", "disk", "wrote", "GB/s", "read", "GB/s",
             "stalled s", "RSS"]]  # fmt: skip
    for record in run.subgraphs:
        seconds = record["seconds"]
        rows.append(
            [
                f"{record['subgraph']}/{record['subgraphs']}",
                f"{seconds:.1f}",
                f"{format_bytes(record['host_bytes'])} / "
                f"{format_bytes(record['host_tier_budget_bytes'])}",
                format_bytes(record["disk_bytes"]),
                format_bytes(record["written_bytes"]),
                _rate(record["written_bytes"], seconds),
                format_bytes(record["read_bytes"]),
                _rate(record["read_bytes"], seconds),
                f"{record['stall_seconds']:.2f}",
                format_bytes(record["rss_bytes"]),
            ]
        )
    lines = [aligned(rows)]
    if run.skipped:
        lines.append(f"{len(run.skipped)} line(s) of the file skipped: {run.skipped[0]}")
    end = run.end
    if end is None:
        lines.append("the run did not reach the end of its calibration (killed, or an error)")
    else:
        lines.append(
            f"total: {end['seconds']:.1f} s, wrote {format_bytes(end['written_bytes'])}, read "
            f"{format_bytes(end['read_bytes'])}, stalled {end['stall_seconds']:.2f} s; RSS peak "
            f"{format_bytes(end['rss_peak_bytes'])}; the progress lines and this file took "
            f"{end['watch_seconds']:.3f} s of it"
        )
    return "\n".join(lines)


def _reads_at(tier: int, passes: list[tuple[float, int]]) -> float:
    """Bytes read at a host tier of ``tier`` bytes: (passes, values) per subgraph."""
    return sum(count * max(0, values - tier) for count, values in passes)


def suggest(run: Run) -> dict[str, Any]:
    """What host budget would have read nothing back from disk, and which would have
    halved the reads, as ``host_bytes`` (one rank's); with the figures they come from."""
    from .plan import host_bytes_for_tier  # plan imports the cache: only when asked

    start = run.start
    tier_now = max([r["host_tier_budget_bytes"] for r in run.subgraphs], default=0)
    read = sum(r["read_bytes"] for r in run.subgraphs)
    stalled = sum(r["stall_seconds"] for r in run.subgraphs)
    seconds = sum(r["seconds"] for r in run.subgraphs)
    values_peak = max([r["values_peak_bytes"] for r in run.subgraphs], default=0)
    parts = (start.get("write_behind_bytes", "auto"), start.get("read_buffer_bytes", "auto"))
    result: dict[str, Any] = {
        "host_budget_bytes": start["host_budget_bytes"],
        "host_tier_bytes": tier_now,
        "values_peak_bytes": values_peak,
        "read_bytes": read,
        "stall_seconds": stalled,
        "stall_share": stalled / seconds if seconds > 0 else 0.0,
        "ram_bytes": start.get("ram_bytes", 0),
        "world": start.get("world", 1),
        "host_tier_configured_bytes": start.get("host_tier_bytes", tier_now),
        "host_tier_lowest_bytes": min(
            [r["host_tier_budget_bytes"] for r in run.subgraphs], default=tier_now
        ),
        "eviction": start.get("eviction", "scan"),
        "no_reads_host_bytes": None,
        "half_reads_host_bytes": None,
    }
    if read == 0:
        return result
    if values_peak <= tier_now:
        # Values that fit the tier were read all the same (a tier lowered while reads
        # went outside the region, say): no larger budget is shown to spare them.
        result["note"] = (
            f"{format_bytes(read)} were read back although the values "
            f"({format_bytes(values_peak)}) fit the host tier ({format_bytes(tier_now)})"
        )
        return result
    # How many passes read each subgraph's values: its measured reads over what a pass
    # reads at the tier it had.
    passes = [
        (r["read_bytes"] / max(1, r["values_peak_bytes"] - tier_now), r["values_peak_bytes"])
        for r in run.subgraphs
    ]
    result["no_reads_host_bytes"] = host_bytes_for_tier(values_peak, *parts)
    target = _reads_at(tier_now, passes) / 2
    low, high = tier_now, values_peak  # the smallest tier reading at most target bytes
    while low < high:
        middle = (low + high) // 2
        if _reads_at(middle, passes) <= target:
            high = middle
        else:
            low = middle + 1
    result["half_reads_host_bytes"] = host_bytes_for_tier(low, *parts)
    return result


def advice(found: dict[str, Any]) -> str:
    """``suggest``'s figures in words: what to change."""
    if "note" in found:
        return found["note"]
    if found["no_reads_host_bytes"] is None:
        return "nothing was read back from disk: the host budget held every value it needed"
    ram, world = found["ram_bytes"], found["world"]
    lines = [
        f"the caches read {format_bytes(found['read_bytes'])} back from disk and the pipeline "
        f"waited {found['stall_seconds']:.2f} s for it ({found['stall_share']:.0%} of the "
        f"subgraphs' time); the values peaked at {format_bytes(found['values_peak_bytes'])}, "
        f"the host tier had {format_bytes(found['host_tier_bytes'])} (host_bytes "
        f"{format_bytes(found['host_budget_bytes'])}).",
        f'- host_bytes = "{_size(found["no_reads_host_bytes"])}" would have read nothing back '
        "(and so waited for no read)",
        f'- host_bytes = "{_size(found["half_reads_host_bytes"])}" would have halved the reads',
    ]
    if ram and found["no_reads_host_bytes"] * world > ram:
        node = f" for each of {world} ranks" if world > 1 else ""
        lines.append(
            f"- the first{node} is more than this machine's RAM ({format_bytes(ram)}): with "
            "what RAM allows, a second drive in disk_path (a list) adds its bandwidth"
        )
    if found["host_tier_lowest_bytes"] < found["host_tier_configured_bytes"]:
        lines.append(
            f"- the host tier ran at {format_bytes(found['host_tier_lowest_bytes'])} of the "
            f"{format_bytes(found['host_tier_configured_bytes'])} configured: values read "
            "back landed outside host_bytes' region and took its room; a budget above "
            "shrinks alike unless read_buffer_bytes gives the reads more room"
        )
    if found["eviction"] != "scan":
        lines.append(
            f'- these figures assume eviction = "scan"; with "{found["eviction"]}" a '
            "tier smaller than the values saves almost no reads"
        )
    lines.append("(one rank's host_bytes; under torchrun with budget_scope = \"node\" give "
                 "the node's: the ranks' sum)")  # fmt: skip
    return "\n".join(lines)


def _size(nbytes: int) -> str:
    """A size the config parser reads back as at least ``nbytes``, in MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= 10 * scale:
            return f"{-(-nbytes // scale)}{unit}"
    return f"{-(-nbytes // 2**10)}KiB"
