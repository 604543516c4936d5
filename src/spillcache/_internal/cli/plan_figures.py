"""``spillcache plan``'s figures, worked out from its options: the model's shape and
weights, the node's RAM and budgets, what the run caches and what it makes the disks do
(``plan.replay``: the run's cache calls replayed through a real cache at a reduced
scale), each disk's room and measured speed (``probe_disk``), and the config to run
with. Bad input is a ``PlanInputError``: one line naming the option.

The probe measures how fast a directory's disk writes and reads chunk files, the way
the cache does (``chunkio``: O_DIRECT where the filesystem takes it, from the cache's
own staging buffers, on ``io_threads`` threads at once). It writes files of
``PROBE_FILE_BYTES`` into a hidden directory under the path until half its time is
spent (or ``PROBE_MAX_BYTES`` are written), reads them back for the rest, and removes
them whatever happens. A few seconds of one device are a rough figure: a busy or
throttled disk, or one with a large write cache, runs at other speeds over hours.
"""

from __future__ import annotations

import argparse
import json
import math
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spillcache.config import AUTO, CacheConfig, parse_size
from spillcache.errors import ConfigError

from .. import dtypes, sysinfo
from ..io import buffers, chunk_reads, chunkio
from ..process.resolved import ResolvedBudgets, auto_host_bytes, disk_directories, setting_origin
from ..text import format_bytes, rounded_up_size
from .plan import (
    ModelShape,
    awq_figures,
    host_bytes_for_tier,
    model_weights,
    rank_budgets,
    replay,
    sequential_pipeline,
)

__all__ = ["DiskSpeed", "PlanInputError", "check_writable", "make_plan", "probe_disk"]

PROBE_SECONDS = 10.0  # at most, over every disk path
ARRAY_OVERHEAD = 8192  # a chunk's last partial block and its zarr.json, at most
# Below this a batch is small next to a drive's per-request latency: prefetch further.
SMALL_BATCH = 4 << 20
PROBE_FILE_BYTES = 8 << 20  # the size of a large cached tensor's chunk
PROBE_MAX_BYTES = 2 << 30  # enough for a steady figure on an NVMe drive
# The deepest published decoders have about 130 layers (Llama 3.1 405B: 126): some
# eight times that is no model but a typo. The plan builds two passes per layer and may
# replay every layer: 1000 layers of a few samples take seconds, 10**12 would never end.
MAX_LAYERS = 1000


class PlanInputError(ValueError):
    """Bad input: one line naming the option; exit status 2."""


def check_writable(where: str, directory: str | Path, what: str) -> None:
    """``directory`` must exist and take ``what`` (the file --write names, the probe's
    files): said before the plan is made, in one line naming ``where`` it was given."""
    problem = sysinfo.directory_problem(directory)
    if problem == "missing":
        raise PlanInputError(f"{where}: {directory} is not an existing directory; create it first")
    if problem == "read-only":
        raise PlanInputError(
            f"{where}: {directory} is not writable by this process, and {what} is written "
            "there; name a writable directory"
        )


# ------------------------------------------------------------------ inputs


def _positive(name: str, value: int | None) -> int:
    if value is None or value < 1:
        raise PlanInputError(f"{name} must be a whole number >= 1, got {value}")
    return value


def _size(option: str, text: str) -> int:
    try:
        return parse_size(option, text)
    except (ValueError, TypeError) as error:
        raise PlanInputError(str(error)) from None


def _dtype(option: str, name: str) -> torch.dtype:
    try:
        return dtypes.dtype_from_name(name.removeprefix("torch."))
    except (ValueError, KeyError):
        raise PlanInputError(
            f"{option}: {name!r} is not a torch dtype (e.g. bfloat16, float32)"
        ) from None


def _model_config(path: str) -> tuple[dict, Path]:
    """The config.json --model names (a text_config inside it where there is one), and
    the directory it is in (the checkpoint's, where its weights are)."""
    file = Path(path)
    file = file / "config.json" if file.is_dir() else file
    try:
        config = json.loads(file.read_text())
    except OSError as error:
        raise PlanInputError(f"--model: cannot read {file}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise PlanInputError(
            f"--model: {file} is not JSON ({error.msg}, line {error.lineno})"
        ) from None
    config = config.get("text_config", config) if isinstance(config, dict) else config
    if not isinstance(config, dict):
        raise PlanInputError(f"--model: {file} is not a model config (a JSON object)")
    missing = [
        k for k in ("hidden_size", "num_hidden_layers") if not isinstance(config.get(k), int)
    ]
    if missing:
        raise PlanInputError(
            f"--model: {file} has no {' or '.join(missing)}; give --hidden and --layers instead"
        )
    return config, file.parent


@dataclass(frozen=True)
class _Weights:
    """The model's weights: bytes, how they were counted, and the bytes they take in
    host RAM (all of them with ``--weights-device cpu``, else none)."""

    nbytes: int
    how: str
    host_bytes: int


def _shape(args: argparse.Namespace) -> tuple[ModelShape, int, _Weights | None]:
    seq_len = _positive("--seq-len", args.seq_len)
    model_config = directory = None
    if args.model:
        config, directory = _model_config(args.model)
        model_config = config
        hidden, layers = config["hidden_size"], config["num_hidden_layers"]
        heads = config.get("num_attention_heads")
        intermediate = config.get("intermediate_size")
        o_proj_mapped = config.get("num_key_value_heads", heads) == heads
        head_dim = config.get("head_dim") or (
            hidden // heads if isinstance(heads, int) and heads else None
        )
        # No dtype in the config: transformers loads the weights in float32.
        dtype_name = args.dtype or config.get("torch_dtype") or config.get("dtype") or "float32"
    else:
        if args.hidden is None or args.layers is None:
            raise PlanInputError("give --model PATH, or --hidden N and --layers N")
        hidden, layers, head_dim = args.hidden, args.layers, args.head_dim
        intermediate, o_proj_mapped = None, False
        dtype_name = args.dtype or "bfloat16"
    hidden = _positive("--hidden", hidden)
    where = f"--model: {args.model}'s num_hidden_layers" if args.model else "--layers"
    layers = _positive(where, layers)
    if layers > MAX_LAYERS:
        raise PlanInputError(
            f"{where}: {layers} layers is more than any decoder model has (at most "
            f"{MAX_LAYERS} here); "
            + ("is it a model's config.json?" if args.model else "give the model's own count")
        )
    head_dim = args.head_dim if args.head_dim is not None else head_dim
    if head_dim is not None:
        _positive("--head-dim", head_dim)
    dtype = _dtype("--dtype", str(dtype_name))
    mask_name = args.mask or str(dtype).removeprefix("torch.")
    mask = None if mask_name == "none" else _dtype("--mask", mask_name)
    if args.intermediate is not None:
        intermediate = _positive("--intermediate", args.intermediate)
    intermediate = intermediate if isinstance(intermediate, int) else None
    shape = ModelShape(hidden, seq_len, dtype, mask, head_dim, intermediate, o_proj_mapped)
    weights = None
    if model_config is not None:
        nbytes, how = model_weights(model_config, dtype, directory)
        weights = _Weights(nbytes, how, nbytes if args.weights_device == "cpu" else 0)
    return shape, layers, weights


def _node_config(
    args: argparse.Namespace, ram: int, sources: dict[str, str], weights: _Weights | None
) -> CacheConfig:
    """The node's config; where its host_bytes and disk_path came from go in ``sources``."""
    base = CacheConfig.from_env()
    host = base.host_bytes if args.host_bytes is None else _size("--host-bytes", args.host_bytes)
    sources["host_bytes"] = (
        "--host-bytes" if args.host_bytes else setting_origin(base, "host_bytes")
    )
    if host == AUTO:  # a cache is made once the model is loaded: half of what that leaves
        host = auto_host_bytes(max(ram - (weights.host_bytes if weights else 0), 0))
        of = "the RAM the weights on the CPU leave" if weights and weights.host_bytes else "the RAM"
        sources["host_bytes"] += f': "auto", half of {of}'
    paths = args.disk_path or disk_directories(base.disk_path)
    sources["disk_path"] = "--disk-path" if args.disk_path else setting_origin(base, "disk_path")
    for path in paths:  # the probe writes there (and the run's stores)
        check_writable(sources["disk_path"], path, "the probe's files and the run's stores")
    disk_path = paths[0] if len(paths) == 1 else tuple(paths)
    return base.replace(host_bytes=host, disk_path=disk_path, budget_scope="node")


# ------------------------------------------------------------------ the plan


def make_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``spillcache plan`` says, as the JSON it prints."""
    shape, layers, weights = _shape(args)
    samples = _positive("--samples", args.samples)
    ranks = _positive("--ranks", args.ranks)
    if args.ram is None:
        ram = sysinfo.available_ram()
        sources = {
            "ram_bytes": "this machine's available RAM now, not the target node's: give --ram"
        }
    else:
        ram, sources = _size("--ram", args.ram), {"ram_bytes": "--ram"}
    if weights:
        sources["weights_bytes"] = weights.how
    node = _node_config(args, ram, sources, weights)
    per_rank = math.ceil(samples / ranks)
    try:
        budgets = rank_budgets(node, ranks)  # one rank's, "auto" parts resolved
    except ConfigError as error:
        where = "--host-bytes" if args.host_bytes else "host_bytes"
        raise PlanInputError(f"{where}: {error}: raise it, or lower them") from None
    rank_config = node.replace(
        host_bytes=budgets.host_bytes,
        write_behind_bytes=budgets.write_behind_bytes,
        read_buffer_bytes=budgets.read_buffer_bytes,
        disk_bytes=None,
        budget_scope="rank",
    )
    awq_on_host = args.recipe == "awq" and args.awq_offload == "cpu"
    workload = sequential_pipeline(shape, per_rank, awq=awq_on_host)
    cached = workload(layers).cached()
    per_sample = {}
    for item in cached:
        if item.what != "token ids":
            per_sample[item.what] = per_sample.get(item.what, 0) + item.nbytes
    per_sample["hidden states"] = shape.hidden_bytes()  # one layer's, not every layer's
    sample_bytes = sum(per_sample.values())
    traffic = replay(workload, layers, rank_config)
    paths = disk_directories(node.disk_path)
    tiered_keys = sum(1 for c in cached if c.nbytes >= node.inline_bytes and c.what != "token ids")
    need = ranks * (traffic.disk_peak + (tiered_keys + 1) * per_rank * ARRAY_OVERHEAD)
    need = need if traffic.disk_peak else 0
    probe = None if args.no_probe else (PROBE_SECONDS / len(paths), node.io_threads)
    disks = [_disk(path, need // len(paths), probe, sources["disk_path"]) for path in paths]
    written, read = ranks * traffic.written, ranks * traffic.read
    io_seconds = _io_seconds(disks, written, read)
    fits_ram = node.host_bytes + (weights.host_bytes if weights else 0) <= ram
    fits = all(d["free_bytes"] >= d["needed_bytes"] for d in disks) and fits_ram
    plan = {
        "model": {"hidden": shape.hidden, "layers": layers, "dtype": _name(shape.dtype),
                  "mask": _name(shape.mask), "head_dim": shape.head_dim},
        "samples": samples, "seq_len": shape.seq_len, "ranks": ranks, "recipe": args.recipe,
        "per_sample_bytes": per_sample,
        "cached_bytes": sample_bytes * samples,
        "host_bytes": node.host_bytes, "host_tier_bytes": ranks * budgets.host_tier_bytes,
        "ram_bytes": ram, "fits_ram": fits_ram,
        "weights_bytes": weights and weights.nbytes,
        "weights_host_bytes": weights and weights.host_bytes, "sources": sources,
        "fits_host": sample_bytes * per_rank <= budgets.host_tier_bytes,
        "disk_written_bytes": written, "disk_read_bytes": read, "disk_needed_bytes": need,
        "disks": disks, "io_seconds": io_seconds, "fits": fits,
        "replayed_layers": traffic.replayed_layers or layers,
        "config": {}, "why": {},
    }  # fmt: skip
    _recommend(plan, node, budgets, sample_bytes * per_rank)
    if args.recipe == "awq":
        plan["awq"] = awq_figures(shape, samples, args.awq_offload)
    return plan


def _name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _disk(path: str, needed: int, probe: tuple[float, int] | None, where: str) -> dict[str, Any]:
    """A disk path's free space, its share of what the run needs, and, with ``probe``
    (seconds, threads), its measured speed; ``where``: where the path was given."""
    disk = {"path": path, "free_bytes": shutil.disk_usage(path).free, "needed_bytes": needed}
    if probe is not None:
        try:
            speed = probe_disk(path, seconds=probe[0], threads=probe[1])
        except OSError as error:  # full, gone, an I/O error: one line, not an errno
            raise PlanInputError(
                f"{where}: cannot write the probe's files in {path} ({error.strerror or error}); "
                "name a writable directory with room on each drive, or skip the probe with "
                "--no-probe"
            ) from None
        disk["write_bytes_per_second"] = round(speed.write_bytes_per_second)
        disk["read_bytes_per_second"] = round(speed.read_bytes_per_second)
        disk["direct_io"] = speed.direct_io
    return disk


def _io_seconds(disks: list[dict], written: int, read: int) -> float | None:
    """At the probed speeds, every drive working at once (arrays are spread evenly)."""
    if not disks or "write_bytes_per_second" not in disks[0]:
        return None
    write = sum(d["write_bytes_per_second"] for d in disks)
    read_speed = sum(d["read_bytes_per_second"] for d in disks)
    return written / max(write, 1) + read / max(read_speed, 1)


def _recommend(plan: dict, node: CacheConfig, budgets: ResolvedBudgets, rank_cached: int) -> None:
    """The config to run with; ``budgets``: one rank's, ``rank_cached``: what one rank
    caches per pass."""
    config, why = plan["config"], plan["why"]
    ranks, f = plan["ranks"], format_bytes
    parts = budgets.write_behind_bytes + budgets.read_buffer_bytes
    if plan["fits_host"]:
        # host_bytes also holds the values on their way to and from disk: a host tier
        # of every cached value (plus an eighth) and those parts, per rank.
        tier = rank_cached + rank_cached // 8
        shares = budgets.shares
        rank_parts = [
            v if v == AUTO else v // shares
            for v in (node.write_behind_bytes, node.read_buffer_bytes)
        ]
        # Rounded up (by under 0.1 %) to a size a person would write in the file.
        config["host_bytes"] = rounded_up_size(shares * host_bytes_for_tier(tier, *rank_parts))
        why["host_bytes"] = (
            f"a host tier of {f(ranks * tier)} holds every cached value (plus an eighth), and "
            f"{f(config['host_bytes'] - ranks * tier)} is for values on their way to and from "
            "disk (write_behind_bytes, read_buffer_bytes): no disk traffic"
        )
    else:
        config["host_bytes"] = node.host_bytes
        why["host_bytes"] = (
            f"from {plan['sources']['host_bytes']} ({f(node.host_bytes)} for the node, "
            f"{f(budgets.host_bytes)} per rank: a host tier of {f(budgets.host_tier_bytes)} "
            f"and {f(parts)} for values on their way to and from disk); the rest spills"
        )
    for name in ("write_behind_bytes", "read_buffer_bytes"):
        if getattr(node, name) != AUTO:  # the split the plan used, kept in the file
            config[name] = getattr(node, name)
            why[name] = "as given: a part of host_bytes, which the host tier does not use"
    paths = [d["path"] for d in plan["disks"]]
    config["disk_path"] = paths[0] if len(paths) == 1 else paths
    why["disk_path"] = (
        "one directory per drive: arrays spread over them"
        if len(paths) > 1
        else ("the only drive given; one directory per drive spreads the load over several")
    )
    if plan["disk_needed_bytes"]:
        needed = plan["disk_needed_bytes"]
        config["disk_bytes"] = rounded_up_size(needed + needed // 4)
        why["disk_bytes"] = (
            "the run's peak on disk plus a quarter: a runaway run stops with a clear error"
        )
    batch = sum(plan["per_sample_bytes"].values())
    config["prefetch_depth"] = 4 if batch < SMALL_BATCH else 2
    why["prefetch_depth"] = f"a sample is {format_bytes(batch)}: " + (
        "small next to a drive's latency, read further ahead"
        if batch < SMALL_BATCH
        else "2 batches ahead keep the drive busy"
    )
    config["eviction"] = "scan"
    why["eviction"] = (
        "keeps a fixed set of samples in RAM and streams the rest: the fewest reads per pass"
    )
    config["budget_scope"] = "node"
    why["budget_scope"] = f"sizes are the node's, shared by its {ranks} rank(s)"


# ------------------------------------------------------------------ the probe


@dataclass(frozen=True)
class DiskSpeed:
    path: str
    write_bytes_per_second: float
    read_bytes_per_second: float
    direct_io: bool
    seconds: float


def probe_disk(directory: str | Path, *, seconds: float, threads: int) -> DiskSpeed:
    """Write, then read back, chunk files in ``directory`` for about ``seconds`` in all."""
    directory = Path(directory)
    direct = chunkio.direct_io_supported(directory)
    scratch = directory / f".spillcache-probe-{secrets.token_hex(4)}"
    scratch.mkdir()
    start = time.perf_counter()
    # The cache's own staging buffers: page-aligned, contiguous, touched once in order.
    staging = buffers.StagingBuffers(threads, PROBE_FILE_BYTES)
    try:
        deadline = start + seconds / 2

        def write(slot: int) -> int:
            written = 0
            with staging.acquire() as buffer:
                while time.perf_counter() < deadline and written * threads < PROBE_MAX_BYTES:
                    name = scratch / f"{slot}-{written // PROBE_FILE_BYTES}"
                    chunkio.write_file(name, buffer, direct=direct, staging=None)
                    written += PROBE_FILE_BYTES
            return written

        write_bps, names = _timed(threads, write), sorted(scratch.iterdir())
        deadline = time.perf_counter() + seconds / 2

        def read(slot: int) -> int:
            done = 0
            with staging.acquire() as buffer:
                for name in names[slot::threads]:
                    if time.perf_counter() >= deadline:
                        break
                    chunk_reads.read_file(name, buffer, direct=direct)
                    done += PROBE_FILE_BYTES
            return done

        read_bps = _timed(threads, read)
    finally:
        staging.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return DiskSpeed(str(directory), write_bps, read_bps, direct, time.perf_counter() - start)


def _timed(threads: int, job) -> float:
    """Bytes per second of ``job(slot)`` run on ``threads`` threads at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        moved = sum(pool.map(job, range(threads)))
    return moved / max(time.perf_counter() - start, 1e-9)
