"""Do this machine's disk reads slow down when another core computes checksums?

A CRC32C of every byte read costs CPU: about 0.35 of a core at 5 GB/s. Whether that
can be hidden depends on the machine as much as on the cache. This benchmark takes
the cache out: raw O_DIRECT reads (one thread, one ``preadv`` per 16 MiB file, cold
page cache) of N files, alone, and again while a second thread computes CRC32Cs over
memory of its own, unrelated to the reads: one CRC of 16 MiB for each file read, the
work the cache does per chunk (the interpreter's lock released, as the cache computes
them). Runs alternate; medians of ``--runs``. The ratio of the two is how much the
disk reads lose to a checksum that shares nothing with them but the machine.

    python bench/reads_beside_a_checksum.py [--files 48] [--runs 5] [--dir PATH]
        [--publish NAME]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch

from common import GB, add_publish_option, drop_page_cache, median, report
from spillcache._internal.io import buffers, chunkio
from spillcache._internal.store import store_format

FILE_BYTES = 16 * 2**20


def read_all(paths: list[Path], out: torch.Tensor, landed: threading.Semaphore | None) -> float:
    """GB/s of reading every file cold, one after another, each in one preadv; each
    file read is announced on ``landed``."""
    drop_page_cache()
    start = time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        try:
            read = os.preadv(fd, [memoryview(out.numpy())], 0)
        finally:
            os.close(fd)
        assert read == FILE_BYTES, (path, read)
        if landed is not None:
            landed.release()
    return len(paths) * FILE_BYTES / (time.perf_counter() - start) / GB


def checksum_each(landed: threading.Semaphore, count: int, other: torch.Tensor) -> None:
    """For each file announced, a CRC32C of 16 MiB of memory of its own: the cache's
    work per file read, on data that shares nothing with the reads."""
    for _ in range(count):
        landed.acquire()
        store_format.crc32c(other)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory on the disk to test")
    add_publish_option(parser)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="spillcache-bench-", dir=args.dir))
    out = buffers.aligned_empty(FILE_BYTES)
    other = buffers.aligned_empty(FILE_BYTES)  # the checksum thread's own memory
    other.copy_(torch.randint(0, 256, other.shape, dtype=torch.uint8))
    alone, beside = [], []
    try:
        paths = []
        for index in range(args.files):
            data = torch.randint(0, 256, (FILE_BYTES,), dtype=torch.uint8)
            paths.append(base / f"f{index}")
            chunkio.write_file(paths[-1], data, direct=True, staging=None)
        os.sync()
        for run in range(args.runs):
            alone.append(read_all(paths, out, None))
            landed = threading.Semaphore(0)
            worker = threading.Thread(target=checksum_each, args=(landed, len(paths), other))
            worker.start()
            try:
                beside.append(read_all(paths, out, landed))
            finally:
                worker.join()
            print(
                f"run {run + 1}/{args.runs}: reads {alone[-1]:.2f} GB/s alone, "
                f"{beside[-1]:.2f} GB/s beside a CRC32C of 16 MiB per file",
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    paired = [b / a for a, b in zip(alone, beside, strict=True)]
    rows = [
        {"reads": "alone", "GB/s": median(alone), "x alone": 1.0, "run by run": "-"},
        {
            "reads": "beside a checksum thread",
            "GB/s": median(beside),
            "x alone": median(beside) / median(alone),
            "run by run": f"{min(paired):.3f}-{max(paired):.3f}",
        },
    ]
    print(
        f"\n{args.files} files x 16 MiB, cold, O_DIRECT, one thread; beside: a second "
        f"thread computes a CRC32C of 16 MiB of its own memory per file read; median of "
        f"{args.runs} alternating runs\n"
    )
    report(
        "reads_beside_a_checksum",
        rows,
        {"files": args.files, "runs": args.runs, "alone": alone, "beside": beside},
        publish=args.publish,
    )  # fmt: skip


if __name__ == "__main__":
    main()
