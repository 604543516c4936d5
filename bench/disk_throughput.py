"""How close does spilling through the cache come to the disk's own speed?

Writes N tensors of 16 MiB (bf16) through an IntermediatesCache whose host tier is 0
(every value goes to disk), syncs, drops the page cache, and fetches them all back;
then does the same bytes with raw O_DIRECT files. Prints GB/s and the ratio to raw.

    python bench/disk_throughput.py [--total 2GiB] [--dir PATH] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import GB, drop_page_cache, median, raw_direct_read, raw_direct_write, report
from spillcache import CacheConfig, IntermediatesCache
from spillcache.config import parse_size

TENSOR_SHAPE = (4096, 2048)  # 16 MiB of bf16


def cache_round(directory: Path, tensors: list[torch.Tensor]) -> tuple[float, float]:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(directory), prefetch_depth=2)
    with IntermediatesCache.empty(len(tensors), config=config) as cache:
        start = time.perf_counter()
        for index, tensor in enumerate(tensors):
            cache.update(index, {"hidden": tensor})
        cache.flush()  # update does not wait for the disk: the background writes end here
        os.sync()  # and the bytes are on disk, not only in the page cache
        write = time.perf_counter() - start
        drop_page_cache()
        start = time.perf_counter()
        for index, values in enumerate(cache.iter_prefetch(["hidden"])):
            assert values["hidden"].shape == tensors[index].shape
        read = time.perf_counter() - start
    return write, read


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--total", default="2GiB")
    parser.add_argument(
        "--dir", default=None, help="directory on the disk to test (default: $TMPDIR)"
    )
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    tensor_bytes = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    count = max(1, parse_size("--total", args.total) // tensor_bytes)
    total = count * tensor_bytes
    base = Path(tempfile.mkdtemp(prefix="spillcache-bench-", dir=args.dir))
    cold = drop_page_cache()
    seed = torch.randint(-(2**15), 2**15, TENSOR_SHAPE, dtype=torch.int16).view(torch.bfloat16)
    tensors = [(seed.view(torch.int16) + i).view(torch.bfloat16) for i in range(count)]

    raw_w, raw_r, cache_w, cache_r = [], [], [], []
    try:
        for _ in range(args.runs):
            raw_w.append(raw_direct_write(base / "raw", tensor_bytes, count))
            drop_page_cache()
            raw_r.append(raw_direct_read(base / "raw", tensor_bytes, count))
            shutil.rmtree(base / "raw")
            write, read = cache_round(base / "cache", tensors)
            cache_w.append(write)
            cache_r.append(read)
    finally:
        shutil.rmtree(base, ignore_errors=True)

    raw_write_gbs, raw_read_gbs = total / median(raw_w) / GB, total / median(raw_r) / GB
    cache_write_gbs, cache_read_gbs = total / median(cache_w) / GB, total / median(cache_r) / GB
    rows = [
        {
            "path": "raw O_DIRECT",
            "write GB/s": raw_write_gbs,
            "read GB/s": raw_read_gbs,
            "write x raw": 1.0,
            "read x raw": 1.0,
        },
        {
            "path": "IntermediatesCache (host 0)",
            "write GB/s": cache_write_gbs,
            "read GB/s": cache_read_gbs,
            "write x raw": cache_write_gbs / raw_write_gbs,
            "read x raw": cache_read_gbs / raw_read_gbs,
        },
    ]
    reads = "cold" if cold else "WARM (cannot drop the page cache: not root)"
    print(
        f"{count} tensors x {tensor_bytes >> 20} MiB = {total / GB:.2f} GB, "
        f"median of {args.runs} runs, {reads} page cache for reads\n"
    )
    report(
        "disk_throughput",
        rows,
        {"total_bytes": total, "runs": args.runs, "cold_reads": cold, "target_ratio": 0.9},
    )


if __name__ == "__main__":
    main()
