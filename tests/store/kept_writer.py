"""A child process for the kept-store crash tests: writes through a cache, says on
stdout where it got to, and is then killed (SIGKILL) by the parent, or kills itself.

python kept_writer.py DISK_DIR SCENARIO

- ``after_flush``: 4 batches, flush(), then a key replaced, a key deleted, a value
  updated and a batch appended, all written to disk; prints the store, "flushed",
  "written", then waits to be killed.
- ``mid_flush``: 4 batches, flush(), every "h" replaced, then a second flush() that
  kills the process after it has written two batch structures.
- ``kept_previous``: 4 batches, flush() with note 1, every "h" replaced and batch 1's
  "pair" deleted, flush() with note 2 keeping the flush before; prints the store,
  "flushed", "flushed again", then waits to be killed.
- ``never_flushed``: a kept cache's values written to disk, never flushed; waits.
- ``not_kept``: the same without keep_store; waits.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spill_testing import random_tensor  # noqa: E402
from spillcache import CacheConfig, IntermediatesCache  # noqa: E402
from spillcache._internal.store.tensor_store import Store  # noqa: E402

DTYPES = [
    torch.float32, torch.bfloat16, torch.float16, torch.int64,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.complex64,
]  # fmt: skip
BATCHES = 4


def value(batch: int, key: str, version: int = 0):
    """What the writer stores under ``key`` of ``batch`` (its ``version``-th value)."""
    seed = 1000 * batch + 100 * version + sum(map(ord, key))
    if key == "h":  # 8 KiB or more: tiered, and on disk at host_bytes = 0
        return random_tensor(DTYPES[(batch + version) % len(DTYPES)], (32, 64), seed)
    if key == "bits":
        return random_tensor(DTYPES[(batch + 3 + version) % len(DTYPES)], (48, 40), seed)
    if key == "pair":  # small: kept with its entry, written by flush() itself
        return (random_tensor(torch.bfloat16, (4,), seed), batch)
    raise KeyError(key)


def batch_values(batch: int) -> dict:
    return {key: value(batch, key) for key in ("h", "bits", "pair")}


def config(disk_dir: str, keep: bool = True) -> CacheConfig:
    return CacheConfig(host_bytes=0, inline_bytes="1KiB", disk_path=disk_dir, keep_store=keep)


def say(line: str) -> None:
    print(line, flush=True)


def main() -> None:
    disk_dir, scenario = sys.argv[1], sys.argv[2]
    cache = IntermediatesCache.empty(0, "cpu", config=config(disk_dir, keep=scenario != "not_kept"))
    for batch in range(BATCHES):
        cache.append(batch_values(batch))
    if scenario in ("never_flushed", "not_kept"):
        cache._core.io.wait_idle()  # every write done: the store holds arrays only
        say(cache.store_path)
        sys.stdin.read()  # killed here
    cache._core.flush(note={"n": 1} if scenario == "kept_previous" else None)
    say(cache.store_path)
    say("flushed")
    if scenario == "kept_previous":
        for batch in range(BATCHES):
            cache.update(batch, {"h": value(batch, "h", 1)})
        cache.delete(1, ["pair"])
        cache._core.flush(note={"n": 2}, keep_previous=True)
        say("flushed again")
        sys.stdin.read()  # killed here
    if scenario == "after_flush":
        cache.update(0, {"h": value(0, "h", 1)})  # replaces an array the flush recorded
        cache.delete(1, ["pair"])
        cache.update(2, {"bits": value(2, "bits", 1)})
        cache.append({"h": value(4, "h")})
        cache._core.io.wait_idle()  # written, and the replaced arrays' deletions run
        say("written")
        sys.stdin.read()  # killed here
    for batch in range(BATCHES):
        cache.update(batch, {"h": value(batch, "h", 1)})
    write_batch = Store.write_batch
    written = []

    def write_then_die(store, *args, **kwargs):
        write_batch(store, *args, **kwargs)
        written.append(args[0])
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    Store.write_batch = write_then_die
    cache.flush()
    raise AssertionError("the second flush() should have killed this process")


if __name__ == "__main__":
    main()
