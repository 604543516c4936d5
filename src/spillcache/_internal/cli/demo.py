"""A small end-to-end run: layer-by-layer calibration of a decoder-only transformer whose
cached activations spill to disk.

Uses the public API only. A model of ``layers`` pre-norm decoder blocks (causal
self-attention and a gated MLP) is built with random weights from a seed: nothing is
downloaded. The cache is used as llm-compressor's sequential pipeline uses it, call for
call: filled with token ids, then a subgraph making the embeddings and the causal
mask, then one per block, each with a calibration pass (hooks accumulate the GPTQ
statistic X^T X of every linear layer's input, in float32 as GPTQ does) and a
propagation pass (the block's output stored as the next block's input, then the
consumed input deleted). Every batch caches its hidden state and its causal mask, as
the pipeline caches a layer's inputs. The same run with everything
in RAM gives the reference, and every statistic must match bit for bit.

Inputs are made batch by batch from the seed as the cache is filled: outside its cache,
a run holds only the batches it is working on, never all the activations.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn
from tqdm import tqdm

from spillcache.cache import IntermediatesCache
from spillcache.config import CacheConfig
from spillcache.errors import ConfigError

from ..process.resolved import check_host_budget, checked_disk_dirs, process_budgets
from ..sysinfo import ram_limit
from ..text import format_bytes
from .plan import host_bytes_for_tier

__all__ = [
    "DEFAULT_SIZES",
    "DemoResult",
    "DemoRun",
    "PROGRESS_BARS",
    "PROGRESS_LINES",
    "activation_bytes",
    "hidden_state_bytes",
    "calibrate",
    "default_host_bytes",
    "identical",
    "reference_config",
    "run_demo",
]

VOCAB = 1000

# The defaults of `spillcache demo`: 512 samples of 256 tokens at hidden size 256 cache
# 128 MiB of float32 hidden states and 32 MiB of causal masks. The default host tier, a
# quarter of that (40 MiB; host_bytes is that and the parts for values on their way to
# and from disk, ``default_host_bytes``), leaves three quarters of every pass on disk, so
# the disk tier does real work (figures and times: docs/benchmarks.md); nearly all the time is
# the model's float32 matmuls, growing linearly with samples x layers. Three layers are
# the fewest that rewrite every cached hidden state twice. (The tests pass small sizes.)
DEFAULT_SIZES = {"samples": 512, "seq_len": 256, "hidden": 256, "layers": 3}

# How a run shows its progress (``progress``): tqdm bars, redrawn in place, for a
# terminal; one line per stage when it ends, for a log (a bar redrawn into a file is
# a line per redraw, some 1,400 of them); or nothing (None or False).
PROGRESS_BARS = "bars"
PROGRESS_LINES = "lines"

Item = TypeVar("Item")


@dataclass
class DemoRun:
    """One calibration: every linear layer's X^T X, the cache's stats() at the end, and
    the wall time (filling the cache included: it is the pipeline's first step)."""

    hessians: dict[str, torch.Tensor]
    stats: dict
    seconds: float


@dataclass
class DemoResult:
    """``host_bytes``: what the spilling run's config came to (all its host memory; the
    host tier's part is ``stats["host"]["budget"]``)."""

    cached_bytes: int
    wall_seconds: float
    reference_seconds: float
    stats: dict
    identical: bool
    host_bytes: int


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def heads_for(hidden: int) -> int:
    """Heads of width 64 where ``hidden`` is a multiple of 64; else one head."""
    return hidden // 64 if hidden % 64 == 0 else 1


class DecoderBlock(nn.Module):
    """Pre-norm causal self-attention and a gated (SwiGLU) MLP, as in Llama."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = RMSNorm(hidden)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(hidden, hidden, bias=False) for _ in range(4)
        )
        self.mlp_norm = RMSNorm(hidden)
        self.gate_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        h = self.attn_norm(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        scores = q @ k.transpose(-1, -2) / math.sqrt(hidden // self.heads)
        scores = scores.masked_fill(~causal_mask, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, hidden)
        x = x + self.o_proj(attended)
        h = self.mlp_norm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


def hidden_state_bytes(samples: int, seq_len: int, hidden: int) -> int:
    """Bytes of the demo's float32 hidden states, over all samples."""
    return samples * seq_len * hidden * 4


def activation_bytes(samples: int, seq_len: int, hidden: int) -> int:
    """Bytes the demo caches: per sample a float32 hidden state and a bool causal mask."""
    return hidden_state_bytes(samples, seq_len, hidden) + samples * seq_len * seq_len


def default_host_bytes(cached_bytes: int, config: CacheConfig | None = None) -> int:
    """The demo's default host_bytes: a host tier of a quarter of the activations, and
    the parts of host_bytes that ``config``'s write_behind_bytes and read_buffer_bytes
    take (an eighth each where they are "auto")."""
    config = config or CacheConfig()
    return host_bytes_for_tier(
        cached_bytes // 4, config.write_behind_bytes, config.read_buffer_bytes
    )


def reference_config(cached_bytes: int) -> CacheConfig:
    """Everything in RAM, no disk tier: the run every other is checked against."""
    return CacheConfig(host_bytes=4 * cached_bytes + 2**20, disk_path=None)


def _check_reference_fits(cached_bytes: int) -> None:
    """The all-in-RAM run maps a region of ``reference_config``'s host_bytes: one
    larger than the RAM is refused by the kernel, so refuse the sizes first."""
    region = reference_config(cached_bytes).host_bytes
    ram_bytes, ram_what = ram_limit()
    if region > ram_bytes:
        raise ConfigError(
            f"the all-in-RAM reference run holds these sizes' {format_bytes(cached_bytes)} "
            f"of activations in a region of {format_bytes(region, tib=True)}, more than "
            f"{ram_what}, {format_bytes(ram_bytes)}: lower --samples, --seq-len or --hidden"
        )


def _model(layers: int, hidden: int, seed: int) -> tuple[nn.Embedding, list[DecoderBlock]]:
    torch.manual_seed(seed)
    embed = nn.Embedding(VOCAB, hidden)
    blocks = [DecoderBlock(hidden, heads_for(hidden)) for _ in range(layers)]
    return embed, blocks


def _tokens(seq_len: int, seed: int, index: int) -> torch.Tensor:
    """Sample ``index``'s token ids, the same whenever they are made."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randint(0, VOCAB, (1, seq_len), generator=generator)


def hidden_key(block: int) -> str:
    """The key of block ``block``'s input hidden states (block 0's: the embeddings)."""
    return f"hidden.{block}"


def _stage(
    items: Iterable[Item], desc: str, total: int, progress: str | bool | None
) -> Iterator[Item]:
    """``items``, one stage of a run, shown as ``progress`` says (``PROGRESS_BARS``, or
    True: a tqdm bar on stderr; ``PROGRESS_LINES``: one line on stderr as it ends)."""
    if progress in (True, PROGRESS_BARS):
        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    start, count = time.perf_counter(), 0
    for item in items:
        count += 1
        yield item
    if progress == PROGRESS_LINES:
        seconds = time.perf_counter() - start
        print(f"{desc}: {count} batches, {seconds:.1f} s", file=sys.stderr, flush=True)


def _pipeline(
    cache: IntermediatesCache,
    embed: nn.Embedding,
    blocks: list[DecoderBlock],
    progress: str | bool | None,
    label: str,
) -> dict[str, torch.Tensor]:
    """llm-compressor's sequential pipeline, call for call (``spillcache plan`` predicts
    its disk traffic from that order): subgraph 0 makes the embeddings and the causal
    mask from the token ids, subgraph k runs block k-1. Each subgraph has a calibration
    pass (fetches only; hooks accumulate the statistics) and a propagation pass that
    stores its outputs, then deletes the inputs it consumed; the last subgraph's
    propagation pass only reads. Returns every linear layer's X^T X."""
    hessians: dict[str, torch.Tensor] = {}
    for subgraph in range(len(blocks) + 1):
        block = blocks[subgraph - 1] if subgraph else None
        names = ["input_ids"] if block is None else [hidden_key(subgraph - 1), "causal_mask"]
        handles = [] if block is None else _statistics_hooks(block, subgraph - 1, hessians)
        stage = f"{label}subgraph {subgraph} of {len(blocks)}"
        passes = _stage(cache.iter_prefetch(names), f"{stage}, calibrate", len(cache), progress)
        for inputs in passes:
            if block is not None:
                block(inputs[hidden_key(subgraph - 1)], inputs["causal_mask"])
        for handle in handles:
            handle.remove()
        last = subgraph == len(blocks)
        passes = _stage(cache.iter_prefetch(names), f"{stage}, propagate", len(cache), progress)
        for batch_index, inputs in enumerate(passes):
            if last:
                continue  # its outputs are not cached: the pass only reads
            if block is None:
                seq_len = inputs["input_ids"].shape[-1]
                mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
                outputs = {hidden_key(0): embed(inputs["input_ids"]), "causal_mask": mask}
            else:
                hidden = block(inputs[hidden_key(subgraph - 1)], inputs["causal_mask"])
                outputs = {hidden_key(subgraph): hidden}
            del inputs
            cache.update(batch_index, outputs)
            cache.delete(batch_index, names[:1])
    return hessians


def _statistics_hooks(block: DecoderBlock, index: int, hessians: dict) -> list:
    """Hooks adding every linear layer's X^T X of ``block`` into ``hessians``."""
    handles = []
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear):
            key = f"layers.{index}.{name}"
            hessians[key] = torch.zeros(module.in_features, module.in_features)

            def accumulate(_, inputs, __, key=key):
                x = inputs[0].reshape(-1, inputs[0].shape[-1])
                hessians[key].addmm_(x.T, x)

            handles.append(module.register_forward_hook(accumulate))
    return handles


def calibrate(
    config: CacheConfig,
    *,
    samples: int,
    seq_len: int,
    hidden: int,
    layers: int,
    seed: int = 0,
    progress: str | bool | None = None,
    label: str = "",
) -> DemoRun:
    """One timed calibration through a cache built with ``config``: fill, then the
    pipeline's passes. The model and the inputs depend on the sizes and ``seed`` only.
    ``progress``: ``PROGRESS_BARS``, ``PROGRESS_LINES`` or None (see ``_stage``);
    ``label`` prefixes each stage's name."""
    _check_sizes(samples=samples, seq_len=seq_len, hidden=hidden, layers=layers)
    embed, blocks = _model(layers, hidden, seed)
    with torch.no_grad():
        # Untimed: torch's lazy set-up would otherwise land on whichever run is first.
        warm = embed(_tokens(seq_len, seed, 0))
        blocks[0](warm, torch.ones(seq_len, seq_len, dtype=torch.bool).tril())
        del warm
        gc.collect()
        start = time.perf_counter()
        with IntermediatesCache.empty(samples, offload_device="cpu", config=config) as cache:
            fill = _stage(range(samples), f"{label}fill the cache", samples, progress)
            for index in fill:  # as from_dataloader fills it: the token ids
                cache.update(index, {"input_ids": _tokens(seq_len, seed, index), "position": index})
            hessians = _pipeline(cache, embed, blocks, progress, label)
            stats = cache.stats()
        seconds = time.perf_counter() - start
    return DemoRun(hessians, stats, seconds)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Same keys, and every tensor equal bit for bit (dtype, shape and bits)."""
    return a.keys() == b.keys() and all(
        a[key].dtype == b[key].dtype
        and a[key].shape == b[key].shape
        and torch.equal(_bits(a[key]), _bits(b[key]))
        for key in a
    )


def run_demo(
    *,
    samples: int = DEFAULT_SIZES["samples"],
    seq_len: int = DEFAULT_SIZES["seq_len"],
    hidden: int = DEFAULT_SIZES["hidden"],
    layers: int = DEFAULT_SIZES["layers"],
    config: CacheConfig | None = None,
    seed: int = 0,
    progress: str | bool | None = None,
) -> DemoResult:
    """Calibrate once all in RAM and once through ``config``; compare the statistics.

    ``config`` None: the defaults with a host tier of a quarter of the activations
    (``default_host_bytes``). ``progress``: as for ``calibrate``.
    """
    cached_bytes = activation_bytes(samples, seq_len, hidden)
    sizes = dict(samples=samples, seq_len=seq_len, hidden=hidden, layers=layers, seed=seed)
    if config is None:
        config = CacheConfig(host_bytes=default_host_bytes(cached_bytes))
    # Checked before either run, not after the all-in-RAM one (parts of host_bytes above
    # it, a budget beyond the RAM, a disk_path that cannot hold a store are refused);
    # "auto" is measured now, as the cache measures it. The cache warns when it is made.
    _check_reference_fits(cached_bytes)
    budgets = process_budgets(config)
    check_host_budget(config, budgets, warn=False)
    checked_disk_dirs(config, warn_ram_backed=False)
    host_bytes = budgets.host_bytes
    reference = calibrate(
        reference_config(cached_bytes), progress=progress, label="all in RAM: ", **sizes
    )
    result = calibrate(config, progress=progress, label="spilling: ", **sizes)
    return DemoResult(
        cached_bytes=cached_bytes,
        wall_seconds=result.seconds,
        reference_seconds=reference.seconds,
        stats=result.stats,
        identical=identical(reference.hessians, result.hessians),
        host_bytes=host_bytes,
    )
