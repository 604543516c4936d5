"""A small end-to-end run: layer-by-layer calibration with activations spilled to disk.

Uses the public API only. A stack of random linear+GELU layers stands in for a model;
each layer gets a calibration pass (accumulating the GPTQ statistic X^T X of its input)
and a propagation pass (writing the next layer's input and deleting the consumed one),
as llm-compressor's sequential pipeline does. The same run with everything in RAM gives
the reference, and the statistics must match bit for bit.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass

import torch

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


def _model(layers: int, hidden: int, seed: int) -> list[torch.nn.Linear]:
    generator = torch.Generator().manual_seed(seed)
    stack = []
    for _ in range(layers):
        layer = torch.nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(hidden, hidden, generator=generator) / hidden**0.5)
        stack.append(layer)
    return stack


def _calibrate(cache: IntermediatesCache, model: list[torch.nn.Linear]) -> list[torch.Tensor]:
    """The sequential pipeline's loop; returns each layer's X^T X."""
    hessians = []
    with torch.no_grad():
        for layer_index, layer in enumerate(model):
            hessian = torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64)
            for inputs in cache.iter_prefetch(["hidden"]):
                x = inputs["hidden"].reshape(-1, layer.in_features).double()
                hessian += x.T @ x
            hessians.append(hessian)
            if layer_index == len(model) - 1:
                break
            for batch_index, inputs in enumerate(cache.iter_prefetch(["hidden"])):
                output = torch.nn.functional.gelu(layer(inputs["hidden"]))
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
) -> DemoResult:
    """Calibrate once all in RAM and once through ``config``; compare the statistics."""
    model = _model(layers, hidden, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    batches = [
        {"hidden": torch.randn(1, seq_len, hidden, generator=generator), "position": index}
        for index in range(samples)
    ]
    cached_bytes = sum(batch["hidden"].nbytes for batch in batches)

    start = time.perf_counter()
    in_ram = CacheConfig(host_bytes=2 * cached_bytes + 2**20, disk_path=None)
    with IntermediatesCache([dict(b) for b in batches], config=in_ram) as reference_cache:
        reference = _calibrate(reference_cache, model)
    reference_seconds = time.perf_counter() - start

    if config is None:
        config = CacheConfig(host_bytes=cached_bytes // 4, disk_path=tempfile.gettempdir())
    start = time.perf_counter()
    with IntermediatesCache([dict(b) for b in batches], config=config) as cache:
        result = _calibrate(cache, model)
        stats = cache.stats()
    wall_seconds = time.perf_counter() - start

    identical = all(torch.equal(a, b) for a, b in zip(reference, result, strict=True))
    return DemoResult(cached_bytes, wall_seconds, reference_seconds, stats, identical)
