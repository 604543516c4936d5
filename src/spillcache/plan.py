"""How much a calibration run caches, and what it will make the disk do: ``spillcache plan``.

The sequential pipeline's use of the cache is fixed by the model's shape: per sample, a
few tensors of known size, stored, read back once or twice per layer, replaced and
deleted in a known order (``pipeline_passes``). What the disk does with them depends on
the placement rules (scan eviction, free room, bypass, clean copies, write-behind), and
rather than a second model of those rules, which would drift from them, the plan replays
that order through a real cache (``replay``), with every tensor and budget divided by
one factor so that the replay moves a few MiB. Dividing sizes and budgets by a common
divisor of all the sizes changes no decision the cache makes: every comparison it makes
is between sums of sizes and a budget, and ``sum <= budget`` holds exactly when
``sum / k <= floor(budget / k)``. Every layer is replayed unless that takes more than
``MAX_REPLAYED_STEPS`` fetches (then the plan says it is an estimate).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .cache import IntermediatesCache
from .config import CacheConfig

__all__ = [
    "Cached",
    "ModelShape",
    "Pass",
    "Traffic",
    "Workload",
    "replay",
    "sequential_pipeline",
]

# A replay of more passes x samples than this replays fewer layers, at least
# MIN_REPLAYED_LAYERS (the first, two in the middle, the last), and counts each left
# out as its third: an estimate (``Traffic.replayed_layers`` says how many were run),
# because the host tier's resident set can drift by a sample per layer.
MAX_REPLAYED_STEPS = 150_000
MIN_REPLAYED_LAYERS = 4
# The replay's tensors are at most this large: small enough that a replay of thousands
# of samples moves little, large enough that rounding leaves ratios alone.
REPLAY_TENSOR_BYTES = 64 << 10


@dataclass(frozen=True)
class Cached:
    """One tensor the pipeline caches per sample."""

    key: str
    nbytes: int
    what: str  # for people: "hidden states", "causal mask", ...


@dataclass(frozen=True)
class Pass:
    """One pass over every sample, in order (``iter_prefetch``): fetch ``reads``, then
    store ``stores``, then delete ``deletes``. ``layer`` numbers the layer it belongs to
    (-1: before the first)."""

    layer: int
    reads: tuple[str, ...]
    stores: tuple[Cached, ...] = ()
    deletes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Workload:
    """What one rank's pipeline does with its cache."""

    samples: int
    layers: int
    fill: tuple[Cached, ...]  # stored per sample before the first pass
    passes: tuple[Pass, ...]

    def cached(self) -> list[Cached]:
        """Every tensor stored per sample, first of each key only (a layer's hidden
        states replace the previous layer's)."""
        seen: dict[str, Cached] = {}
        for item in (*self.fill, *(c for p in self.passes for c in p.stores)):
            seen.setdefault(item.key, item)
        return list(seen.values())


@dataclass(frozen=True)
class ModelShape:
    """What sizes a decoder-only model's cached values: per sample, ``seq_len`` tokens
    of ``hidden`` values in ``dtype``; a causal mask of ``seq_len``² elements of
    ``mask`` (None: not cached); rotary embeddings (cos and sin) of ``head_dim`` each
    (None: none cached)."""

    hidden: int
    seq_len: int
    dtype: torch.dtype
    mask: torch.dtype | None
    head_dim: int | None = None

    def hidden_bytes(self) -> int:
        return self.seq_len * self.hidden * self.dtype.itemsize


IDS = 8  # bytes of an int64 token id or position id


def sequential_pipeline(shape: ModelShape, samples: int) -> Callable[[int], Workload]:
    """llm-compressor's sequential pipeline (GPTQ and other one-pass recipes), call for
    call: the dataloader's token ids and attention mask per sample; subgraph 0 (the
    embeddings, position ids, causal mask and rotary embeddings) and subgraph k (layer
    k - 1) each make a calibration pass (fetches) and a propagation pass that stores
    the subgraph's outputs, then deletes the inputs it consumed; the last subgraph's
    propagation pass only fetches. ``spillcache demo`` runs the same order."""
    seq = shape.seq_len
    hidden = [Cached("embeddings", shape.hidden_bytes(), "hidden states")]
    shared = [Cached("position_ids", IDS * seq, "position ids")]
    if shape.mask is not None:
        shared.append(Cached("causal_mask", seq * seq * shape.mask.itemsize, "causal mask"))
    if shape.head_dim is not None:
        rotary = seq * shape.head_dim * shape.dtype.itemsize
        shared += [Cached(f"rotary_{part}", rotary, "rotary embeddings") for part in ("cos", "sin")]
    inputs = (
        Cached("input_ids", IDS * seq, "token ids"),
        Cached("attention_mask", IDS * seq, "token ids"),
    )

    def workload(layers: int) -> Workload:
        states = hidden + [
            Cached(f"layer_{k}_output", shape.hidden_bytes(), "hidden states")
            for k in range(layers)
        ]
        first_reads = tuple(c.key for c in inputs)
        passes = [
            Pass(-1, first_reads),
            Pass(-1, first_reads, (states[0], *shared), first_reads),
        ]
        for layer in range(layers):
            reads = (states[layer].key, *(c.key for c in shared))
            passes.append(Pass(layer, reads))
            if layer < layers - 1:
                passes.append(Pass(layer, reads, (states[layer + 1],), (states[layer].key,)))
            else:
                passes.append(Pass(layer, reads))
        return Workload(samples, layers, inputs, tuple(passes))

    return workload


@dataclass
class Traffic:
    """What the disk does for one rank over the whole run (bytes)."""

    written: int = 0
    read: int = 0
    disk_peak: int = 0  # bytes of values on disk at once, at most
    host_peak: int = 0
    by_layer: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (w, r)
    replayed_layers: int = 0  # fewer than the model's: the others were estimated


def replay(
    workload_of: Callable[[int], Workload],
    layers: int,
    config: CacheConfig,
    *,
    directory: str | None = None,
) -> Traffic:
    """The disk traffic of ``workload_of(layers)`` (the workload of a model with that
    many layers) through a cache of ``config`` (one rank's budgets), found by running
    it at a reduced scale through a real cache (see MAX_REPLAYED_STEPS)."""
    workload = workload_of(layers)
    tiered = [c for c in workload.cached() if c.nbytes >= config.inline_bytes]
    if not tiered:
        return Traffic()
    divisor = _divisor([c.nbytes for c in tiered])
    affordable = MAX_REPLAYED_STEPS // (2 * workload.samples)
    short = workload_of(min(layers, max(affordable, MIN_REPLAYED_LAYERS)))
    scratch = tempfile.mkdtemp(prefix="spillcache-plan-", dir=directory or _scratch_parent())
    scaled = _scaled_config(config, divisor, scratch, [c.nbytes for c in tiered])
    keep = {c.key for c in tiered}
    traffic = Traffic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a tmpfs scratch directory is meant
        cache = IntermediatesCache.empty(short.samples, "cpu", config=scaled)
    with cache, _removed(scratch):
        _fill(cache, short, keep, divisor)
        last = (0, 0)
        for step in short.passes:
            _run_pass(cache, step, keep, divisor)
            cache.flush()  # a pass's writes are counted with it (the disk keeps up)
            disk = cache.stats()["disk"]
            done = (disk["bytes_written"], disk["bytes_read"])
            before = traffic.by_layer.get(step.layer, (0, 0))
            traffic.by_layer[step.layer] = (
                before[0] + done[0] - last[0],
                before[1] + done[1] - last[1],
            )
            last = done
        cache.flush()
        stats = cache.stats()
    traffic.written, traffic.read = stats["disk"]["bytes_written"], stats["disk"]["bytes_read"]
    traffic.disk_peak = stats["pool"]["disk"]["peak_bytes"]
    traffic.host_peak = stats["pool"]["host"]["peak_bytes"]
    return _counted_whole(traffic, workload, short, divisor)


def _scratch_parent() -> str:
    """Where the replay's small store goes: RAM (tmpfs) where there is one."""
    return (
        "/dev/shm"
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK)
        else (tempfile.gettempdir())
    )


@contextlib.contextmanager
def _removed(directory: str) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _divisor(sizes: list[int]) -> int:
    """The largest common divisor of ``sizes`` that keeps the largest replayed tensor
    at least REPLAY_TENSOR_BYTES / 8 (a smaller one where that is all they share)."""
    common = math.gcd(*sizes)
    floor_bytes = min(max(sizes), REPLAY_TENSOR_BYTES // 8)
    best = 1
    for candidate in _divisors(common):
        if max(sizes) // candidate >= floor_bytes and candidate > best:
            best = candidate
    return best


def _divisors(number: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(number) + 1) if number % d == 0]
    return small + [number // d for d in small]


def _scaled_config(
    config: CacheConfig, divisor: int, directory: str, sizes: list[int]
) -> CacheConfig:
    largest = max(sizes) // divisor

    def scaled(budget: int | None, *, at_least: int = 0) -> int | None:
        return None if budget is None else max(budget // divisor, at_least)

    return config.replace(
        host_bytes=scaled(config.host_bytes),
        device_bytes=0,
        disk_bytes=scaled(config.disk_bytes),
        inline_bytes=0,
        disk_path=directory,
        keep_store=False,
        checksum=False,
        # Write-behind and read buffers only change when values move, not where they
        # go; at least one tensor's worth each, as the real budgets are.
        write_behind_bytes=scaled(config.write_behind_bytes, at_least=largest),
        read_buffer_bytes=scaled(config.read_buffer_bytes, at_least=largest),
        budget_scope="rank",
        remove_dead_stores=False,
    )


def _counted_whole(traffic: Traffic, workload: Workload, short: Workload, divisor: int) -> Traffic:
    """Scale the replay back up, and count the layers it left out as its last but one
    (its first layer is the model's first, its last the model's last)."""
    missing = workload.layers - short.layers
    middle = traffic.by_layer.get(short.layers - 2, (0, 0))
    whole = Traffic(
        written=(traffic.written + missing * middle[0]) * divisor,
        read=(traffic.read + missing * middle[1]) * divisor,
        disk_peak=traffic.disk_peak * divisor,
        host_peak=traffic.host_peak * divisor,
        replayed_layers=short.layers,
    )
    for layer, (written, read) in traffic.by_layer.items():
        whole.by_layer[layer] = (written * divisor, read * divisor)
    return whole


def _tensor(nbytes: int, divisor: int) -> torch.Tensor:
    return torch.empty(nbytes // divisor, dtype=torch.uint8)


def _fill(cache: IntermediatesCache, workload: Workload, keep: set[str], divisor: int) -> None:
    for index in range(workload.samples):
        cache.update(
            index, {c.key: _tensor(c.nbytes, divisor) for c in workload.fill if c.key in keep}
        )


def _run_pass(cache: IntermediatesCache, step: Pass, keep: set[str], divisor: int) -> None:
    reads = [key for key in step.reads if key in keep]
    stores = [c for c in step.stores if c.key in keep]
    deletes = [key for key in step.deletes if key in keep]
    for index, _ in enumerate(cache.iter_prefetch(reads)):
        if stores:
            cache.update(index, {c.key: _tensor(c.nbytes, divisor) for c in stores})
        if deletes:
            cache.delete(index, deletes)
