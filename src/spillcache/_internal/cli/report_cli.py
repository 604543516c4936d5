"""``spillcache report``: a run's metrics file as a table, a plot and a suggested budget
(run_report.py reads and models it; this module is the command and the drawing)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spillcache.errors import ConfigError

from .run_report import Run, advice, read_runs, suggest, table

__all__ = ["add_report_command"]


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
