"""How much does spilling slow a sequential calibration, and does "scan" beat LRU?

A simulated llm-compressor sequential calibration: N batches of one bf16 hidden state,
L subgraphs, each a calibration pass (observe every batch) and a propagation pass
(output = input + bias, a new tensor per batch, replacing the input). A float32 matmul
per batch stands in for the model's work, in two modes:

- covered:  compute per batch >= the batch's disk time at raw bandwidth (read + write);
            target: wall <= 1.05x the all-in-RAM run.
- io-bound: no compute; target: wall <= 1.15x max(I/O floor, all-in-RAM wall), where
            I/O floor = disk.bytes_read / raw read + disk.bytes_written / raw write
            (the run's own stats, raw O_DIRECT bandwidth measured in this run).

Runs per mode: all in RAM (no disk tier), then a host tier of 100%, 50%, 25% of the
cached bytes with eviction "lru" and "scan". Each checks its final activations and
observed statistics bit for bit against the all-in-RAM run.

Ideal floor (the best policy, Belady's on this cyclic scan), host tier of C of N batches:
keep the C batches read soonest, i.e. 0..C-1. The fill writes N-C batches. A calibration
pass hits 0..C-1 and reads N-C. In the propagation pass batches 0..C-1 are hits and their
outputs take their inputs' places; every later output must be written (the host is full
of values needed sooner) and every later input read: N-C reads and N-C writes. So
reads = 2L(N-C) and writes = (L+1)(N-C) batches. LRU misses every read of a cyclic scan
larger than the cache (2LN reads), so scan/LRU read bytes should be about 1 - C/N;
"rd/ideal" compares a run's reads with the optimal policy's directly.

Each configuration runs --repeats times, interleaved in a shuffled order; a row is the
run of median wall time ("spread": slowest / fastest). "blk" columns are the bytes that
/proc/self/io saw reach the block layer: far below the stats' disk bytes, the page cache
served the "disk" reads, and the I/O floor is no limit. --compute-ms auto is 1.2x one
batch's read + write at raw bandwidth.

    python bench/calibration_sim.py [--batches 64] [--seq 2048] [--hidden 4096]
        [--layers 2] [--host-fractions 1,0.5,0.25] [--policies lru,scan]
        [--modes covered,io-bound] [--compute-ms auto] [--repeats 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import (
    GB,
    Compute,
    add_publish_option,
    cache_figures,
    drop_page_cache,
    first_touch_bandwidth,
    hidden_bytes,
    layer_biases,
    make_base,
    make_hidden,
    proc_io,
    ratio,
    raw_bandwidth,
    report,
    sequential_calibration,
    verdict,
)
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.cli.plan import host_bytes_for_tier

TARGET_RAM, TARGET_LIMIT, TARGET_READS = 1.05, 1.15, 0.05  # the last: |ratio - (1-C/N)|


def run_once(config, args, compute, base, biases) -> dict:
    """One timed calibration (fill included: it is the pipeline's first pass)."""
    drop_page_cache()  # no run inherits another's page cache
    gc.collect()
    compute.seconds, compute.calls = 0.0, 0
    observed = []

    def observe(k, hidden):
        compute()
        low, high = torch.aminmax(hidden)  # an observer: reads all of the input
        observed.append((low.item(), high.item()))

    def layer(k, hidden):
        compute()
        return hidden + biases[k]

    io_before = proc_io()
    start = time.perf_counter()
    with IntermediatesCache.empty(args.batches, offload_device="cpu", config=config) as cache:
        for b in range(args.batches):
            cache.update(b, {"hidden": make_hidden(base, b)})
        sequential_calibration(cache, args.layers, observe, layer)
        wall = time.perf_counter() - start
        io_after = proc_io()
        figures = cache_figures(cache.stats())
        # Outside the timed region: the bits of every final activation and observation.
        digest = hashlib.sha1(repr(observed).encode())
        for b in range(args.batches):
            digest.update(cache.fetch(b, ["hidden"])["hidden"].view(torch.int16).numpy())
    return {
        "wall": wall,
        "compute_ms": compute.achieved_ms,
        "block_read": io_after["read_bytes"] - io_before["read_bytes"],
        "block_written": io_after["write_bytes"] - io_before["write_bytes"],
        "digest": digest.hexdigest(),
        **figures,
    }


def run_mode(mode: str, args, base, biases, spill_dir: Path) -> tuple[list[dict], dict]:
    """The all-in-RAM run, then every host fraction x policy; one row per configuration."""
    wanted_ms = 0.0
    if mode == "covered":
        auto = args.compute_ms == "auto"
        wanted_ms = 1.2 * args.batch_io_ms if auto else float(args.compute_ms)
    compute = Compute(wanted_ms, args.threads)
    runs = [("all-in-RAM", None, args.ram_config)]
    for fraction in (float(f) for f in args.host_fractions.split(",")):
        for policy in args.policies.split(","):
            try:
                config = CacheConfig(
                    # A host tier of this share of the cached bytes: host_bytes holds it
                    # and the parts for values in transit.
                    host_bytes=host_bytes_for_tier(int(fraction * args.total), args.write_behind),
                    disk_path=str(spill_dir),
                    inline_bytes=0,
                    prefetch_depth=args.prefetch_depth,
                    io_threads=args.io_threads,
                    write_behind_bytes=args.write_behind,
                    eviction=policy,
                )
            except ValueError as error:  # a policy this version lacks
                print(f"  skipped {policy} at {fraction:.0%}: {error}")
                continue
            runs.append((policy, fraction, config))
    results = [[] for _ in runs]
    order = random.Random(0)
    for _ in range(args.repeats):
        # Interleaved, so the VM's drift hits every configuration alike, and shuffled: a
        # run that follows a small-memory run pays for fresh pages (see first_touch_bandwidth).
        for index in order.sample(range(len(runs)), len(runs)):
            results[index].append(run_once(runs[index][2], args, compute, base, biases))
    done = []
    for (policy, fraction, _), repeats in zip(runs, results, strict=True):
        run = dict(sorted(repeats, key=lambda r: r["wall"])[len(repeats) // 2])  # median wall
        run["walls"] = [r["wall"] for r in repeats]
        run["digests"] = {r["digest"] for r in repeats}
        done.append((policy, fraction, run))
    ram = done[0][2]
    print(f"{mode}: compute {wanted_ms:.1f} ms/batch wanted, {ram['compute_ms']:.1f} achieved")
    lru_runs = {fraction: run for policy, fraction, run in done if policy == "lru"}
    rows = []
    for policy, fraction, run in done:
        lru = lru_runs.get(fraction) if policy not in ("lru", "all-in-RAM") else None
        rows.append(make_row(mode, policy, fraction, run, ram, lru, args))
    return rows, {"compute_ms_wanted": wanted_ms, "compute_ms_in_ram": ram["compute_ms"]}


def gb(value):
    return None if value is None else value / GB


def make_row(mode, policy, fraction, result, ram, lru, args) -> dict:
    n, size = args.batches, args.batch_bytes
    c = n if fraction is None else min(n, int(fraction * args.total) // size)
    floor = ideal = None
    if result["disk_read"] is not None and result["disk_written"] is not None:
        floor = result["disk_read"] / args.read_bw + result["disk_written"] / args.write_bw
    if fraction is not None:  # the optimal policy's bytes; see the module docstring
        ideal = 2 * args.layers * (n - c) * size / args.read_bw
        ideal += (args.layers + 1) * (n - c) * size / args.write_bw
    reads_vs_lru = ratio(result["disk_read"], lru["disk_read"]) if lru else None
    ideal_reads = None if fraction is None else 2 * args.layers * (n - c) * size
    targets = []
    if fraction is not None and mode == "covered":
        targets.append(f"<={TARGET_RAM}xRAM {verdict(result['wall'] / ram['wall'], TARGET_RAM)}")
    if fraction is not None and mode != "covered":
        # The run can beat neither limit: the disk's, nor the work without any disk.
        limit = None if floor is None else max(floor, ram["wall"])
        targets.append(
            f"<={TARGET_LIMIT}xlimit {verdict(ratio(result['wall'], limit), TARGET_LIMIT)}"
        )
    if lru is not None:
        off = None if reads_vs_lru is None else abs(reads_vs_lru - (1 - c / n))
        targets.append(f"reads {verdict(off, TARGET_READS)}")
    return {
        "mode": mode,
        "policy": policy,
        "host %": None if fraction is None else round(100 * fraction),
        "wall s": result["wall"],
        "x RAM": result["wall"] / ram["wall"],
        "floor s": floor,
        "x floor": ratio(result["wall"], floor),
        "ideal s": ideal,
        "rd GB": gb(result["disk_read"]),
        "wr GB": gb(result["disk_written"]),
        "blk rd GB": gb(result["block_read"]),
        "blk wr GB": gb(result["block_written"]),
        "stall s": result["stall_s"],
        "hits": result["host_hits"],
        "misses": result["host_misses"],
        "rd/lru": reads_vs_lru,
        "1-C/N": None if fraction is None else 1 - c / n,
        "rd/ideal": ratio(result["disk_read"], ideal_reads),
        "cmp ms": result["compute_ms"],
        "spread": max(result["walls"]) / min(result["walls"]),
        "exact": result["digests"] == {ram["digest"]},
        "targets": "; ".join(targets) or "-",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--host-fractions", default="1,0.5,0.25")
    parser.add_argument("--policies", default="lru,scan")
    parser.add_argument("--modes", default="covered,io-bound")
    parser.add_argument("--compute-ms", default="auto", help="covered mode (auto: 1.2x raw I/O)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the compute")
    parser.add_argument("--prefetch-depth", type=int, default=2)
    parser.add_argument("--io-threads", type=int, default=CacheConfig.io_threads)
    parser.add_argument("--write-behind", default=CacheConfig.write_behind_bytes)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration")
    parser.add_argument("--raw-runs", type=int, default=3)
    parser.add_argument("--dir", default=None, help="directory on the disk to spill to")
    add_publish_option(parser)
    args = parser.parse_args()

    shape = (1, args.seq, args.hidden)
    args.batch_bytes = hidden_bytes(shape)
    args.total = args.batch_bytes * args.batches
    args.ram_config = CacheConfig(host_bytes=4 * args.total, disk_path=None)
    work = Path(tempfile.mkdtemp(prefix="spillcache-calib-", dir=args.dir))
    try:
        args.write_bw, args.read_bw = raw_bandwidth(
            work / "raw", args.batch_bytes, args.total, args.raw_runs
        )
        args.batch_io_ms = 1e3 * (
            args.batch_bytes / args.read_bw + args.batch_bytes / args.write_bw
        )
        print(
            f"{args.batches} batches x {args.batch_bytes / 2**20:.0f} MiB = "
            f"{args.total / GB:.2f} GB, {args.layers} subgraphs; raw O_DIRECT write "
            f"{args.write_bw / GB:.2f} GB/s, read {args.read_bw / GB:.2f} GB/s; "
            f"one batch's read + write at raw: {args.batch_io_ms:.1f} ms"
        )
        fresh_bw, again_bw = first_touch_bandwidth(args.total)
        print(
            f"memory: fresh pages {fresh_bw / GB:.2f} GB/s, touched again {again_bw / GB:.2f} GB/s"
        )
        base, biases = make_base(shape), layer_biases(args.layers, args.hidden)
        # An untimed warm-up: the first run would pay alone for the process's first touch
        # of ~total bytes of fresh pages (slow on these VMs) and for torch's lazy setup.
        run_once(args.ram_config, args, Compute(0, args.threads), base, biases)
        rows, modes = [], {}
        for mode in args.modes.split(","):
            mode_rows, modes[mode] = run_mode(mode, args, base, biases, work)
            rows += mode_rows
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print()
    extra = {k: getattr(args, k) for k in ("batches", "layers", "batch_bytes", "total")}
    extra.update(shape=list(shape), raw_write_Bps=args.write_bw, raw_read_Bps=args.read_bw)
    extra.update(fresh_page_Bps=fresh_bw, retouch_Bps=again_bw)
    extra.update(modes=modes, targets=[TARGET_RAM, TARGET_LIMIT, TARGET_READS])
    report("calibration_sim", rows, extra, publish=args.publish)
    print(
        f"targets: covered wall <= {TARGET_RAM}x RAM; io-bound wall <= {TARGET_LIMIT}x "
        f"max(floor, RAM); scan reads / LRU reads within {TARGET_READS} of 1 - C/N\n"
        "GB = 1e9 bytes; blk = bytes that reached the block layer (/proc/self/io)"
    )
    cached = [r for r in rows if r["rd GB"]]
    if cached and sum(r["blk rd GB"] for r in cached) < 0.5 * sum(r["rd GB"] for r in cached):
        print(
            "NOTE: most 'disk' reads never reached the block layer: the page cache served "
            "them (RAM >> cached bytes here), so a run can beat its I/O floor"
        )
    if any(r["rd GB"] is None for r in rows if r["host %"] is not None):
        print("WARNING: stats() lacks disk bytes / hits / stall_seconds: no floors computed")


if __name__ == "__main__":
    main()
