"""Does the process stay within host_bytes? RSS high-water growth, values checked.

Each scenario runs in a fresh subprocess: imports, a torch warm-up (every kernel the
loop uses, run once), gc; then the RSS high-water mark (VmHWM) is reset and

    growth = VmHWM at the end - RSS before the first cache

is compared with limit = host_bytes + 48 MiB (the issue's figure: what the process may
add besides the budget it was given). In between, caches of one config are filled with
``update`` (every value made on the fly from one random base, so the benchmark holds
none of them), flushed, read back with ``iter_prefetch`` with every value compared bit
for bit with its original (made again), and closed. Nothing but ``host_bytes`` (and
``disk_path``) is set: the defaults are what is measured.

With ``--before SRC`` every scenario also runs with the spillcache found under SRC (a
checkout's ``src``; e.g. the commit before the arena, ``git worktree add``), so the
table holds before and after from the same command on the same machine.

    python bench/host_memory.py [--scenarios one,four,2g,mix] [--before SRC]
        [--dir PATH] [--publish host_memory]

Scenarios (values bf16; "mix" is one decoder layer's cache of a 4096-wide model at 2048
tokens, hidden states, attention mask and rotary embeddings, plus an AWQ mapping
cache of the MLP's 11008-wide inputs, both under one config):
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import add_publish_option, proc_status, report, reset_peak_rss, verdict

MiB = 2**20
GiB = 2**30
SLACK = 48 * MiB  # what the process may add beyond host_bytes (the figure)

SCENARIOS = {
    "one": dict(caches=1, batches=16, value=4 * MiB, host=128 * MiB),
    "four": dict(caches=4, batches=16, value=4 * MiB, host=128 * MiB),
    "2g": dict(caches=1, batches=128, value=16 * MiB, host=256 * MiB),
    "mix": dict(caches=2, batches=32, value=None, host=512 * MiB),
    "32g": dict(caches=1, batches=2048, value=16 * MiB, host=2 * GiB, limit=int(2.1 * GiB)),
}
__doc__ += "".join(
    f"\n    {name}: {spec['caches']} cache(s) x {spec['batches']} batches"
    + (f" of {spec['value'] // MiB} MiB" if spec["value"] else " of the mix")
    + f" through host_bytes = {spec['host'] // MiB} MiB"
    for name, spec in SCENARIOS.items()
)
WIDTH = 4096


def child(spec: dict) -> dict:
    """Runs in the fresh process; returns the figures."""
    import torch  # noqa: PLC0415 (the parent never imports torch)

    from spillcache import CacheConfig, IntermediatesCache  # noqa: PLC0415

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    shapes = _shapes(spec)
    bases = {
        name: torch.randn(shape, generator=generator).to(torch.bfloat16)
        if name != "attention_mask"
        else torch.rand(shape, generator=generator) < 0.5
        for name, shape in {key: s for cache in shapes for key, s in cache.items()}.items()
    }

    def value(cache: int, batch: int, key: str):
        base = bases[key]
        if base.dtype == torch.bool:
            return base.roll(cache * 1000 + batch)
        return base + (cache * 1000 + batch)

    def same(a, b) -> bool:
        if a.dtype == torch.bool:
            return torch.equal(a, b)
        return torch.equal(a.view(torch.int16), b.view(torch.int16))

    for key in bases:  # every kernel once, so its one-time setup lands in the baseline
        same(value(0, 0, key), value(0, 0, key))
    config = CacheConfig(host_bytes=spec["host"], disk_path=spec["dir"])
    gc.collect()
    baseline = proc_status()["VmRSS"]
    hwm_reset = reset_peak_rss()
    start = time.perf_counter()
    caches = [IntermediatesCache.empty(0, "cpu", config=config) for _ in shapes]
    for batch in range(spec["batches"]):
        for index, cache in enumerate(caches):
            cache.append({key: value(index, batch, key) for key in shapes[index]})
    for cache in caches:
        cache.flush()
    fill_peak = proc_status()["VmHWM"]
    wrong = 0
    for index, cache in enumerate(caches):
        for batch, values in enumerate(cache.iter_prefetch()):
            for key, got in values.items():
                wrong += not same(got, value(index, batch, key))
            del values, got
    stats = caches[0].stats().get("pool", {})
    for cache in caches:
        cache.close()
    wall = time.perf_counter() - start
    status = proc_status()
    arena = stats.get("arena", {})
    return {
        "baseline": baseline,
        "peak": status["VmHWM"],
        "fill_peak": fill_peak,
        "hwm_reset": hwm_reset,
        "wrong": wrong,
        "wall": wall,
        "disk_written": stats.get("counters", {}).get("disk.bytes_written", 0),
        "overflows": arena.get("overflows"),
        "fragmented_takes": arena.get("fragmented_takes"),
        "worst_fragmentation": arena.get("worst_fragmentation"),
    }


def _shapes(spec: dict) -> list[dict[str, tuple[int, ...]]]:
    """Per cache, key -> shape of its values."""
    if spec["value"] is None:  # the mix
        tokens = 2048
        layer = {
            "hidden_states": (1, tokens, WIDTH),
            "attention_mask": (1, 1, tokens, tokens),
            "cos": (1, tokens, 128),
            "sin": (1, tokens, 128),
        }
        return [layer, {"mlp_input": (1, tokens, 11008)}]
    return [{"hidden": (spec["value"] // (2 * WIDTH), WIDTH)}] * spec["caches"]


def run(spec: dict, src: str | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"the child failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenarios", default="one,four,2g,mix")
    parser.add_argument("--before", default=None, help="another checkout's src, run as well")
    parser.add_argument("--dir", default=None, help="directory on the disk to spill to")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    add_publish_option(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    work = Path(tempfile.mkdtemp(prefix="spillcache-host-memory-", dir=args.dir))
    versions = [("this", None)] + ([("before", args.before)] if args.before else [])
    rows = []
    try:
        for name in args.scenarios.split(","):
            spec = {**SCENARIOS[name], "dir": str(work)}
            limit = spec.get("limit", spec["host"] + SLACK)
            for version, src in versions:
                result = run(spec, src)
                growth = result["peak"] - result["baseline"]
                rows.append(
                    {
                        "scenario": name,
                        "code": version,
                        "host MiB": spec["host"] // MiB,
                        "growth MiB": round(growth / MiB, 1),
                        "limit MiB": round(limit / MiB, 1),
                        "growth / limit": growth / limit,
                        "verdict": verdict(growth, limit),
                        "fill growth MiB": round(
                            (result["fill_peak"] - result["baseline"]) / MiB, 1
                        ),
                        "values wrong": result["wrong"],
                        "overflows": result["overflows"],
                        "fragmented takes": result["fragmented_takes"],
                        "worst fragmentation": result["worst_fragmentation"],
                        "seconds": round(result["wall"], 1),
                        "hwm reset": result["hwm_reset"],
                    }
                )
                print(f"{name} ({version}): +{growth / MiB:.1f} MiB of {limit / MiB:.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    extra = {"slack_bytes": SLACK, "before": args.before}
    report("host_memory", rows, extra, publish=args.publish)
    if any(row["values wrong"] for row in rows):
        print("WRONG VALUES: a value read back differs from what was stored")
    if not all(row["hwm reset"] for row in rows):
        print("NOTE: VmHWM could not be reset: the peak may predate the caches")


if __name__ == "__main__":
    main()
