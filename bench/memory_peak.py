"""Does the cache keep to its host budget? Peak RSS while cached bytes are 8x the budget.

Each host budget runs in a fresh subprocess: the sequential-calibration access pattern
(common.sequential_calibration: a calibration pass and a propagation pass per subgraph,
no compute) over --total bytes of bf16 hidden states, each batch made on the fly so the
benchmark itself never holds the data. The child resets its RSS high-water mark
(VmHWM, via /proc/self/clear_refs) after its own setup, so

    peak - baseline = what the cache and the loop added at their worst,

which is compared with the host budget: ratio = (peak - baseline) / budget, and
excess = peak - baseline - budget (the fixed overhead). The page cache is not in RSS;
pages of files mapped into the process are (RssFile is shown at the end of the loop).
For scale, the loop itself holds about (2 + prefetch_depth) batches at a time: the
input, the output being made, and the batches prefetched ahead. "fill added" is the peak
reached by the time every batch has been stored once (update() at full speed).

glibc keeps freed memory in its arenas, which RSS counts, so each budget also runs with
MALLOC_MMAP_THRESHOLD_=1048576 ("mmap" rows): every block over 1 MiB is then its own
mapping, returned on free. The difference between the two rows is the allocator's.

    python bench/memory_peak.py [--budgets 256MiB,0] [--total 2GiB] [--seq 2048]
        [--hidden 4096] [--layers 2] [--prefetch-depth 2] [--eviction lru]
        [--malloc default,mmap] [--dir PATH]
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import (
    add_publish_option,
    cache_figures,
    hidden_bytes,
    layer_biases,
    make_base,
    make_hidden,
    proc_status,
    report,
    reset_peak_rss,
    sequential_calibration,
    verdict,
)
from spillcache import CacheConfig, IntermediatesCache
from spillcache.config import parse_size

MiB = 2**20


def child(spec: dict) -> dict:
    """Runs in the fresh process: set up, reset the high-water mark, run, measure."""
    torch.set_num_threads(1)
    shape = (1, spec["seq"], spec["hidden"])
    batches = spec["total"] // hidden_bytes(shape)
    base, biases = make_base(shape), layer_biases(spec["layers"], spec["hidden"])
    # Run each kernel of the loop once, so their one-time setup lands in the baseline.
    warm = (base + biases[0], torch.aminmax(base))
    del warm
    config = CacheConfig(
        host_bytes=spec["host"],
        disk_path=spec["dir"],
        inline_bytes=0,
        prefetch_depth=spec["prefetch_depth"],
        eviction=spec["eviction"],
        write_behind_bytes=spec["write_behind"],
        read_buffer_bytes=spec["read_buffer"],
    )
    gc.collect()
    baseline = proc_status()["VmRSS"]
    hwm_reset = reset_peak_rss()
    start = time.perf_counter()
    with IntermediatesCache.empty(batches, offload_device="cpu", config=config) as cache:
        for b in range(batches):
            cache.update(b, {"hidden": make_hidden(base, b)})
        fill_peak = proc_status()["VmHWM"]  # the fill alone: write-behind at full speed
        sequential_calibration(
            cache,
            spec["layers"],
            observe=lambda k, hidden: torch.aminmax(hidden),
            layer=lambda k, hidden: hidden + biases[k],
        )
        at_end = proc_status()
        figures = cache_figures(cache.stats())
    wall = time.perf_counter() - start
    status = proc_status()
    return {
        "batches": batches,
        "baseline": baseline,
        "peak": status["VmHWM"],  # read after close(): its work counts too
        "fill_peak": fill_peak,
        "hwm_reset": hwm_reset,
        "rss_end": at_end["VmRSS"],
        "rss_file_end": at_end.get("RssFile"),
        "rss_after_close": status["VmRSS"],
        "wall": wall,
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", default="256MiB,0", help="host budgets, one process each")
    parser.add_argument("--total", default="2GiB", help="cached bytes (8x the first budget)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--eviction", default=CacheConfig.eviction)
    parser.add_argument("--write-behind", default=str(CacheConfig.write_behind_bytes))
    parser.add_argument("--read-buffer", default=str(CacheConfig.read_buffer_bytes))
    parser.add_argument("--malloc", default="default,mmap", help="glibc settings to run")
    parser.add_argument("--dir", default=None, help="directory on the disk to spill to")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_publish_option(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    batch = hidden_bytes((1, args.seq, args.hidden))
    work = Path(tempfile.mkdtemp(prefix="spillcache-mem-", dir=args.dir))
    rows = []
    try:
        for text, malloc in itertools.product(args.budgets.split(","), args.malloc.split(",")):
            host = parse_size("--budgets", text)
            env = dict(os.environ)
            if malloc == "mmap":
                env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
            spec = {
                "host": host,
                "total": parse_size("--total", args.total),
                "seq": args.seq,
                "hidden": args.hidden,
                "layers": args.layers,
                "prefetch_depth": args.prefetch_depth,
                "eviction": args.eviction,
                "write_behind": parse_size("--write-behind", args.write_behind),
                "read_buffer": parse_size("--read-buffer", args.read_buffer),
                "dir": str(work),
            }
            done = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                env=env,
            )
            if done.returncode != 0:
                print(f"budget {text}, malloc {malloc}: the child failed:\n{done.stderr[-3000:]}")
                continue
            result = json.loads(done.stdout.splitlines()[-1])
            rows.append(make_row(host, malloc, batch, spec, result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not rows:
        sys.exit("no run finished")

    print(
        f"{args.total} cached in batches of {batch / MiB:.0f} MiB, {args.layers} subgraphs, "
        f"eviction {args.eviction}; MiB = 2**20 bytes\n"
    )
    extra = {
        "batch_bytes": batch,
        "total": args.total,
        # The table states the write-behind and read-buffer budgets each run had.
        "write_behind_bytes": parse_size("--write-behind", args.write_behind),
        "read_buffer_bytes": parse_size("--read-buffer", args.read_buffer),
    }
    report("memory_peak", rows, extra, publish=args.publish)
    if not all(r["hwm reset"] for r in rows):
        print("NOTE: VmHWM could not be reset: the peak may predate the cache")


def stated_overhead(spec: dict, batch: int) -> int:
    """The fixed overhead docs/benchmarks.md states, beyond the host budget: values
    waiting for their disk write, kept read buffers, one staging buffer per I/O thread,
    one update's values past the write-behind budget, and the loop's own working set
    (its input and output, and the batches prefetched ahead)."""
    staging = CacheConfig.io_threads * 8 * MiB
    loop = (2 + spec["prefetch_depth"]) * batch
    return spec["write_behind"] + spec["read_buffer"] + staging + batch + loop


def make_row(host: int, malloc: str, batch: int, spec: dict, result: dict) -> dict:
    added = result["peak"] - result["baseline"]
    bound = host + stated_overhead(spec, batch)
    return {
        "host MiB": host / MiB,
        "malloc": malloc,
        "cached MiB": result["batches"] * batch / MiB,
        "baseline MiB": result["baseline"] / MiB,
        "peak MiB": result["peak"] / MiB,
        "added MiB": added / MiB,
        "fill added MiB": (result["fill_peak"] - result["baseline"]) / MiB,
        "added/host": added / host if host else None,
        "excess MiB": (added - host) / MiB,
        "bound MiB": bound / MiB,
        "added/bound": added / bound,
        "within": verdict(added / bound, 1.0),
        "end RSS MiB": result["rss_end"] / MiB,
        "end file MiB": None if result["rss_file_end"] is None else result["rss_file_end"] / MiB,
        "closed MiB": result["rss_after_close"] / MiB,
        "disk wr GB": None if result["disk_written"] is None else result["disk_written"] / 1e9,
        "wall s": result["wall"],
        "hwm reset": result["hwm_reset"],
    }


if __name__ == "__main__":
    main()
