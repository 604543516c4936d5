"""What does `spillcache demo` cost at different host budgets?

The demo's own calibration (spillcache._internal.cli.demo.calibrate: a random-weight decoder-only
transformer, X^T X of every linear layer, the sequential pipeline's passes through an
IntermediatesCache) at several host budgets, each a fraction of the cached activations:

- 1      the host tier holds everything (a disk tier is configured, nothing spills);
- 1/4    the demo's default: three quarters of every pass comes from disk;
- 1/16   nearly everything comes from disk.

Every run is timed against the all-in-RAM reference (no disk tier at all) measured in the
same process, and its statistics are checked bit for bit against the reference's.
Configurations run --repeats times, interleaved in a shuffled order (the VM drifts, and a
run after a smaller one pays for fresh pages); a row is the run of median wall time,
"x RAM" is that over the reference's median, "spread" the slowest run over the fastest.

With root, dirty pages are written and the page cache dropped before every run (cold);
otherwise the runs say so. The cache reads and writes chunk files with O_DIRECT where the
filesystem allows it, so its disk bytes reach the device either way: the "blk" columns are
what /proc/self/io saw reach the block layer.

"cpu s" is this process's CPU time in the run (the model's threads and the cache's I/O
threads together). "other cpu" is the CPU time that processes other than this one used
during the run (/proc/stat minus this process): on a 2-core machine, anything above a few
tenths of a second means the run shared its cores and its wall time is not its own.

    python bench/demo_budgets.py [--samples 512] [--seq-len 256] [--hidden 256]
        [--layers 3] [--fractions 1,1/4,1/16] [--repeats 3] [--threads N] [--dir PATH]
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

import torch

from common import add_publish_option, drop_page_cache, proc_io, report
from spillcache import CacheConfig
from spillcache._internal.cli.demo import (
    DEFAULT_SIZES,
    activation_bytes,
    calibrate,
    identical,
    reference_config,
)
from spillcache._internal.cli.plan import host_bytes_for_tier

MiB = 2**20


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds every process has used since boot, CPU seconds of this process)."""
    with open("/proc/stat") as handle:
        fields = [int(v) for v in handle.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    ticks = os.sysconf("SC_CLK_TCK")
    # user, nice, system, irq, softirq, steal; guest time is counted in user already
    busy = sum(fields[:8]) - idle
    own = os.times()
    return busy / ticks, own.user + own.system


def run_once(config: CacheConfig, args) -> dict:
    cold = drop_page_cache()
    gc.collect()
    io_before, cpu_before = proc_io(), busy_seconds()
    run = calibrate(config, **args.sizes)
    io_after, cpu_after = proc_io(), busy_seconds()
    own = cpu_after[1] - cpu_before[1]
    others = (cpu_after[0] - cpu_before[0]) - own
    return {
        "run": run,
        "cold": cold,
        "block_read": io_after["read_bytes"] - io_before["read_bytes"],
        "block_written": io_after["write_bytes"] - io_before["write_bytes"],
        "own_cpu": own,
        "other_cpu": max(0.0, others),
    }


def label(fraction: Fraction) -> str:
    return "all" if fraction == 1 else str(fraction)


def median_run(repeats: list[dict]) -> dict:
    """The run of median wall time (the upper one of an even count)."""
    return sorted(repeats, key=lambda r: r["run"].seconds)[len(repeats) // 2]


def make_row(name, budget, repeats, reference_wall, reference_hessians) -> dict:
    median = median_run(repeats)
    walls = [r["run"].seconds for r in repeats]
    stats = median["run"].stats
    device, host, disk = stats["device"], stats["host"], stats["disk"]
    return {
        "host budget": name,
        "budget MiB": None if budget is None else budget / MiB,
        "written MiB": disk["bytes_written"] / MiB,
        "read MiB": disk["bytes_read"] / MiB,
        "blk rd MiB": median["block_read"] / MiB,
        "blk wr MiB": median["block_written"] / MiB,
        "device h/m": f"{device['hits']}/{device['misses']}",
        "host h/m": f"{host['hits']}/{host['misses']}",
        "w-behind h": stats["write_behind"]["hits"],
        "disk h/m": f"{disk['hits']}/{disk['misses']}",
        "stall s": stats["stall_seconds"],
        "wall s": median["run"].seconds,
        "x RAM": median["run"].seconds / reference_wall,
        "spread": max(walls) / min(walls),
        "cpu s": median["own_cpu"],
        "other cpu s": max(r["other_cpu"] for r in repeats),
        "exact": all(identical(r["run"].hessians, reference_hessians) for r in repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=DEFAULT_SIZES["samples"])
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SIZES["seq_len"])
    parser.add_argument("--hidden", type=int, default=DEFAULT_SIZES["hidden"])
    parser.add_argument("--layers", type=int, default=DEFAULT_SIZES["layers"])
    parser.add_argument(
        "--fractions", default="1,1/4,1/16", help="host budgets, fractions of the activations"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument("--dir", default=None, help="directory on the disk to spill to")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    add_publish_option(parser)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.sizes = dict(
        samples=args.samples, seq_len=args.seq_len, hidden=args.hidden, layers=args.layers
    )
    cached = activation_bytes(args.samples, args.seq_len, args.hidden)
    fractions = [Fraction(f) for f in args.fractions.split(",")]
    work = Path(tempfile.mkdtemp(prefix="spillcache-demo-budgets-", dir=args.dir))
    runs = [("all in RAM, no disk tier", None, reference_config(cached))]
    for fraction in fractions:
        budget = int(fraction * cached)  # the host tier's; host_bytes also holds the
        # write-behind and read parts ("auto"), as the demo's default does
        config = CacheConfig(host_bytes=host_bytes_for_tier(budget), disk_path=str(work))
        runs.append((label(fraction), budget, config))

    print(
        f"{args.samples} samples x {args.seq_len} tokens, hidden {args.hidden}, "
        f"{args.layers} layers: {cached / MiB:.1f} MiB cached; torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs; {args.repeats} repeats"
    )
    try:
        # Untimed: the process's first touch of this much memory, and torch's set-up.
        calibrate(runs[0][2], **args.sizes)
        results: list[list[dict]] = [[] for _ in runs]
        order = random.Random(0)
        for repeat in range(args.repeats):
            for index in order.sample(range(len(runs)), len(runs)):
                result = run_once(runs[index][2], args)
                results[index].append(result)
                print(
                    f"  repeat {repeat + 1}: {runs[index][0]:>24}: "
                    f"{result['run'].seconds:6.2f} s, other processes "
                    f"{result['other_cpu']:.2f} CPU s",
                    flush=True,
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    reference = results[0]
    reference_wall = median_run(reference)["run"].seconds
    reference_hessians = reference[0]["run"].hessians
    rows = [
        make_row(name, budget, repeats, reference_wall, reference_hessians)
        for (name, budget, _), repeats in zip(runs, results, strict=True)
    ]
    print()
    cold = all(r["cold"] for repeats in results for r in repeats)
    report(
        "demo_budgets",
        rows,
        {
            "sizes": args.sizes,
            "cached_bytes": cached,
            "fractions": [str(f) for f in fractions],
            "reference_wall_s": reference_wall,
            "cold": cold,
            "torch_threads": torch.get_num_threads(),
        },
        publish=args.publish,
    )
    print(
        "MiB = 2^20 bytes; h/m = hits/misses (stats()); blk = bytes that reached the block "
        "layer (/proc/self/io); x RAM = wall / the all-in-RAM run's median wall"
    )
    if not cold:
        print("NOTE: not root: the page cache was not dropped before the runs")
    if any(not row["exact"] for row in rows):
        print("WARNING: a run's statistics differ from the all-in-RAM run's")


if __name__ == "__main__":
    main()
