"""A small end-to-end run: layer-by-layer calibration of a decoder-only transformer whose
cached activations spill to disk.

Uses the public API only. A model of ``layers`` pre-norm decoder blocks (causal
self-attention and a gated MLP) is built with random weights from a seed: nothing is
downloaded. As llm-compressor's sequential pipeline does, each block gets a calibration
pass (hooks accumulate the GPTQ statistic X^T X of every linear layer's input) and a
propagation pass (the block's output becomes the next block's input; the consumed input
is deleted). The same run with everything in RAM gives the reference, and every
statistic must match bit for bit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from .cache import IntermediatesCache
from .config import CacheConfig

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    cached_bytes: int
    wall_seconds: float
    reference_seconds: float
    stats: dict
    identical: bool


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


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


def _model(layers: int, hidden: int, seed: int) -> tuple[nn.Embedding, list[DecoderBlock]]:
    torch.manual_seed(seed)
    embed = nn.Embedding(1000, hidden)
    blocks = [DecoderBlock(hidden, heads=max(1, hidden // 64)) for _ in range(layers)]
    return embed, blocks


def _calibrate(
    cache: IntermediatesCache, blocks: list[DecoderBlock], progress: bool
) -> dict[str, torch.Tensor]:
    """The sequential pipeline's loop; returns every linear layer's X^T X (float64)."""
    hessians: dict[str, torch.Tensor] = {}
    names = ["hidden", "causal_mask"]
    with torch.no_grad():
        for index, block in enumerate(blocks):
            handles = []
            for name, module in block.named_modules():
                if isinstance(module, nn.Linear):
                    key = f"layers.{index}.{name}"
                    hessians[key] = torch.zeros(
                        module.in_features, module.in_features, dtype=torch.float64
                    )

                    def accumulate(_, inputs, __, key=key):
                        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                        hessians[key] += x.T @ x

                    handles.append(module.register_forward_hook(accumulate))
            bar = dict(total=len(cache), leave=False, disable=not progress)
            for inputs in tqdm(cache.iter_prefetch(names), desc=f"layer {index} calibrate", **bar):
                block(inputs["hidden"], inputs["causal_mask"])
            for handle in handles:
                handle.remove()
            if index == len(blocks) - 1:
                break
            batches = tqdm(cache.iter_prefetch(names), desc=f"layer {index} propagate", **bar)
            for batch_index, inputs in enumerate(batches):
                output = block(inputs["hidden"], inputs["causal_mask"])
                del inputs
                cache.delete(batch_index, ["hidden"])
                cache.update(batch_index, {"hidden": output})
    return hessians


def run_demo(
    *,
    samples: int = 32,
    seq_len: int = 256,
    hidden: int = 256,
    layers: int = 4,
    config: CacheConfig | None = None,
    seed: int = 0,
    progress: bool = False,
) -> DemoResult:
    """Calibrate once all in RAM and once through ``config``; compare the statistics."""
    embed, blocks = _model(layers, hidden, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    causal_mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    with torch.no_grad():
        batches = [
            {
                "hidden": embed(torch.randint(0, 1000, (1, seq_len), generator=generator)),
                "causal_mask": causal_mask,
                "position": index,
            }
            for index in range(samples)
        ]
    cached_bytes = sum(batch["hidden"].nbytes for batch in batches)

    start = time.perf_counter()
    in_ram = CacheConfig(host_bytes=4 * cached_bytes + 2**20, disk_path=None)
    with IntermediatesCache([dict(b) for b in batches], config=in_ram) as reference_cache:
        reference = _calibrate(reference_cache, blocks, progress)
    reference_seconds = time.perf_counter() - start

    if config is None:
        config = CacheConfig(host_bytes=cached_bytes // 4)
    start = time.perf_counter()
    with IntermediatesCache([dict(b) for b in batches], config=config) as cache:
        result = _calibrate(cache, blocks, progress)
        stats = cache.stats()
    wall_seconds = time.perf_counter() - start

    identical = reference.keys() == result.keys() and all(
        torch.equal(reference[key], result[key]) for key in reference
    )
    return DemoResult(cached_bytes, wall_seconds, reference_seconds, stats, identical)
