"""What each step of a chunk write costs against the raw O_DIRECT loop.

Writes N files of 16 MiB from one page-aligned huge-page buffer (``common.
huge_page_buffer``) in several ways, each timed from the first open to the ``sync``
after the last close, in rounds whose order rotates so that the disk's drift hits all
of them alike; medians over rounds, each as a ratio to the raw loop's median:

- raw: open, one 16 MiB ``pwrite`` (O_DIRECT), close: the limit bench/disk_throughput.py
  uses;
- raw, sized first: the same with the file's blocks allocated first (``fallocate``);
- raw, 4 MiB pieces: four synchronous 4 MiB writes;
- write_file: ``chunkio.write_file`` as the cache calls it (a ``.partial`` file, sized
  first, its pages queued as 4 MiB native AIO pieces, renamed into place), no trailer;
- write_file + CRC trailer: the same with a 4-byte trailer (the last page written
  buffered, as a checked chunk's CRC32C is);
- write_file + array: each chunk in a directory of its own beside a small zarr.json, as
  the store lays out an array;
- write_file, 3 threads: the trailer case on three threads, as the cache's write lanes.

No cache, no checksum computed: what the file system and the device make of each step.

    python bench/write_steps.py [--count 128] [--rounds 3] [--dir PATH]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from common import add_publish_option, huge_page_buffer, median, report
from spillcache._internal.io import chunkio

FILE_BYTES = 16 * 2**20
TRAILER = b"\0\1\2\3"
ARRAY_METADATA = "{" + " " * 600 + "}"  # about the size of an array's zarr.json


def _raw(view: memoryview, path: Path, pieces: int = 1, sized: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        if sized:
            chunkio._allocate(fd, FILE_BYTES)
        step = FILE_BYTES // pieces
        for offset in range(0, FILE_BYTES, step):
            written = 0
            while written < step:
                written += os.pwrite(fd, view[offset + written : offset + step], offset + written)
    finally:
        os.close(fd)


def _array(tensor: torch.Tensor, directory: Path, index: int) -> None:
    array = directory / f"a{index}"
    array.mkdir()
    (array / "zarr.json").write_text(ARRAY_METADATA)
    chunkio.write_file(array / "c", tensor, direct=True, staging=None, trailer=TRAILER)


def ways(view: memoryview, tensor: torch.Tensor) -> dict:
    def write_file(trailer: bytes):
        return lambda d, i: chunkio.write_file(
            d / f"f{i}", tensor, direct=True, staging=None, trailer=trailer
        )

    return {
        "raw": lambda d, i: _raw(view, d / f"f{i}"),
        "raw, sized first": lambda d, i: _raw(view, d / f"f{i}", sized=True),
        "raw, 4 MiB pieces": lambda d, i: _raw(view, d / f"f{i}", pieces=4),
        "write_file": write_file(b""),
        "write_file + CRC trailer": write_file(TRAILER),
        "write_file + array": lambda d, i: _array(tensor, d, i),
    }


def timed(directory: Path, count: int, write, threads: int = 1) -> float:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    os.sync()  # the previous way's writeback is not timed here
    start = time.perf_counter()
    if threads == 1:
        for index in range(count):
            write(directory, index)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda index: write(directory, index), range(count)))
    os.sync()
    return count * FILE_BYTES / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None)
    add_publish_option(parser)
    args = parser.parse_args()
    view = huge_page_buffer(FILE_BYTES)[:FILE_BYTES]
    tensor = torch.frombuffer(view, dtype=torch.uint8)
    chosen = ways(view, tensor)
    three = "write_file, 3 threads"
    names = [*chosen, three]
    speeds: dict[str, list[float]] = {name: [] for name in names}
    work = Path(tempfile.mkdtemp(prefix="spillcache-write-steps-", dir=args.dir))
    try:
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                if name == three:
                    write = chosen["write_file + CRC trailer"]
                    speeds[name].append(timed(work / "files", args.count, write, threads=3))
                else:
                    speeds[name].append(timed(work / "files", args.count, chosen[name]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    limit = median(speeds["raw"])
    rows = [
        {
            "way": name,
            "GB/s": round(median(runs), 3),
            "x raw": round(median(runs) / limit, 3),
            "runs": " ".join(f"{speed:.3f}" for speed in runs),
        }
        for name, runs in speeds.items()
    ]
    report(
        "write_steps",
        rows,
        {"file_bytes": FILE_BYTES, "count": args.count, "rounds": args.rounds},
        publish=args.publish,
    )


if __name__ == "__main__":
    main()
