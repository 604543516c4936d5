"""How much a calibration run caches, and what it will make the disk do: ``spillcache plan``.

The sequential pipeline's use of the cache is fixed by the model's shape: per sample, a
few tensors of known size, stored, read back once or twice per layer, replaced and
deleted in a known order (``sequential_pipeline``). What the disk does with them depends on
the placement rules (scan eviction, free room, bypass, clean copies, write-behind), and
rather than a second model of those rules, which would drift from them, the plan replays
that order through a real cache (``replay``), with every tensor and budget divided by
one factor so that the replay moves a few MiB. Dividing sizes and budgets by a common
divisor of all the sizes changes no decision the cache makes: every comparison it makes
is between sums of sizes and a budget, and ``sum <= budget`` holds exactly when
``sum / k <= floor(budget / k)``. The budget divided so is the host tier's (what
write_behind_bytes and read_buffer_bytes leave of host_bytes, ``rank_budgets``): the
replay's host_bytes is that tier divided plus its own two parts, so the tier stays exact.
Every layer is replayed unless that takes more than ``MAX_REPLAYED_STEPS`` fetches (then
the plan says it is an estimate).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spillcache.cache import IntermediatesCache
from spillcache.config import AUTO, CacheConfig

from ..process.resolved import ResolvedBudgets, process_budgets, transit_bytes

__all__ = [
    "AWQ_READS",
    "Cached",
    "ModelShape",
    "Pass",
    "Traffic",
    "Workload",
    "awq_caches",
    "awq_figures",
    "host_bytes_for_tier",
    "model_weights",
    "rank_budgets",
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
    # Other caches of the same config filled during this pass, one sample each per
    # batch fetched (AWQ's caches of a layer's module inputs), then, after the pass and
    # one cache at a time: every batch pinned, ``side_reads`` full passes, dropped.
    side_caches: tuple[tuple[Cached, ...], ...] = ()
    side_reads: int = 0


@dataclass(frozen=True)
class Workload:
    """What one rank's pipeline does with its cache."""

    samples: int
    layers: int
    fill: tuple[Cached, ...]  # stored per sample before the first pass
    passes: tuple[Pass, ...]

    def cached(self) -> list[Cached]:
        """Every tensor the pipeline's cache stores per sample, first of each key only
        (a layer's hidden states replace the previous layer's)."""
        seen: dict[str, Cached] = {}
        for item in (*self.fill, *(c for p in self.passes for c in p.stores)):
            seen.setdefault(item.key, item)
        return list(seen.values())

    def sizes(self) -> set[int]:
        """The size of every tensor stored, in any cache."""
        side = (c for p in self.passes for cache in p.side_caches for c in cache)
        return {c.nbytes for c in (*self.cached(), *side)}


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
    intermediate: int | None = None  # the MLP's width (AWQ caches down_proj's input)
    o_proj_mapped: bool = False  # AWQ maps v_proj -> o_proj (as many kv heads as heads)

    def hidden_bytes(self) -> int:
        return self.seq_len * self.hidden * self.dtype.itemsize


# AWQ replays each cache once unquantized and once per grid point (n_grid, 20).
AWQ_READS = 21


def awq_caches(shape: ModelShape) -> tuple[tuple[Cached, ...], ...]:
    """What llm-compressor 0.14's AWQ caches per sample for one layer, one tuple per
    mapping parent in forward order: the attention's inputs (its hidden states, rotary
    embeddings, mask and position ids: copies of the pipeline's), o_proj's input where
    v_proj -> o_proj is mapped, the MLP's input, down_proj's input."""
    seq, size = shape.seq_len, shape.dtype.itemsize
    attention = [Cached("hidden_states", shape.hidden_bytes(), "AWQ inputs")]
    if shape.head_dim is not None:
        attention += [
            Cached(f"rotary_{p}", seq * shape.head_dim * size, "AWQ inputs") for p in ("cos", "sin")
        ]
    if shape.mask is not None:
        attention.append(Cached("attention_mask", seq * seq * shape.mask.itemsize, "AWQ inputs"))
    attention.append(Cached("position_ids", IDS * seq, "AWQ inputs"))
    caches = [tuple(attention)]
    if shape.o_proj_mapped:
        caches.append((Cached("input", shape.hidden_bytes(), "AWQ inputs"),))
    caches.append((Cached("x", shape.hidden_bytes(), "AWQ inputs"),))
    intermediate = shape.intermediate or 4 * shape.hidden
    caches.append((Cached("input", seq * intermediate * size, "AWQ inputs"),))
    return tuple(caches)


IDS = 8  # bytes of an int64 token id or position id


def awq_figures(shape: ModelShape, samples: int, offload: str) -> dict[str, object]:
    """AWQ's caches of one layer, for the node: what they hold, and where."""
    per_layer = samples * sum(c.nbytes for cache in awq_caches(shape) for c in cache)
    if offload == "gpu":
        note = (
            "they keep their values on the GPUs (offload_device None): GPU memory, "
            "not host RAM or disk; the disk figures are the pipeline's cache's"
        )
    else:
        note = (
            f"they share the host budget with the pipeline's cache, and what spills is "
            f"read back {AWQ_READS} times per layer: included in the disk figures"
        )
    return {"per_layer_bytes": per_layer, "offload": offload, "note": note}


def sequential_pipeline(
    shape: ModelShape, samples: int, *, awq: bool = False
) -> Callable[[int], Workload]:
    """llm-compressor's sequential pipeline (GPTQ and other one-pass recipes), call for
    call: the dataloader's token ids and attention mask per sample; subgraph 0 (the
    embeddings, position ids, causal mask and rotary embeddings) and subgraph k (layer
    k - 1) each make a calibration pass (fetches) and a propagation pass that stores
    the subgraph's outputs, then deletes the inputs it consumed; the last subgraph's
    propagation pass only fetches. ``spillcache demo`` runs the same order. With ``awq``,
    each layer's calibration pass also fills AWQ's caches of that layer (``awq_caches``),
    in the same pool, replayed ``AWQ_READS`` times after the pass."""
    side = awq_caches(shape) if awq else ()
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
            passes.append(Pass(layer, reads, side_caches=side, side_reads=AWQ_READS if awq else 0))
            if layer < layers - 1:
                passes.append(Pass(layer, reads, (states[layer + 1],), (states[layer].key,)))
            else:
                passes.append(Pass(layer, reads))
        return Workload(samples, layers, inputs, tuple(passes))

    return workload


def model_weights(config: dict, dtype: torch.dtype, directory: Path | None) -> tuple[int, str]:
    """Bytes of a model's weights, and how they were counted: the checkpoint's own
    figure where ``directory`` holds one (``model.safetensors.index.json``'s
    ``total_size``, else the size of its ``*.safetensors`` files), else the parameters
    of a Llama-style decoder of ``config``'s sizes (a Hugging Face config.json: dense or
    mixture-of-experts MLP) at ``dtype``."""
    if directory is not None:
        index = directory / "model.safetensors.index.json"
        try:
            total = json.loads(index.read_text())["metadata"]["total_size"]
        except (OSError, ValueError, KeyError, TypeError):
            total = None
        if isinstance(total, int) and total > 0:
            return total, f"{index.name}'s total_size"
        files = sorted(directory.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files), f"its {len(files)} .safetensors file(s)"
    count = _parameters(config)
    counted = next(
        (
            f"{count / scale:.1f}{unit}"
            for unit, scale in (("B", 1e9), ("M", 1e6))
            if count >= scale
        ),
        str(count),
    )
    return count * dtype.itemsize, (
        f"{counted} parameters of {_name(dtype)} counted from config.json's sizes"
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _parameters(config: dict) -> int:
    """Parameters of a Llama-style decoder (attention with grouped key-value heads, a
    gated MLP or gated experts, RMS norms, embeddings and, unless tied, an LM head):
    within a few percent of the checkpoints of that family; biases are not counted."""

    def size(*names: str, default: int = 0) -> int:
        for name in names:
            if isinstance(config.get(name), int):
                return config[name]
        return default

    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads = size("num_attention_heads", default=1)
    kv_heads = size("num_key_value_heads", default=heads)
    head_dim = size("head_dim", default=hidden // heads)
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    width = size("intermediate_size", default=4 * hidden)
    experts = size("num_local_experts", "num_experts", "n_routed_experts")
    if experts:
        expert_width = size("moe_intermediate_size", default=width)
        shared = size("shared_expert_intermediate_size") or (
            size("n_shared_experts") * expert_width
        )
        mlp = 3 * hidden * (experts * expert_width + shared) + hidden * experts  # + router
    else:
        mlp = 3 * hidden * width
    embeddings = size("vocab_size") * hidden
    head = 0 if config.get("tie_word_embeddings") else embeddings
    return layers * (attention + mlp + 2 * hidden) + hidden + embeddings + head


def rank_budgets(config: CacheConfig, ranks: int = 1) -> ResolvedBudgets:
    """The budgets of one of ``ranks`` ranks on a node run with ``config`` (host_bytes
    a number), as a cache there resolves them; ConfigError where write_behind_bytes
    and read_buffer_bytes are together more than host_bytes."""
    return process_budgets(config, ranks_on_node=ranks)


def host_bytes_for_tier(
    tier: int, write_behind_bytes: int | str = AUTO, read_buffer_bytes: int | str = AUTO
) -> int:
    """The smallest host_bytes whose host tier holds ``tier`` bytes, where host_bytes
    also holds ``write_behind_bytes`` and ``read_buffer_bytes`` (a number, or "auto":
    an eighth of host_bytes, at most ``resolved.TRANSIT_MAX``). One rank's sizes."""
    fixed = sum(p for p in (write_behind_bytes, read_buffer_bytes) if p != AUTO)
    autos = sum(p == AUTO for p in (write_behind_bytes, read_buffer_bytes))
    want = max(tier, 1) + fixed  # a tier of 0 is no region: host_bytes 0 means that
    if autos == 0:
        return want
    # Below the cap the tier of host = 8q + r is (8 - autos) q + r - fixed: the smallest
    # q whose r <= 7 reaches it, then the smallest r.
    share = 8 - autos
    q = max(0, -(-(want - 7) // share))
    host = 8 * q + max(0, want - share * q)
    if transit_bytes(host) < host // 8:  # past the cap: each auto part is the cap
        cap = transit_bytes(host)
        host = max(want + autos * cap, 8 * cap)
    return host


@dataclass
class Traffic:
    """What the disk does for one rank over the whole run (bytes)."""

    written: int = 0
    read: int = 0
    disk_peak: int = 0  # bytes of values on disk at once, at most
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
    tiered = [size for size in workload.sizes() if size >= config.inline_bytes]
    if not tiered:
        return Traffic()
    divisor = _divisor(tiered)
    affordable = MAX_REPLAYED_STEPS // (2 * workload.samples)
    short = workload_of(min(layers, max(affordable, MIN_REPLAYED_LAYERS)))
    scratch = tempfile.mkdtemp(prefix="spillcache-plan-", dir=directory or _scratch_parent())
    scaled = _scaled_config(config, divisor, scratch, tiered)
    inline = config.inline_bytes
    traffic = Traffic()
    # A tmpfs scratch directory is meant; and the replay's own host memory is no one's
    # concern (its read and write-behind parts may be too small for its prefetches, which
    # changes where a value waits, not which tier it goes to): no warning of the replay's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="spillcache's ", category=UserWarning)
        cache = IntermediatesCache.empty(short.samples, "cpu", config=scaled)
        with cache, _removed(scratch):
            _fill(cache, short, inline, divisor)
            last = (0, 0)
            stored = {c.key for c in short.cached() if c.nbytes >= inline}
            for step in short.passes:
                _run_pass(cache, step, stored, inline, divisor)
                cache.flush()  # a pass's writes are counted with it (the disk keeps up)
                counters = cache.stats()["pool"]["counters"]  # every cache of the replay
                done = (counters.get("disk.bytes_written", 0), counters.get("disk.bytes_read", 0))
                before = traffic.by_layer.get(step.layer, (0, 0))
                traffic.by_layer[step.layer] = (
                    before[0] + done[0] - last[0],
                    before[1] + done[1] - last[1],
                )
                last = done
            disk_peak = cache.stats()["pool"]["disk"]["peak_bytes"]  # every pass was flushed
    traffic.written, traffic.read = last
    traffic.disk_peak = disk_peak
    return _counted_whole(traffic, workload, short, divisor)


def _scratch_parent() -> str:
    """Where the replay's small store goes: RAM (tmpfs) where there is one."""
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        return "/dev/shm"
    return tempfile.gettempdir()


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
    budgets = rank_budgets(config)

    def scaled(budget: int | None, *, at_least: int = 0) -> int | None:
        """``budget`` divided; 0 (none: synchronous writes, unpooled reads) stays 0."""
        if not budget:
            return budget
        return max(budget // divisor, at_least)

    # Write-behind and read buffers only change when values move, not where they go;
    # at least one tensor's worth each, so that values move one at a time at least.
    write_behind = scaled(budgets.write_behind_bytes, at_least=largest)
    read_buffer = scaled(budgets.read_buffer_bytes, at_least=largest)
    # The tier is what is divided (every placement decision compares sizes with it);
    # host_bytes is that and the two parts (0, no region, stays 0).
    host = budgets.host_tier_bytes // divisor + write_behind + read_buffer
    return config.replace(
        host_bytes=host if budgets.host_bytes else 0,
        device_bytes=0,
        disk_bytes=scaled(config.disk_bytes),
        inline_bytes=0,
        disk_path=directory,
        keep_store=False,
        checksum=False,
        write_behind_bytes=write_behind,
        read_buffer_bytes=read_buffer,
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
        replayed_layers=short.layers,
    )
    for layer, (written, read) in traffic.by_layer.items():
        whole.by_layer[layer] = (written * divisor, read * divisor)
    return whole


def _tensor(nbytes: int, divisor: int) -> torch.Tensor:
    return torch.empty(nbytes // divisor, dtype=torch.uint8)


def _values(items: tuple[Cached, ...], inline: int, divisor: int) -> dict[str, torch.Tensor]:
    """A sample's tensors, scaled; those below ``inline`` left out (they stay with
    their entry in RAM and never reach a tier)."""
    return {c.key: _tensor(c.nbytes, divisor) for c in items if c.nbytes >= inline}


def _fill(cache: IntermediatesCache, workload: Workload, inline: int, divisor: int) -> None:
    for index in range(workload.samples):
        cache.update(index, _values(workload.fill, inline, divisor))


def _run_pass(
    cache: IntermediatesCache, step: Pass, stored: set[str], inline: int, divisor: int
) -> None:
    """One pass; ``stored``: the keys the replay stores (fetching others skips them)."""
    deletes = [key for key in step.deletes if key in stored]
    sides = [IntermediatesCache(None, None, config=cache.config) for _ in step.side_caches]
    for index, _ in enumerate(cache.iter_prefetch(list(step.reads))):
        for side, items in zip(sides, step.side_caches, strict=True):
            side.append(_values(items, inline, divisor))
        if step.stores:
            cache.update(index, _values(step.stores, inline, divisor))
        if deletes:
            cache.delete(index, deletes)
    for side in sides:  # AWQ: pinned, replayed once per grid point, dropped
        with side:
            for index in range(len(side)):
                side.pin_memory(index)
            for _ in range(step.side_reads):
                for _ in side.iter():
                    pass
