"""How close does spilling through the cache come to the disk's own speed?

Writes N tensors of 16 MiB (bf16) through an IntermediatesCache whose host tier is 0
(every value goes to disk; ``flush()`` and ``sync`` inside the timed write), drops the
page cache, and fetches them all back with ``iter_prefetch``. The limit is the same
bytes as raw O_DIRECT files, written from and read into a page-aligned huge-page buffer
(a private anonymous mapping with MADV_HUGEPAGE, one per thread, made and touched
before any timing), on 1 thread and on 3 threads: per direction, the better of the two
medians. Every run does each of the four (raw 1 thread, raw 3 threads, the cache with
its default ``checksum = true``, the cache with ``checksum = false``) once, in an order
rotated from run to run, so that the disk's drift hits all of them alike; the cache's
ratio to the limit is printed against the 0.95 target, and what the CRC32C costs (the
two caches' medians) against a 3 % limit. Reads are
cold (``sync`` and ``echo 1 > /proc/sys/vm/drop_caches`` first; root only): the data
is read from the device, the file system's directory entries and inodes stay cached, as
they are in a run that wrote its store minutes before (``echo 3`` would also make each
of the cache's files cost a directory lookup on the device, where the raw files share
one directory).

Like the raw loop's buffer, the cache's buffers are made before the timed runs: a cache
of the same config stays open throughout, so every run's cache shares its pool (I/O
threads, staging and read buffers), as the caches of one long calibration do. The
first cache of the process pays for making them (fresh memory on these VMs is slow to
touch); that first round is timed and printed on a row of its own, outside the medians.

The cache runs with its defaults but a host tier of 0 (``host_bytes`` = 1 GiB, all of
it ``write_behind_bytes`` and ``read_buffer_bytes``: the pool's region holds only values
in transit) and ``inline_bytes = 0``;
``--io-threads`` and ``--prefetch-depth`` change two of them. A second table shows what
the block device saw in each phase (/sys/dev/block/<dev>/stat).

    python bench/disk_throughput.py [--total 2GiB] [--dir PATH] [--runs 5]
        [--io-threads N] [--prefetch-depth N]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import (
    GB,
    add_publish_option,
    drop_page_cache,
    median,
    raw_direct_read,
    raw_direct_write,
    report,
)
from spillcache import CacheConfig, IntermediatesCache
from spillcache.config import parse_size

TENSOR_SHAPE = (4096, 2048)  # 16 MiB of bf16
TARGET = 0.95
TRANSIT = 512 * 2**20  # the region's write-behind part and read part
RAW_THREADS = (1, 3)
CACHE = "cache"
UNCHECKED = "cache, checksum off"  # the same cache with checksum = false: what the CRC costs
CHECKSUM_COST_LIMIT = 0.03  # the most throughput checksums may cost


class Watch:
    """What a ``with`` block cost besides its time: CPU (in cores: CPU seconds per
    second) of this process and of every other one (the machine is shared: a phase
    whose cores others took measures less than the cache), and what the block device
    saw (/sys/dev/block/<dev>/stat): how busy it was, how many requests it held on
    average, their mean size, and the small reads among them (file system metadata)."""

    FIELDS = ("rd_ios", "rd_merges", "rd_sectors", "rd_ticks", "wr_ios", "wr_merges",
              "wr_sectors", "wr_ticks", "in_flight", "io_ticks", "time_in_queue")  # fmt: skip
    DEVICE_FIGURES = ("busy", "queue", "write_ios", "write_MiB_per_io", "read_ios",
                      "read_MiB_per_io")  # fmt: skip

    def __init__(self, directory: Path) -> None:
        device = os.stat(directory).st_dev
        self._stat = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat")

    def _device(self) -> dict[str, int]:
        try:
            values = [int(v) for v in self._stat.read_text().split()]
        except OSError:  # not a block device (tmpfs, overlay): no device figures
            return {}
        return dict(zip(self.FIELDS, values, strict=False))

    def __enter__(self) -> Watch:
        self._machine = _machine_busy()
        self._own = _own_cpu()
        self._disk = self._device()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        wall = time.perf_counter() - self._wall
        self.own = (_own_cpu() - self._own) / wall
        self.others = max(0.0, (_machine_busy() - self._machine) / wall - self.own)
        after = self._device()
        self.device: dict[str, float] = {}
        if self._disk and after:
            d = {k: after[k] - self._disk[k] for k in self.FIELDS if k != "in_flight"}
            ms = wall * 1e3
            self.device = {
                "busy": d["io_ticks"] / ms,
                "queue": d["time_in_queue"] / ms,  # mean requests in flight
                "write_ios": d["wr_ios"],
                "write_MiB_per_io": d["wr_sectors"] * 512 / max(d["wr_ios"], 1) / 2**20,
                "read_ios": d["rd_ios"],
                "read_MiB_per_io": d["rd_sectors"] * 512 / max(d["rd_ios"], 1) / 2**20,
            }


def _machine_busy() -> float:
    """CPU seconds all CPUs spent busy (not idle, not waiting for I/O) since boot."""
    with open("/proc/stat") as handle:
        fields = [int(f) for f in handle.readline().split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cache_round(config: CacheConfig, tensors: list[torch.Tensor], drop_metadata: bool) -> dict:
    paths = config.disk_path
    directory = Path(paths if isinstance(paths, str) else paths[0])  # the device watched
    with IntermediatesCache.empty(len(tensors), "cpu", config=config) as cache:
        os.sync()  # earlier work's writeback is not timed here
        with Watch(directory.parent) as cpu_write:
            start = time.perf_counter()
            for index, tensor in enumerate(tensors):
                cache.update(index, {"hidden": tensor})
            cache.flush()  # update does not wait for the disk: the background writes end here
            os.sync()  # and the bytes are on disk, not only in the page cache
            write = time.perf_counter() - start
        drop_page_cache(metadata=drop_metadata)
        with Watch(directory.parent) as cpu_read:
            start = time.perf_counter()
            for index, values in enumerate(cache.iter_prefetch(["hidden"])):
                assert values["hidden"].shape == tensors[index].shape
            read = time.perf_counter() - start
    return {"write": write, "read": read, "watch": {"write": cpu_write, "read": cpu_read}}


def raw_round(
    directory: Path, file_bytes: int, count: int, threads: int, drop_metadata: bool
) -> dict:
    os.sync()  # as raw_direct_write does first: earlier work's writeback is not watched
    with Watch(directory.parent) as cpu_write:
        write = raw_direct_write(directory, file_bytes, count, threads)
    drop_page_cache(metadata=drop_metadata)
    with Watch(directory.parent) as cpu_read:
        read = raw_direct_read(directory, file_bytes, count, threads)
    shutil.rmtree(directory)
    return {"write": write, "read": read, "watch": {"write": cpu_write, "read": cpu_read}}


def aligned_text(tensors: list[torch.Tensor]) -> str:
    """Where torch put the tensors: page-aligned ones are written without the staging
    copy (torch aligns large tensors to pages with THP_MEM_ALLOC_ENABLE=1)."""
    offsets = sorted({t.data_ptr() % 4096 for t in tensors})
    where = "page-aligned" if offsets == [0] else f"{offsets[0]} bytes into a page"
    thp = os.environ.get("THP_MEM_ALLOC_ENABLE", "unset")
    return f"{where} (THP_MEM_ALLOC_ENABLE={thp})"


def raw_name(threads: int) -> str:
    return f"raw {threads} thread{'s' if threads > 1 else ''}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", default="2GiB")
    parser.add_argument(
        "--dir", default=None, help="directory on the disk to test (default: $TMPDIR)"
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--drop-metadata",
        action="store_true",
        help="before reads, drop cached directory entries and inodes too (echo 3)",
    )
    parser.add_argument("--io-threads", type=int, default=CacheConfig.io_threads)
    parser.add_argument("--prefetch-depth", type=int, default=CacheConfig.prefetch_depth)
    add_publish_option(parser)
    args = parser.parse_args()

    tensor_bytes = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    count = max(1, parse_size("--total", args.total) // tensor_bytes)
    total = count * tensor_bytes
    base = Path(tempfile.mkdtemp(prefix="spillcache-bench-", dir=args.dir))
    cold = drop_page_cache()
    seed = torch.randint(-(2**15), 2**15, TENSOR_SHAPE, dtype=torch.int16).view(torch.bfloat16)
    tensors = [(seed.view(torch.int16) + i).view(torch.bfloat16) for i in range(count)]

    variants = [raw_name(t) for t in RAW_THREADS] + [CACHE, UNCHECKED]
    runs: list[dict[str, dict]] = []
    config = CacheConfig(
        # A region with no host tier: every value is copied into a slot, written to
        # disk from it and read back into one (host_bytes = 0 would map no region).
        host_bytes=2 * TRANSIT,
        write_behind_bytes=TRANSIT,
        read_buffer_bytes=TRANSIT,
        inline_bytes=0,
        disk_path=str(base / "cache"),
        io_threads=args.io_threads,
        prefetch_depth=args.prefetch_depth,
    )
    configs = {CACHE: config, UNCHECKED: config.replace(checksum=False)}
    # Keep the pools of caches of these configs (threads, staging and read buffers)
    # open between runs; they hold no values themselves.
    holders = [IntermediatesCache.empty(0, "cpu", config=c) for c in configs.values()]
    try:
        first = cache_round(config, tensors, args.drop_metadata)  # makes the pool's buffers
        cache_round(
            configs[UNCHECKED], tensors, args.drop_metadata
        )  # the same for the other pool, untimed
        print(
            f"first use: cache {total / first['write'] / GB:.2f} / "
            f"{total / first['read'] / GB:.2f} GB/s write / read (buffers made while timed)",
            flush=True,
        )
        for run in range(args.runs):
            shift = run % len(variants)
            order = variants[shift:] + variants[:shift]
            results = {}
            for name in order:
                if name in configs:
                    results[name] = cache_round(configs[name], tensors, args.drop_metadata)
                else:
                    threads = RAW_THREADS[variants.index(name)]
                    results[name] = raw_round(
                        base / "raw", tensor_bytes, count, threads, args.drop_metadata
                    )
            runs.append(results)
            print(
                f"run {run + 1}/{args.runs} ({', '.join(order)}): "
                + "; ".join(
                    f"{name} {total / results[name]['write'] / GB:.2f} / "
                    f"{total / results[name]['read'] / GB:.2f}"
                    for name in variants
                )
                + " GB/s write / read",
                flush=True,
            )
    finally:
        for holder in holders:
            holder.close()
        shutil.rmtree(base, ignore_errors=True)

    directions = ("write", "read")

    def gbs(name: str, direction: str) -> list[float]:
        return [total / results[name][direction] / GB for results in runs]

    def watched(name: str, direction: str, what) -> float:
        return median([what(results[name]["watch"][direction]) for results in runs])

    def cpu(name: str, which: str) -> str:
        return "/".join(f"{watched(name, d, lambda w: getattr(w, which)):.2f}" for d in directions)

    medians = {(name, d): median(gbs(name, d)) for name in variants for d in directions}
    raw_names = [raw_name(t) for t in RAW_THREADS]
    best = {d: max(raw_names, key=lambda n: medians[n, d]) for d in directions}
    limit = {d: medians[best[d], d] for d in directions}

    rows = []
    for name in variants:
        label = {
            CACHE: "IntermediatesCache (host tier 0)",
            UNCHECKED: "IntermediatesCache (host tier 0, checksum = false)",
        }.get(name, f"{name} (O_DIRECT)")
        rows.append(
            {
                "path": label,
                "write GB/s": medians[name, "write"],
                "read GB/s": medians[name, "read"],
                "write x raw": medians[name, "write"] / limit["write"],
                "read x raw": medians[name, "read"] / limit["read"],
                "write min-max": _spread(gbs(name, "write")),
                "read min-max": _spread(gbs(name, "read")),
                "own CPU w/r": cpu(name, "own"),
                "others' CPU w/r": cpu(name, "others"),
            }
        )
    first_gbs = {d: total / first[d] / GB for d in directions}
    rows.append(
        {
            "path": "IntermediatesCache, first use",
            "write GB/s": first_gbs["write"],
            "read GB/s": first_gbs["read"],
            "write x raw": first_gbs["write"] / limit["write"],
            "read x raw": first_gbs["read"] / limit["read"],
            "write min-max": "1 run",
            "read min-max": "1 run",
            "own CPU w/r": "/".join(f"{first['watch'][d].own:.2f}" for d in directions),
            "others' CPU w/r": "/".join(f"{first['watch'][d].others:.2f}" for d in directions),
        }
    )
    ratios = {d: medians[CACHE, d] / limit[d] for d in directions}
    # The same ratio run by run (the cache against that run's better raw figure): how far
    # the disk's drift moves it.
    paired = {
        d: [
            (total / results[CACHE][d]) / max(total / results[n][d] for n in raw_names)
            for results in runs
        ]
        for d in directions
    }
    verdicts = {d: "PASS" if ratios[d] >= TARGET else "MISS" for d in directions}
    # What the CRC32C costs: the checksummed cache's throughput against the same cache
    # without it, over the medians and run by run (both ran in every run).
    checksum_cost = {d: 1 - medians[CACHE, d] / medians[UNCHECKED, d] for d in directions}
    checksum_paired = {
        d: [results[UNCHECKED][d] / results[CACHE][d] for results in runs] for d in directions
    }
    checksum_verdicts = {
        d: "PASS" if checksum_cost[d] <= CHECKSUM_COST_LIMIT else "MISS" for d in directions
    }
    device = {
        name: {
            d: {
                key: watched(name, d, lambda w, key=key: w.device.get(key, math.nan))
                for key in Watch.DEVICE_FIGURES
            }
            for d in directions
        }
        for name in variants
    }
    reads = "WARM (cannot drop the page cache: not root)"
    if cold:
        reads = "cold (data and metadata)" if args.drop_metadata else "cold (data; metadata cached)"
    print(
        f"\n{count} tensors x {tensor_bytes >> 20} MiB = {total / GB:.2f} GB, median of "
        f"{args.runs} interleaved runs, {reads} page cache for reads; raw limit = the "
        f"better of {' and '.join(raw_names)} per direction; the cache with io_threads = "
        f"{args.io_threads}, prefetch_depth = {args.prefetch_depth}; the tensors start "
        f"{aligned_text(tensors)}; CPU: cores used by this process / by all others during "
        "the write / read (median)\n"
    )
    report(
        "disk_throughput",
        rows,
        {
            "total_bytes": total,
            "runs": args.runs,
            "io_threads": args.io_threads,
            "prefetch_depth": args.prefetch_depth,
            "cold_reads": cold,
            "cold_metadata": cold and args.drop_metadata,
            "target_ratio": TARGET,
            "raw_limit": {d: {"path": best[d], "GB/s": limit[d]} for d in limit},
            "ratio": ratios,
            "verdict": verdicts,
            "checksum_cost": checksum_cost,
            "checksum_cost_limit": CHECKSUM_COST_LIMIT,
            "checksum_verdict": checksum_verdicts,
            "checksum_per_run_throughput_ratio": checksum_paired,
            "per_run_ratio": paired,
            "first_use_seconds": {d: first[d] for d in directions},
            "per_run_seconds": [
                {name: {d: results[name][d] for d in directions} for name in variants}
                for results in runs
            ],
            "device": device,
        },
        publish=args.publish,
    )
    print(
        "\nthe device (medians): busy = share of the time it held a request; queue = "
        "requests held on average;\nMiB/io = mean request size; reads while writing = "
        "file system metadata"
    )
    for name in variants:
        w, r = device[name]["write"], device[name]["read"]
        print(
            f"  {name:14s} write: busy {w['busy']:.0%} queue {w['queue']:.1f} "
            f"{w['write_MiB_per_io']:.2f} MiB/io, {w['read_ios']:.0f} reads while writing; "
            f"read: busy {r['busy']:.0%} queue {r['queue']:.1f} {r['read_ios']:.0f} ios "
            f"of {r['read_MiB_per_io']:.2f} MiB"
        )
    print()
    for d in directions:
        print(
            f"{d:5s}: cache {medians[CACHE, d]:.2f} GB/s / raw {limit[d]:.2f} GB/s "
            f"({best[d]}) = {ratios[d]:.3f} x raw, target >= {TARGET:.2f}: {verdicts[d]}"
            f"  (run by run {min(paired[d]):.2f}-{max(paired[d]):.2f}, "
            f"median {statistics.median(paired[d]):.2f})"
        )
    for d in directions:
        print(
            f"{d:5s}: checksums cost {checksum_cost[d]:+.1%} of the cache's throughput "
            f"({medians[CACHE, d]:.2f} GB/s with, {medians[UNCHECKED, d]:.2f} GB/s without), "
            f"limit {CHECKSUM_COST_LIMIT:.0%}: {checksum_verdicts[d]}  (run by run, "
            f"with / without in time: {min(checksum_paired[d]):.3f}-"
            f"{max(checksum_paired[d]):.3f}, median {statistics.median(checksum_paired[d]):.3f})"
        )


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


if __name__ == "__main__":
    main()
