"""Shared benchmark helpers: the raw-disk limit, cold caches, timing, reporting.

Every benchmark reports its figures as a ratio against a limit measured in the same
run on the same machine (raw O_DIRECT bandwidth, or an all-in-RAM baseline).

Also here, for more than one script: percentiles and targets; the figures read from
``cache.stats()``; this process's RSS and block I/O (/proc/self); and the simulated
sequential calibration (inputs made on the fly, a stand-in compute, the pipeline's loop).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import platform
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy
import torch

ALIGN = 4096
GB = 1e9


def _write_proc(path: str, text: str) -> bool:
    """Write a /proc control file; False where the kernel (or a non-root user) refuses."""
    try:
        with open(path, "w") as handle:
            handle.write(text)
        return True
    except OSError:
        return False


def drop_page_cache(metadata: bool = True) -> bool:
    """Write dirty pages and drop the page cache (root only); False if not allowed.
    With ``metadata`` (``echo 3``) the kernel's cached directory entries and inodes go
    too; without (``echo 1``) only file data does."""
    os.sync()
    return _write_proc("/proc/sys/vm/drop_caches", "3\n" if metadata else "1\n")


HUGE_PAGE = 2 * 2**20
_BUFFERS: dict[tuple[int, int], tuple[mmap.mmap, memoryview]] = {}


def huge_page_buffer(nbytes: int, slot: int = 0) -> memoryview:
    """``nbytes`` of page-aligned memory for the raw O_DIRECT loops, one per (size, slot),
    made and touched on first use and kept.

    A private anonymous mapping (``mmap.mmap(-1, n)`` alone is MAP_SHARED, i.e. shmem,
    which gets no transparent huge pages) advised MADV_HUGEPAGE over 2 MiB-aligned
    memory. O_DIRECT speed here follows the buffer's physical contiguity (a virtio
    request takes at most 254 contiguous runs): huge pages let requests reach the
    device's 4 MiB, as the cache's own buffers do. Made here with mmap rather than with
    spillcache's helper, so that the limit does not depend on the code it measures.
    Filled with random bytes once, on one thread, in order.
    """
    size = (nbytes + ALIGN - 1) // ALIGN * ALIGN
    if (size, slot) not in _BUFFERS:
        mapping = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
        offset = -address % HUGE_PAGE
        if hasattr(mmap, "MADV_HUGEPAGE"):
            mapping.madvise(mmap.MADV_HUGEPAGE, offset, size - size % HUGE_PAGE)
        view = memoryview(mapping)[offset : offset + size]
        random_block = numpy.frombuffer(os.urandom(1 << 20), dtype=numpy.uint8)
        numpy.frombuffer(view, dtype=numpy.uint8)[:] = numpy.resize(random_block, size)
        _BUFFERS[size, slot] = mapping, view
    return _BUFFERS[size, slot][1]


def _on_threads(count: int, threads: int, job) -> None:
    """``job(index, slot)`` for index in range(count), on ``threads`` threads (slot: which
    thread); each thread takes the next index when it is done with one."""
    if threads == 1:
        for index in range(count):
            job(index, 0)
        return
    indices = iter(range(count))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(slot: int) -> None:
        while True:
            with lock:
                index = next(indices, None)
            if index is None:
                return
            try:
                job(index, slot)
            except BaseException as error:  # raised on the calling thread below
                errors.append(error)
                return

    workers = [threading.Thread(target=run, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def raw_direct_write(directory: Path, file_bytes: int, count: int, threads: int = 1) -> float:
    """Seconds to write ``count`` files of ``file_bytes`` with O_DIRECT from a huge-page
    buffer (``huge_page_buffer``), on ``threads`` threads, then sync."""
    directory.mkdir(parents=True, exist_ok=True)
    views = [huge_page_buffer(file_bytes, slot)[:file_bytes] for slot in range(threads)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT

    def write(index: int, slot: int) -> None:
        fd = os.open(directory / f"raw{index}", flags, 0o600)
        try:
            written = 0
            while written < file_bytes:
                written += os.pwrite(fd, views[slot][written:], written)
        finally:
            os.close(fd)

    os.sync()  # earlier work's writeback (and discards of deleted files) is not timed here
    start = time.perf_counter()
    _on_threads(count, threads, write)
    os.sync()
    return time.perf_counter() - start


def raw_direct_read(directory: Path, file_bytes: int, count: int, threads: int = 1) -> float:
    """Seconds to read the files written by ``raw_direct_write`` with O_DIRECT into
    huge-page buffers (one per thread), on ``threads`` threads."""
    views = [huge_page_buffer(file_bytes, slot)[:file_bytes] for slot in range(threads)]

    def read(index: int, slot: int) -> None:
        fd = os.open(directory / f"raw{index}", os.O_RDONLY | os.O_DIRECT)
        try:
            got = 0
            while got < file_bytes:
                done = os.preadv(fd, [views[slot][got:]], got)
                if done == 0:
                    raise OSError(f"raw{index} ended after {got} bytes")
                got += done
        finally:
            os.close(fd)

    start = time.perf_counter()
    _on_threads(count, threads, read)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


# The committed JSON behind the tables of docs/benchmarks.md (bench/tables.py renders
# them); bench/results/ is the git-ignored scratch output of every run.
PUBLISHED = Path(__file__).parent / "published"
_PUBLISH_NAME = re.compile(r"[A-Za-z0-9_-]+")


def add_publish_option(parser: argparse.ArgumentParser) -> None:
    """``--publish NAME``: also write the run's JSON to bench/published/NAME.json."""
    parser.add_argument(
        "--publish",
        metavar="NAME",
        type=_publish_name,
        help="also write the figures to bench/published/NAME.json, the file behind the "
        "docs/benchmarks.md table of that name (then run python bench/tables.py)",
    )


def _publish_name(text: str) -> str:
    # A plain file name: the doc's table markers and the file share it.
    if not _PUBLISH_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: letters, digits, _ and - only")
    return text


def report(
    name: str,
    rows: list[dict],
    extra: dict,
    out_dir: Path | None = None,
    publish: str | None = None,
) -> None:
    """Print an aligned table and write the same figures as JSON (to bench/results/, and
    to bench/published/<publish>.json as well when ``publish`` names a published table)."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row[c]).ljust(widths[c]) for c in columns))
    out_dir = out_dir or Path(__file__).parent / "results"
    text = json.dumps({"rows": rows, **extra, "machine": machine(), "argv": sys.argv}, indent=1)
    paths = [out_dir / f"{name}.json"]
    if publish is not None:
        paths.append(PUBLISHED / f"{_publish_name(publish)}.json")
    for path in paths:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"\n(figures written to {path})")
    if publish is not None:
        print("(python bench/tables.py rewrites docs/benchmarks.md's tables from it)")


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------ limits and statistics


def raw_bandwidth(directory: Path, file_bytes: int, total_bytes: int, runs: int = 3):
    """Raw O_DIRECT (write, cold read) bandwidth in bytes/s: the medians of ``runs``.

    Files of ``file_bytes`` (the size of one cached tensor) up to ``total_bytes``, in
    ``directory`` (the disk the cache spills to); the files are removed afterwards.
    """
    count = max(1, min(total_bytes // file_bytes, 64))  # 64 files: a stable figure, quickly
    writes, reads = [], []
    for _ in range(runs):
        writes.append(raw_direct_write(directory, file_bytes, count))
        drop_page_cache()
        reads.append(raw_direct_read(directory, file_bytes, count))
        for path in directory.glob("raw*"):
            path.unlink()
    directory.rmdir()
    nbytes = file_bytes * count
    return nbytes / median(writes), nbytes / median(reads)


def percentiles(values: list[float], points=(50, 90)) -> dict[int, float]:
    """Percentiles by linear interpolation (numpy's default), keyed by the point."""
    ordered = sorted(values)
    result = {}
    for point in points:
        rank = (len(ordered) - 1) * point / 100
        low = int(rank)
        high = min(low + 1, len(ordered) - 1)
        result[point] = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return result


def ratio(numerator, denominator):
    """numerator / denominator, or None where either is unknown or the limit is 0."""
    return None if numerator is None or not denominator else numerator / denominator


def verdict(value, limit) -> str:
    """A target's outcome as printed beside the figures (benchmarks never assert)."""
    return "n/a" if value is None else ("PASS" if value <= limit else "MISS")


def cache_figures(stats: dict) -> dict:
    """The figures benchmarks read from ``cache.stats()``, flat.

    Missing keys read as None (a version of stats() without them), so a run still
    reports what it can; the caller prints a warning.
    """

    def get(tier: str, key: str):
        return stats.get(tier, {}).get(key) if isinstance(stats.get(tier), dict) else None

    return {
        "disk_read": get("disk", "bytes_read"),
        "disk_written": get("disk", "bytes_written"),
        "host_hits": get("host", "hits"),
        "host_misses": get("host", "misses"),
        "stall_s": stats.get("stall_seconds"),
    }


# ------------------------------------------------------------------ this process


def proc_status() -> dict[str, int]:
    """The memory lines of /proc/self/status (VmRSS, VmHWM, RssAnon, ...) in bytes."""
    figures = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if value.strip().endswith(" kB"):
                figures[name] = int(value.split()[0]) * 1024
    return figures


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel refuses."""
    return _write_proc("/proc/self/clear_refs", "5\n")


def proc_io() -> dict[str, int]:
    """/proc/self/io (all threads): read_bytes and write_bytes reached the block layer.

    An independent check of the cache's own counters: a "disk read" served by the
    page cache shows in the cache's disk.bytes_read but not in read_bytes.
    """
    with open("/proc/self/io") as handle:
        return {k: int(v) for k, v in (line.split(":") for line in handle)}


# ------------------------------------------------------------------ simulated calibration


def hidden_bytes(shape: tuple[int, ...]) -> int:
    return 2 * math.prod(shape)  # bf16


def make_base(shape: tuple[int, ...], seed: int = 0):
    """The one random bf16 tensor every batch's input is derived from."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(torch.bfloat16)


def make_hidden(base, batch: int):
    """Batch ``batch``'s first input: new memory, distinct per batch, made on the fly
    (so a benchmark never holds all batches itself) and cheap (one elementwise op)."""
    return base + (batch % 251) * 0.0078125


class Compute:
    """A stand-in for a subgraph's work on the model device: float32 matmuls that take
    about ``ms`` milliseconds, on a preallocated workspace (no allocation per call).

    ``threads`` intra-op threads: on a 2-core machine one thread leaves a core for the
    cache's I/O thread, as a GPU leaves the host's cores free.
    """

    SIZE = 256

    def __init__(self, ms: float, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.a = torch.randn(self.SIZE, self.SIZE)
        self.b = torch.randn(self.SIZE, self.SIZE)
        self.out = torch.empty(self.SIZE, self.SIZE)
        self.reps = 0
        self.calls = 0
        self.seconds = 0.0
        if ms > 0:
            for _ in range(20):  # warm up
                torch.mm(self.a, self.b, out=self.out)
            samples = []
            for _ in range(15):
                start = time.perf_counter()
                for _ in range(10):
                    torch.mm(self.a, self.b, out=self.out)
                samples.append((time.perf_counter() - start) / 10)
            # The fastest sample: the speed of an uncontended core (a VM's neighbours and
            # the kernel's page work only ever slow a sample down).
            self.reps = max(1, round(ms / 1e3 / min(samples)))

    def __call__(self) -> None:
        start = time.perf_counter()
        for _ in range(self.reps):
            torch.mm(self.a, self.b, out=self.out)
        self.seconds += time.perf_counter() - start
        self.calls += 1

    @property
    def achieved_ms(self) -> float:
        return 1e3 * self.seconds / max(self.calls, 1)


def sequential_calibration(cache, layers: int, observe, layer) -> None:
    """llm-compressor's sequential pipeline over one cached name, ``"hidden"``.

    For each subgraph: a calibration pass (``observe(k, hidden)``, hooks on) and a
    propagation pass whose output (``layer(k, hidden)``, a new tensor as a real layer
    makes) replaces its input in the cache.
    """
    for k in range(layers):
        for inputs in cache.iter_prefetch(["hidden"]):
            observe(k, inputs["hidden"])
        for b, inputs in enumerate(cache.iter_prefetch(["hidden"])):
            output = layer(k, inputs["hidden"])
            del inputs  # hold no reference to the consumed input: the tier may free it
            cache.delete(b, ["hidden"])
            cache.update(b, {"hidden": output})


def layer_biases(layers: int, hidden: int, seed: int = 1) -> list:
    """One bf16 bias per subgraph: the propagation pass computes ``hidden + bias[k]``,
    elementwise in bf16, so its result is bit-exact whatever tier served the input."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(hidden, generator=generator).to(torch.bfloat16) for _ in range(layers)]


def first_touch_bandwidth(nbytes: int = 2**30) -> tuple[float, float]:
    """Bytes/s of writing fresh pages (new memory, first touch) and of writing them again.

    On these VMs memory freed for a few seconds goes back to the host, and fresh pages
    cost far more than a memcpy: a run that allocates more than another pays for it.
    """
    start = time.perf_counter()
    block = torch.empty(nbytes, dtype=torch.uint8)  # mmap'd by malloc: untouched pages
    block.fill_(1)
    fresh = time.perf_counter() - start
    start = time.perf_counter()
    block.fill_(2)
    again = time.perf_counter() - start
    del block
    return nbytes / fresh, nbytes / again
