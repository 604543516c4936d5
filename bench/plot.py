"""Plot calibration_sim's wall time against the host tier's size, per policy.

One panel per mode (compute covering I/O, I/O bound): wall seconds of each policy
against the host tier as a % of the cached bytes, with two limits measured in the same
run as reference lines: the all-in-RAM run and the ideal I/O floor (the optimal
policy's disk bytes at raw O_DIRECT bandwidth; see calibration_sim's docstring).

    python bench/plot.py [--input bench/results/calibration_sim.json]
        [--output docs/img/wall_vs_host.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TITLES = {"covered": "compute covers I/O", "io-bound": "I/O bound (no compute)"}


def plot_mode(axes, mode: str, rows: list[dict]) -> None:
    ram = next(r for r in rows if r["policy"] == "all-in-RAM")
    spill = [r for r in rows if r["policy"] != "all-in-RAM"]
    for policy in dict.fromkeys(r["policy"] for r in spill):
        points = sorted((r["host %"], r["wall s"]) for r in spill if r["policy"] == policy)
        axes.plot(*zip(*points, strict=True), marker="o", label=policy)
    ideal = sorted({(r["host %"], r["ideal s"]) for r in spill if r["ideal s"] is not None})
    if ideal:
        axes.plot(*zip(*ideal, strict=True), "k:", label="ideal I/O floor")
    axes.axhline(ram["wall s"], color="grey", linestyle="--", label="all in RAM")
    axes.set_title(TITLES.get(mode, mode))
    axes.set_xlabel("host tier, % of cached bytes")
    axes.set_ylabel("wall time, s")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", type=Path, default=RESULTS / "calibration_sim.json")
    # Where docs/benchmarks.md shows it.
    docs_image = Path(__file__).parents[1] / "docs" / "img" / "wall_vs_host.png"
    parser.add_argument("--output", type=Path, default=docs_image)
    args = parser.parse_args()

    data = json.loads(args.input.read_text())
    modes = list(dict.fromkeys(r["mode"] for r in data["rows"]))
    figure, panels = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for axes, mode in zip(panels[0], modes, strict=True):
        plot_mode(axes, mode, [r for r in data["rows"] if r["mode"] == mode])
    figure.suptitle(
        f"Sequential calibration, {data['total'] / 1e9:.2f} GB cached, {data['batches']} "
        f"batches, {data['layers']} subgraphs (median of each configuration's runs)"
    )
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"plot written to {args.output}")


if __name__ == "__main__":
    main()
