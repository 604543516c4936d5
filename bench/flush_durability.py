"""What does making a kept store durable cost, and where is it cheapest to pay?

A ``keep_store`` cache's ``flush()`` must leave every file its structures name, every
``zarr.json`` and every directory entry on the way fsync'd. Two places can pay for it:

- **on write** (the default, ``Store.sync_on_write = True``): each background write
  fsyncs its chunk, its ``zarr.json`` and its directory as it lands, on the I/O
  thread, and ``flush()`` has only its own writes and ``tensors/`` left;
- **at flush** (``Store.sync_on_write = False``): the I/O threads write chunk files
  without an fsync and ``flush()`` fsyncs what they wrote since the last flush,
  together, before it commits.

Each run updates N batches (a 16 MiB bf16 hidden state and a 256 KiB tensor each)
through a cache whose host tier holds an eighth of them, so most are written by the
I/O threads, with ``--compute-ms`` of computation after each update (a layer's work,
which background writes hide behind), then calls ``flush()``; the run is timed from
the first update to the end of ``flush()``, and ``flush()`` alone. Two baselines run
with ``keep_store = false``: "not kept" (its ``flush()`` only waits for the background
writes; their bytes may still be in the page cache), and "not kept + sync", timed to
the end of an ``os.sync()`` after ``flush()`` (the same bytes on the device, every
file of the machine flushed, without spillcache's per-file fsyncs): each variant's time
is printed as a ratio to the second. Variants are
interleaved, in an order rotated from run to run; medians over ``--runs``. The fsyncs
each variant made are counted (os.fsync wrapped, outside the timing's hot path: one
counter increment per call). After each run the values are read back and compared bit
for bit with what was written.

    python bench/flush_durability.py [--batches 48] [--runs 5] [--compute-ms MS] [--dir PATH]
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

from common import GB, add_publish_option, median, report
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.store.tensor_store import Store

HIDDEN = (4096, 2048)  # 16 MiB of bf16
SMALL = (256, 256)  # 256 KiB of fp32: tiered, written by its own array
BASELINE = "not kept + sync"
# keep_store = false (None), or kept with Store.sync_on_write False / True
VARIANTS = {
    "not kept": None,
    BASELINE: None,
    "kept, fsync on write (default)": True,
    "kept, fsync at flush": False,
}


class FsyncCounter:
    """Counts os.fsync calls (from any thread) while installed."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._real = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counted(fd: int) -> None:
            with self._lock:
                self.count += 1
            self._real(fd)

        os.fsync = counted
        return self

    def __exit__(self, *exc_info: object) -> None:
        os.fsync = self._real


def batches(count: int) -> list[dict[str, torch.Tensor]]:
    seed = torch.randint(-(2**15), 2**15, HIDDEN, dtype=torch.int16)
    small = torch.randn(SMALL)
    return [{"hidden": (seed + i).view(torch.bfloat16), "small": small + i} for i in range(count)]


def compute_step(milliseconds: float):
    """A function that keeps this thread computing for about ``milliseconds`` (a layer's
    forward pass between two updates), calibrated once: matrix products, no sleeping."""
    if milliseconds <= 0:
        return lambda: None
    a = torch.randn(384, 384)
    for _ in range(20):  # warm up: the first products are slower
        a @ a
    start = time.perf_counter()
    for _ in range(200):
        a @ a
    each = (time.perf_counter() - start) / 200
    count = max(1, round(milliseconds / 1e3 / each))

    def step() -> None:
        for _ in range(count):
            a @ a

    return step


def one_run(
    directory: Path, values: list[dict], sync_on_write: bool | None, compute, synced: bool
) -> dict:
    kept = sync_on_write is not None
    per_batch = sum(t.nbytes for t in values[0].values())
    config = CacheConfig(
        host_bytes=per_batch * max(1, len(values) // 8),
        inline_bytes=0,
        disk_path=str(directory),
        keep_store=kept,
    )
    Store.sync_on_write = bool(sync_on_write)
    try:
        cache = IntermediatesCache.empty(len(values), "cpu", config=config)
        os.sync()  # earlier runs' writeback is not timed here
        with FsyncCounter() as fsyncs:
            start = time.perf_counter()
            computing = 0.0
            for index, batch in enumerate(values):
                cache.update(index, batch)
                before = time.perf_counter()
                compute()
                computing += time.perf_counter() - before
            flush_start = time.perf_counter()
            cache.flush()
            if synced:
                os.sync()
            end = time.perf_counter()
        for index, batch in enumerate(values):  # bit for bit, after the timing
            for key, value in cache.fetch(index).items():
                assert torch.equal(value.view(torch.uint8), batch[key].view(torch.uint8)), key
        cache.close()
    finally:
        Store.sync_on_write = False
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "total": end - start,
        "flush": end - flush_start,
        "fsyncs": fsyncs.count,
        "compute_ms": computing / len(values) * 1e3,  # as it ran, beside the I/O threads
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=48)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", default=None, help="directory on the disk to test")
    parser.add_argument(
        "--compute-ms", type=float, default=0.0,
        help="compute after each update (a layer's work that hides the disk); 0: none",
    )  # fmt: skip
    add_publish_option(parser)
    args = parser.parse_args()

    values = batches(args.batches)
    compute = compute_step(args.compute_ms)
    total_bytes = sum(t.nbytes for batch in values for t in batch.values())
    base = Path(tempfile.mkdtemp(prefix="spillcache-bench-", dir=args.dir))
    names = list(VARIANTS)
    runs: list[dict[str, dict]] = []
    try:
        # the pool's buffers and threads made, untimed
        one_run(base / "warm-up", values, None, compute, False)
        for run in range(args.runs):
            shift = run % len(names)
            order = names[shift:] + names[:shift]
            results = {
                name: one_run(base / "run", values, VARIANTS[name], compute, name == BASELINE)
                for name in order
            }
            runs.append(results)
            print(
                f"run {run + 1}/{args.runs}: "
                + "; ".join(
                    f"{name} {results[name]['total']:.2f} s (flush {results[name]['flush']:.3f}"
                    f" s, {results[name]['fsyncs']} fsyncs)"
                    for name in names
                ),
                flush=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def med(name: str, what: str) -> float:
        return median([results[name][what] for results in runs])

    baseline = med(BASELINE, "total")
    rows = []
    for name in names:
        paired = [results[name]["total"] / results[BASELINE]["total"] for results in runs]
        rows.append(
            {
                "variant": name,
                "updates + flush s": med(name, "total"),
                "GB/s": total_bytes / med(name, "total") / GB,
                "x not kept + sync": med(name, "total") / baseline,
                "run by run": f"{min(paired):.3f}-{max(paired):.3f}",
                "flush() s": med(name, "flush"),  # with the os.sync() for the baseline
                "fsyncs": int(med(name, "fsyncs")),
            }
        )
    print(
        f"\n{args.batches} batches of {total_bytes / args.batches / 2**20:.2f} MiB "
        f"({total_bytes / GB:.2f} GB), host tier an eighth of them, {args.compute_ms:g} ms of "
        f"compute asked after each update ({med(BASELINE, 'compute_ms'):.1f} ms as it ran); "
        f"median of {args.runs} interleaved runs\n"
    )
    report(
        "flush_durability",
        rows,
        {"batches": args.batches, "runs": args.runs, "total_bytes": total_bytes,
         "compute_ms": args.compute_ms, "per_run": runs},
        publish=args.publish,
    )  # fmt: skip
    cheaper = min(names[2:], key=lambda name: med(name, "total"))
    print(f"\ncheaper in total: {cheaper}")


if __name__ == "__main__":
    main()
