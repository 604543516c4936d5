"""The child of test_fsync_after_flush.py: a kept store filled through a 1 MiB host
tier (so the I/O threads write most values in the background), flushed once; it prints
"flushing" before the flush and "flushed <store>" after it, then waits on stdin, to be
ended without closing the cache.

python fsync_writer.py DISK_DIR
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spill_testing import random_tensor  # noqa: E402
from spillcache import CacheConfig, IntermediatesCache  # noqa: E402

BATCHES = 16


def values(batch: int) -> dict:
    """256 KiB of activations, a bfloat16 tensor of a size that is not whole pages, and a
    small tensor that stays with its entry until the flush writes it; in two batches
    also 3 MiB that do not start on a page (written through staging buffers, queued
    with native AIO where the kernel has it)."""
    batch_values = {
        "hidden": random_tensor(torch.float32, (256, 256), batch),
        "half": random_tensor(torch.bfloat16, (96, 100), 1000 + batch),
        "ids": random_tensor(torch.int64, (16,), 2000 + batch),
    }
    if batch % 8 == 0:
        batch_values["wide"] = random_tensor(torch.float32, (3 * 2**18 + 1,), 3000 + batch)[1:]
    return batch_values


def main() -> None:
    config = CacheConfig(
        host_bytes="1MiB", inline_bytes="1KiB", disk_path=sys.argv[1], keep_store=True
    )
    cache = IntermediatesCache.empty(BATCHES, "cpu", config=config)
    for batch in range(BATCHES):
        cache.update(batch, values(batch))
    cache._core.io.wait_idle()  # the background writes are done before the flush
    print("flushing", flush=True)
    cache.flush()
    print(f"flushed {cache.store_path}", flush=True)
    sys.stdin.read()
    os._exit(0)  # ended without close(): the store stays as the flush left it


if __name__ == "__main__":
    main()
