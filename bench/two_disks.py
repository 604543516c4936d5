"""Does a second disk directory add bandwidth? (``disk_path`` as a list, one per drive)

Writes N tensors of 16 MiB (bf16) through a cache whose host tier is 0, and reads them
back cold with ``iter_prefetch`` (``disk_throughput.cache_round``, buffers made by an
untimed first round), once with
``disk_path`` = the first directory and once with both. The limits are raw O_DIRECT
files from huge-page buffers, 3 threads per directory: into the first directory alone,
and into both at once (half the files each). Runs are interleaved; medians.

What the drives allow is ``raw both / raw one``: about 2 on two NVMe drives, about 1
where both directories are on one device (then no cache can gain, and the figure to
read is ``cache both / raw both``: spreading costs nothing). The script says which.

    python bench/two_disks.py --dirs /nvme0/spill,/nvme1/spill [--total 1GiB] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
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
from disk_throughput import TENSOR_SHAPE, cache_round
from spillcache import CacheConfig, IntermediatesCache
from spillcache.config import parse_size

RAW_THREADS = 3


def raw_round(directories: list[Path], file_bytes: int, count: int) -> dict:
    """The same bytes as raw files, split evenly over ``directories``, all at once."""
    shares = [
        count // len(directories) + (i < count % len(directories)) for i in range(len(directories))
    ]

    def on_every_directory(job) -> float:
        seconds: list[float] = []
        threads = [
            threading.Thread(
                target=lambda d=d, n=n: seconds.append(job(d, file_bytes, n, RAW_THREADS))
            )
            for d, n in zip(directories, shares, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return max(seconds)  # all directories together: done when the last one is

    os.sync()
    write = on_every_directory(raw_direct_write)
    drop_page_cache()
    read = on_every_directory(raw_direct_read)
    for directory in directories:
        shutil.rmtree(directory)
    return {"write": write, "read": read}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dirs", default=None, help="two directories, comma-separated")
    parser.add_argument("--total", default="1GiB")
    parser.add_argument("--runs", type=int, default=3)
    add_publish_option(parser)
    args = parser.parse_args()

    if args.dirs:
        roots = [Path(d) for d in args.dirs.split(",")]
    else:  # two directories of $TMPDIR: one device, so this shows the cost, not a gain
        roots = [Path(tempfile.gettempdir()) / name for name in ("disk-a", "disk-b")]
    if len(roots) != 2:
        raise SystemExit("--dirs takes two directories, comma-separated")
    made = [root for root in roots if not root.exists()]  # removed again at the end
    bases = [Path(tempfile.mkdtemp(prefix="spillcache-bench-", dir=_made(root))) for root in roots]
    one_device = os.stat(bases[0]).st_dev == os.stat(bases[1]).st_dev

    tensor_bytes = TENSOR_SHAPE[0] * TENSOR_SHAPE[1] * 2
    count = max(2, parse_size("--total", args.total) // tensor_bytes)
    total = count * tensor_bytes
    seed = torch.randint(-(2**15), 2**15, TENSOR_SHAPE, dtype=torch.int16).view(torch.bfloat16)
    tensors = [(seed.view(torch.int16) + i).view(torch.bfloat16) for i in range(count)]

    plans = {
        "raw, first directory": lambda: raw_round([bases[0] / "raw"], tensor_bytes, count),
        "raw, both at once": lambda: raw_round([b / "raw" for b in bases], tensor_bytes, count),
        "cache, first directory": lambda: cache_round(spill_to([bases[0]]), tensors),
        "cache, both": lambda: cache_round(spill_to(bases), tensors),
    }
    seconds: dict[str, dict[str, list[float]]] = {n: {"write": [], "read": []} for n in plans}
    # As in disk_throughput.py: a cache of each config stays open, so that every timed
    # round uses its pool's buffers, made (and touched) by an untimed first round.
    witnesses = [IntermediatesCache(config=spill_to(b)) for b in ([bases[0]], bases)]
    for witness in witnesses:
        cache_round(witness.config, tensors)
    try:
        for run in range(args.runs):
            names = list(plans)
            names = names[run % len(names) :] + names[: run % len(names)]
            for name in names:
                result = plans[name]()
                for direction in ("write", "read"):
                    seconds[name][direction].append(result[direction])
            print(f"run {run + 1}/{args.runs} done", flush=True)
    finally:
        for witness in witnesses:
            witness.close()
        for base in bases:
            shutil.rmtree(base, ignore_errors=True)
        for root in made:
            root.rmdir()

    def rate(name: str, direction: str) -> float:
        return total / median(seconds[name][direction]) / GB

    rows = [
        {"path": name, "write GB/s": rate(name, "write"), "read GB/s": rate(name, "read")}
        for name in plans
    ]
    ratios = {
        "ratio: drives allow (raw both / raw one)": ("raw, both at once", "raw, first directory"),
        "ratio: cache gains (cache both / cache one)": ("cache, both", "cache, first directory"),
        "ratio: cache both / raw both": ("cache, both", "raw, both at once"),
    }
    for label, (top, bottom) in ratios.items():
        rows.append(
            {
                "path": label,
                "write GB/s": rate(top, "write") / rate(bottom, "write"),
                "read GB/s": rate(top, "read") / rate(bottom, "read"),
            }
        )
    where = (
        "both directories are on ONE device: no gain is possible here"
        if one_device
        else "the directories are on different devices"
    )
    print(
        f"\n{count} tensors x 16 MiB = {total / GB:.2f} GB, median of {args.runs} runs; {where}\n"
    )
    extra = {"total_bytes": total, "runs": args.runs, "one_device": one_device}
    report("two_disks", rows, extra, publish=args.publish)


def spill_to(bases: list[Path]) -> CacheConfig:
    paths = [str(base / "cache") for base in bases]
    return CacheConfig(host_bytes=0, inline_bytes=0, disk_path=paths)


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    main()
