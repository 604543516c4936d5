"""What a process holds resident for its caches, measured from outside: host_bytes is
all the host memory a pool's caches hold for their tiered values (docs/config.md,
"How much memory a cache uses"), beyond what the caller itself holds.

Each check runs in a fresh interpreter, whose high-water mark (VmHWM) is reset once
imports and a warm-up round of every code path are done, and compares every value it
reads back with its original, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import spillcache

MiB = 2**20
# What a process may add beyond host_bytes and what it holds (bench/host_memory.py's
# allowance): the interpreter's and torch's own churn.
SLACK = 48 * MiB
SRC = str(Path(spillcache.__file__).resolve().parents[1])

CHILD_SETUP = textwrap.dedent(
    """
    import gc, json, sys, warnings
    import torch
    torch.set_num_threads(1)
    import spillcache
    from spillcache import CacheConfig, IntermediatesCache
    assert spillcache.__file__.startswith(sys.argv[2]), spillcache.__file__
    warnings.simplefilter("ignore")
    MiB = 2**20
    DIR = sys.argv[1]

    def status(field):
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024

    def same(a, b):
        return torch.equal(a.view(torch.int16), b.view(torch.int16))

    # One round of every kernel and code path, so its one-time cost is in the baseline.
    warm = IntermediatesCache.empty(
        0, "cpu", config=CacheConfig(host_bytes=8 * MiB, disk_path=DIR))
    for i in range(6):
        warm.append({"x": torch.randn(256, 4096).to(torch.bfloat16)})
    for value in warm.iter_prefetch():
        same(value["x"], value["x"])
    warm.close()
    del warm, value
    gc.collect()

    def baseline():
        gc.collect()
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5\\n")  # VmHWM starts again from VmRSS
        return status("VmRSS")
    """
)


def measure(body: str, tmp_path: Path) -> dict:
    """CHILD_SETUP, then ``body``, in a fresh interpreter: the JSON line it prints last."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD_SETUP + textwrap.dedent(body), str(tmp_path), SRC],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_tensor_kept_from_a_closed_cache_keeps_only_its_own_pages(tmp_path):
    # Three caches of one config, one after the other, each filling its 128 MiB region;
    # the caller keeps one 4 MiB tensor fetched from each. Each new cache maps a new
    # region: the old one may stay mapped for the kept slot, but not resident.
    host = 128 * MiB
    result = measure(
        f"""
        config = CacheConfig(host_bytes={host}, disk_path=DIR)
        base = torch.randn(512, 4096).to(torch.bfloat16)  # 4 MiB
        start = baseline()
        kept, wrong = [], 0
        for round_ in range(3):
            cache = IntermediatesCache.empty(0, "cpu", config=config)
            for i in range(32):
                cache.append({{"x": base + (100 * round_ + i)}})
            kept.append(cache.fetch(0)["x"])
            cache.close()
            del cache
            gc.collect()
        wrong = sum(not same(t, base + 100 * r) for r, t in enumerate(kept))
        print(json.dumps(dict(wrong=wrong, grew=status("VmHWM") - start,
                              resident=status("VmRSS") - start,
                              kept=sum(t.nbytes for t in kept))))
        """,
        tmp_path,
    )
    assert result["wrong"] == 0
    limit = host + result["kept"] + SLACK
    assert result["grew"] <= limit, (
        f"RSS peaked {result['grew'] / MiB:.0f} MiB above the start "
        f"({result['resident'] / MiB:.0f} MiB still resident at the end) with "
        f"{result['kept'] / MiB:.0f} MiB kept by the caller and host_bytes "
        f"{host / MiB:.0f} MiB: more than {limit / MiB:.0f} MiB"
    )


def test_values_too_large_for_the_room_the_host_tier_leaves_stay_within_host_bytes(tmp_path):
    # 30 values of 24 MiB through host_bytes = 64 MiB (a host tier of 48 MiB, 16 MiB
    # left to the values in transit), the caller holding none: once the tier gives its
    # room back to the split, the values in transit find room in the region.
    host, value = 64 * MiB, 24 * MiB
    result = measure(
        f"""
        base = torch.randn(3072, 4096).to(torch.bfloat16)  # 24 MiB
        first = base + 0; same(first, first); del first
        start = baseline()
        cache = IntermediatesCache.empty(
            0, "cpu", config=CacheConfig(host_bytes={host}, disk_path=DIR))
        for i in range(30):
            cache.append({{"x": base + i}})
        cache.flush()
        wrong = sum(not same(cache.fetch(i)["x"], base + i) for i in range(30))
        overflows = cache.stats()["pool"]["arena"]["overflows"]
        cache.close()
        print(json.dumps(dict(wrong=wrong, grew=status("VmHWM") - start,
                              overflows=overflows)))
        """,
        tmp_path,
    )
    assert result["wrong"] == 0
    # Beyond host_bytes and the slack: the caller's value being stored, the value made
    # from it, a value read back outside the region, one more in flight.
    limit = host + SLACK + 4 * value
    assert result["grew"] <= limit, (
        f"RSS peaked {result['grew'] / MiB:.0f} MiB above the start for host_bytes "
        f"{host / MiB:.0f} MiB ({result['overflows']} overflows): more than "
        f"{limit / MiB:.0f} MiB"
    )
