"""What switching llm-compressor over to spillcache costs in a real ``oneshot`` run.

llm-compressor's ``oneshot`` calibrates a random-weight Llama (built offline from a
transformers config, as in tests/integration) with the sequential pipeline and a GPTQ
W4A16 recipe, first with its own cache (everything in RAM: the limit), then through
``spillcache.integrations.llmcompressor.enable`` with host budgets of a fraction of what
the pipeline caches, prefetch on. Each run's weights are checked bit for bit against
the stock run's; the figures are the median of --repeats runs (interleaved).
``--recipe awq`` runs AWQ + W4A16 instead (its caches are replayed once per grid point).

What the pipeline caches is measured, not estimated: an untimed first stock run keeps
its cache and asks it (the stock ``size()``) what it holds once the run is over, which
is the last layer's inputs: hidden states, masks, position embeddings, for every sample.

    python bench/llmcompressor_oneshot.py [--recipe gptq|awq] [--hidden 512] [--layers 4]
        [--samples 64] [--seq-len 512] [--host-fractions 0.5,0.25,0.0625] [--repeats 3] [--dir PATH]

Needs the extra: pip install -e '.[llmcompressor]'.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import drop_page_cache, machine, median, ratio, report  # noqa: E402
from spillcache import CacheConfig  # noqa: E402
from spillcache.demo import identical  # noqa: E402
from spillcache.integrations.llmcompressor import enable  # noqa: E402
from tiny_llama import RECIPES, calibrate, stock_pin_memory_without_accelerator  # noqa: E402

COLD = {"every run": True}  # set False when the page cache could not be dropped (not root)


def run(args, work: Path, config: CacheConfig | None) -> tuple[float, dict, dict | None]:
    COLD["every run"] &= drop_page_cache()
    recipe = RECIPES[args.recipe]
    sizes = dict(hidden=args.hidden, layers=args.layers, samples=args.samples, seq_len=args.seq_len)
    start = time.perf_counter()
    if config is None:
        # Without an accelerator the stock pin_memory raises (AWQ calls it); skip it there.
        with stock_pin_memory_without_accelerator():
            weights = calibrate(Path(tempfile.mkdtemp(dir=work)), recipe(), prefetch=True, **sizes)
        return time.perf_counter() - start, weights, None
    with enable(config) as switch:
        weights = calibrate(Path(tempfile.mkdtemp(dir=work)), recipe(), prefetch=True, **sizes)
    return time.perf_counter() - start, weights, switch.stats()


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
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oneshot-bench-", dir=args.dir))
    spill = work / "spill"
    spill.mkdir()

    def config(host_bytes: int) -> CacheConfig:
        return CacheConfig(host_bytes=host_bytes, disk_path=str(spill))

    cached_per_layer = stock_cached_bytes(args, work)
    fractions = [float(f) for f in args.host_fractions.split(",")]
    plans = [("stock (all in RAM)", None)] + [
        (f"spillcache host {f:g}", config(int(f * cached_per_layer))) for f in fractions
    ]
    walls: dict[str, list[float]] = {name: [] for name, _ in plans}
    last: dict[str, tuple[dict, dict | None]] = {}
    for _ in range(args.repeats):
        for name, plan in plans:
            wall, weights, totals = run(args, work, plan)
            walls[name].append(wall)
            last[name] = (weights, totals)
    reference = last["stock (all in RAM)"][0]
    stock_wall = median(walls["stock (all in RAM)"])
    rows = []
    for name, plan in plans:
        weights, totals = last[name]
        rows.append(
            {
                "run": name,
                "host MiB": "-" if plan is None else plan.host_bytes / 2**20,
                "wall s": median(walls[name]),
                "x stock": ratio(median(walls[name]), stock_wall),
                "disk wr MiB": 0 if totals is None else totals["disk"]["bytes_written"] / 2**20,
                "disk rd MiB": 0 if totals is None else totals["disk"]["bytes_read"] / 2**20,
                "stall s": 0 if totals is None else totals["stall_seconds"],
                "bit-exact": identical(weights, reference),
            }
        )
    setting = {
        **machine(),
        "model": f"Llama hidden {args.hidden}, {args.layers} layers, float32",
        "samples x seq_len": f"{args.samples} x {args.seq_len}",
        "cached at once (stock size())": f"{cached_per_layer / 2**20:.1f} MiB",
        "repeats": args.repeats,
        "page cache dropped before each run": "yes" if COLD["every run"] else "no (not root)",
    }
    for name, value in setting.items():
        print(f"{name}: {value}")
    report(
        f"llm-compressor oneshot ({args.recipe} W4A16, sequential, prefetch): stock vs spillcache",
        rows,
        setting,
    )


if __name__ == "__main__":
    main()
