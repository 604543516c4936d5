"""What switching llm-compressor over to spillcache costs in a real ``oneshot`` run.

llm-compressor's ``oneshot`` calibrates a random-weight Llama (built offline from a
transformers config, as in tests/integration) with the sequential pipeline and a GPTQ
W4A16 recipe, first with its own cache (everything in RAM: the limit), then through
``spillcache.integrations.llmcompressor.enable`` with host budgets of a fraction of what
the pipeline caches, prefetch on. Each run's weights are checked bit for bit against
the stock run's; the figures are the median of --repeats runs (interleaved).
``--recipe awq`` runs AWQ + W4A16 instead (its caches are replayed once per grid point).

Every run is a process of its own, so that its peak RSS (VmHWM) is its own: a
spillcache budget is what the process holds, and this is where that is checked against
the stock cache. For spillcache runs the table also gives the peak of the host tier
over all the caches llm-compressor built (they share one budget: AWQ builds several).

What the pipeline caches is measured, not estimated: an untimed first stock run keeps
its cache and asks it (the stock ``size()``) what it holds once the run is over, which
is the last layer's inputs: hidden states, masks, position embeddings, for every sample.

    python bench/llmcompressor_oneshot.py [--recipe gptq|awq] [--hidden 512] [--layers 4]
        [--samples 64] [--seq-len 512] [--host-fractions 0.5,0.25,0.0625] [--repeats 3]
        [--dir PATH] [--wall-limit 1.10] [--checkpoint] [--checkpoint-limit 1.05]

``--checkpoint`` adds, per host fraction, the same run under
``enable(checkpoint_dir=...)`` (a checkpoint after every subgraph: the activation
store flushed, the changed tensors saved), its wall time over the same run's without
checkpoints against --checkpoint-limit; each such run must leave no checkpoint behind.

Needs the extra: pip install -e '.[llmcompressor]'.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402

from common import (  # noqa: E402
    add_publish_option,
    drop_page_cache,
    machine,
    median,
    proc_status,
    ratio,
    report,
    verdict,
)
from spillcache import CacheConfig, IntermediatesCache  # noqa: E402
from spillcache._internal.cli.demo import identical  # noqa: E402
from spillcache.integrations.llmcompressor import enable  # noqa: E402
from tiny_llama import RECIPES, calibrate, stock_pin_memory_without_accelerator  # noqa: E402

COLD = {"every run": True}  # set False when the page cache could not be dropped (not root)


def run(
    args, work: Path, config: CacheConfig | None, checkpoint_dir: str | None = None
) -> tuple[float, dict, dict | None]:
    """One oneshot run in this process: wall seconds, weights, spillcache's totals."""
    recipe = RECIPES[args.recipe]
    sizes = dict(hidden=args.hidden, layers=args.layers, samples=args.samples, seq_len=args.seq_len)
    start = time.perf_counter()
    if config is None:
        # Without an accelerator the stock pin_memory raises (AWQ calls it); skip it there.
        with stock_pin_memory_without_accelerator():
            weights = calibrate(Path(tempfile.mkdtemp(dir=work)), recipe(), prefetch=True, **sizes)
        return time.perf_counter() - start, weights, None
    # A cache of the same config open all run: it keeps the shared pool (and its peak
    # figures) alive across the caches llm-compressor builds and drops.
    with (
        enable(config, checkpoint_dir=checkpoint_dir) as switch,
        IntermediatesCache(config=config) as witness,
    ):
        weights = calibrate(Path(tempfile.mkdtemp(dir=work)), recipe(), prefetch=True, **sizes)
        pool = witness.stats()["pool"]
    totals = switch.stats()
    totals["host_peak"] = pool["host"]["peak_bytes"]
    return time.perf_counter() - start, weights, totals


def child(args, work: Path) -> None:
    """--child: one run; its figures as JSON on stdout, its weights in a file."""
    plan = json.loads(args.child)
    checkpoint_dir = plan.pop("checkpoint_dir", None)
    config = None if plan["host_bytes"] is None else CacheConfig(**plan)
    wall, weights, totals = run(args, work, config, checkpoint_dir)
    weights_file = Path(tempfile.mkdtemp(dir=work)) / "weights.pt"
    torch.save(weights, weights_file)
    peak = proc_status()["VmHWM"]
    print(
        json.dumps({"wall": wall, "peak_rss": peak, "totals": totals, "weights": str(weights_file)})
    )


def run_in_child(
    args, work: Path, config: CacheConfig | None, checkpoint_dir: Path | None = None
) -> tuple[float, int, dict, dict | None]:
    COLD["every run"] &= drop_page_cache()
    plan = {"host_bytes": None} if config is None else {
        "host_bytes": config.host_bytes, "disk_path": config.disk_path,
        "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
    }  # fmt: skip
    command = [sys.executable, __file__, "--child", json.dumps(plan)] + args.passed
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"a run failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    weights = torch.load(figures["weights"])
    return figures["wall"], figures["peak_rss"], weights, figures["totals"]


def stock_cached_bytes(args, work: Path) -> int:
    """Bytes the stock cache holds at the end of an (untimed) stock run."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    built = []
    original = IntermediatesCache.__dict__["from_dataloader"]

    def recording(cls, *arguments, **keywords):
        built.append(original.__func__(cls, *arguments, **keywords))
        return built[-1]

    IntermediatesCache.from_dataloader = classmethod(recording)
    try:
        run(args, work, None)
    finally:
        IntermediatesCache.from_dataloader = original
    return sum(built[0].size().values())


def checkpoint_columns(args, name: str, walls: dict, checkpointed: dict[str, str]) -> dict:
    """With --checkpoint: a checkpointed run's wall time over the same run's without."""
    if not args.checkpoint:
        return {}
    if name not in checkpointed:
        return {"x without ckpt": "-", f"<= {args.checkpoint_limit:g}": "-"}
    cost = ratio(median(walls[name]), median(walls[checkpointed[name]]))
    return {
        "x without ckpt": cost,
        f"<= {args.checkpoint_limit:g}": verdict(cost, args.checkpoint_limit),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="gptq")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--host-fractions", default="0.5,0.25,0.0625")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--wall-limit", type=float, default=1.10)
    parser.add_argument(
        "--checkpoint",
        action="store_true",
        help="also run each fraction with enable(checkpoint_dir=...): a checkpoint after "
        "every subgraph, timed against the same run without",
    )
    parser.add_argument("--checkpoint-limit", type=float, default=1.05)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    add_publish_option(parser)
    args = parser.parse_args()
    if args.child:
        child(args, Path(args.work))
        return
    work = Path(tempfile.mkdtemp(prefix="oneshot-bench-", dir=args.dir))
    try:
        measure(args, work)
    finally:  # the models, weights and stores of every run
        shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    spill = work / "spill"
    spill.mkdir()
    sizes = ["--hidden", args.hidden, "--layers", args.layers, "--samples", args.samples]
    args.passed = [str(v) for v in [*sizes, "--seq-len", args.seq_len, "--recipe", args.recipe]]
    args.passed += ["--work", str(work)]

    def config(host_bytes: int) -> CacheConfig:
        return CacheConfig(host_bytes=host_bytes, disk_path=str(spill))

    cached_per_layer = stock_cached_bytes(args, work)
    fractions = [float(f) for f in args.host_fractions.split(",")]
    plans = [("stock (all in RAM)", None)] + [
        (f"spillcache host {f:g}", config(int(f * cached_per_layer))) for f in fractions
    ]
    checkpointed = {}  # run name -> the run without checkpoints it is compared with
    if args.checkpoint:
        for f in fractions:
            name = f"spillcache host {f:g}, checkpoint_dir"
            plans.append((name, config(int(f * cached_per_layer))))
            checkpointed[name] = f"spillcache host {f:g}"
    walls: dict[str, list[float]] = {name: [] for name, _ in plans}
    peaks: dict[str, list[int]] = {name: [] for name, _ in plans}
    last: dict[str, dict | None] = {}
    # Every run's weights against the first run's (the stock cache's: it runs first).
    exact: dict[str, bool] = {name: True for name, _ in plans}
    reference = None
    for _ in range(args.repeats):
        for name, plan in plans:
            directory = work / "checkpoint" if name in checkpointed else None
            wall, peak, weights, totals = run_in_child(args, work, plan, directory)
            if directory is not None and directory.exists():
                raise SystemExit(f"{name}: the finished run left {directory} behind")
            walls[name].append(wall)
            peaks[name].append(peak)
            reference = weights if reference is None else reference
            exact[name] = exact[name] and identical(weights, reference)
            last[name] = totals
    stock_wall = median(walls["stock (all in RAM)"])
    stock_peak = median(peaks["stock (all in RAM)"])
    rows = []
    for name, plan in plans:
        totals = last[name]
        wall_ratio = ratio(median(walls[name]), stock_wall)
        rows.append(
            {
                "run": name,
                "host MiB": "-" if plan is None else plan.host_bytes / 2**20,
                # A checkpointed run's pipeline cache has a config (and pool) of its own,
                # which the witness cache does not share: its peak is not seen.
                "host peak MiB": "-"
                if totals is None or name in checkpointed
                else totals["host_peak"] / 2**20,
                "peak RSS MiB": median(peaks[name]) / 2**20,
                "RSS x stock": ratio(median(peaks[name]), stock_peak),
                "wall s": median(walls[name]),
                "x stock": wall_ratio,
                f"<= {args.wall_limit:g}": "-"
                if plan is None
                else verdict(wall_ratio, args.wall_limit),
                "caches": "-" if totals is None else totals["caches"],
                "disk wr MiB": 0 if totals is None else totals["disk"]["bytes_written"] / 2**20,
                "disk rd MiB": 0 if totals is None else totals["disk"]["bytes_read"] / 2**20,
                "stall s": 0 if totals is None else totals["stall_seconds"],
                "bit-exact": exact[name],
                **checkpoint_columns(args, name, walls, checkpointed),
            }
        )
    setting = {
        **machine(),
        "model": f"Llama hidden {args.hidden}, {args.layers} layers, float32",
        "samples x seq_len": f"{args.samples} x {args.seq_len}",
        "cached at once (stock size())": f"{cached_per_layer / 2**20:.1f} MiB",
        "repeats": args.repeats,
        "each run": "a process of its own (peak RSS is VmHWM at its end)",
        "page cache dropped before each run": "yes" if COLD["every run"] else "no (not root)",
    }
    for name, value in setting.items():
        print(f"{name}: {value}")
    report(
        f"llm-compressor oneshot ({args.recipe} W4A16, sequential, prefetch): stock vs spillcache",
        rows,
        setting,
        publish=args.publish,
    )


if __name__ == "__main__":
    main()
