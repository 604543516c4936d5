"""``spillcache demo``: the demo's options and its summary (a table, or JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from spillcache.config import AUTO, CacheConfig, parse_size
from spillcache.errors import ConfigError

from ..text import aligned, format_bytes

__all__ = ["add_demo_command"]


def add_demo_command(commands: Any) -> None:
    from .demo import DEFAULT_SIZES

    demo = commands.add_parser(
        "demo",
        help="calibrate a small random-weight transformer layer by layer, spilling to disk",
        description="Calibrate a random-weight decoder-only transformer layer by layer (the "
        "GPTQ statistic X^T X of every linear layer) through a cache whose activations spill "
        "to disk, then check every statistic bit for bit against the same run all in RAM. "
        "Each sample caches a float32 hidden state (seq-len x hidden x 4 B) and a bool causal "
        "mask (seq-len x seq-len B). The defaults cache 160 MiB, four times the default host "
        "tier; the whole run takes well under a minute on 2 CPU cores.",
    )
    for flag, size, help_text in _DEMO_SIZE_OPTIONS:
        demo.add_argument(
            flag,
            type=int,
            default=DEFAULT_SIZES[size],
            metavar="N",
            help=f"{help_text} (default: %(default)s)",
        )
    demo.add_argument(
        "--host-bytes",
        metavar="SIZE",
        help="host_bytes, in bytes or with a unit, e.g. 64MiB: all the host RAM the cache "
        "holds values in, the host tier and the parts for values on their way to and from "
        "disk (write_behind_bytes and read_buffer_bytes, an eighth each unless the config "
        "sets them) (default: enough for a host tier of a quarter of the activations, unless "
        "the config sets host_bytes)",
    )
    demo.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML config file for the spilling run (default: $SPILLCACHE_CONFIG and "
        "SPILLCACHE_* variables; the store goes to disk_path, default the temp directory)",
    )
    demo.add_argument(
        "--keep-store",
        action="store_true",
        help="keep the store after the run and print its path (default: delete it)",
    )
    demo.add_argument(
        "--json",
        action="store_true",
        help="print the summary as one JSON object, nothing else on stdout; progress bars "
        "only where stderr is a terminal, else nothing on stderr (default: a table, with "
        "progress bars on a terminal and one line per stage otherwise)",
    )
    demo.set_defaults(run=_demo)


_DEMO_SIZE_OPTIONS = (
    ("--samples", "samples", "calibration samples, one batch each"),
    ("--seq-len", "seq_len", "tokens per sample"),
    ("--hidden", "hidden", "hidden size; heads of 64 where it is a multiple of 64"),
    ("--layers", "layers", "decoder blocks, calibrated one after another"),
)


def _demo(args: argparse.Namespace) -> int:
    from .demo import PROGRESS_BARS, PROGRESS_LINES, activation_bytes, default_host_bytes, run_demo

    for flag, size, _ in _DEMO_SIZE_OPTIONS:
        if getattr(args, size) < 1:
            raise ValueError(f"{flag}: must be at least 1, got {getattr(args, size)}")
    config = _config_file(args.config) if args.config else CacheConfig.from_env()
    changes = {"keep_store": True} if args.keep_store else {}
    if args.host_bytes is not None:
        changes["host_bytes"] = parse_size("--host-bytes", args.host_bytes)
    config = config.replace(**changes) if changes else config
    cached = activation_bytes(args.samples, args.seq_len, args.hidden)
    if config.host_bytes == AUTO:
        # The demo is about spilling: default to a host tier a quarter of its activations.
        config = config.replace(host_bytes=default_host_bytes(cached, config))
    if config.source_of("host_bytes") is None:  # given here: a message names the option
        config = config._noting({"host_bytes": "--host-bytes"})
    # tqdm redraws its bars on stderr: on a terminal, in place; into a log file, a line
    # per redraw. Elsewhere one line per stage, and with --json (a script reading the
    # output) nothing unless a person is watching.
    if sys.stderr.isatty():
        progress = PROGRESS_BARS
    else:
        progress = None if args.json else PROGRESS_LINES
    result = run_demo(
        samples=args.samples,
        seq_len=args.seq_len,
        hidden=args.hidden,
        layers=args.layers,
        config=config,
        progress=progress,
    )
    print(_demo_summary(args, result))
    return 0 if result.identical else 1


def _config_file(path: str) -> CacheConfig:
    """--config's file; a problem with it names the option."""
    try:
        return CacheConfig.from_file(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--config: {error}") from None
    except ConfigError as error:
        raise ConfigError(f"--config: {error}") from None


def _demo_summary(args: argparse.Namespace, result: Any) -> str:
    """The demo's figures, every one from the run (stats() and the two timings): a
    table for people, or with --json one JSON object (keys in docs/cli.md)."""
    from .demo import hidden_state_bytes

    stats = result.stats
    host, disk = stats["host"], stats["disk"]
    # stats() names the store even once it is deleted; it is left by --keep-store or by
    # the config's keep_store.
    kept = disk["path"] if disk["path"] is not None and Path(disk["path"]).is_dir() else None
    if args.json:
        return json.dumps({
            "identical": result.identical,
            "samples": args.samples,
            "seq_len": args.seq_len,
            "hidden": args.hidden,
            "layers": args.layers,
            "cached_bytes": result.cached_bytes,
            "host_bytes": result.host_bytes,
            "host_tier_bytes": host["budget"],
            "disk_written_bytes": disk["bytes_written"],
            "disk_read_bytes": disk["bytes_read"],
            "stall_seconds": stats["stall_seconds"],
            "wall_seconds": result.wall_seconds,
            "reference_seconds": result.reference_seconds,
            "store_path": kept,
            "stats": stats,
        })  # fmt: skip
    hidden = hidden_state_bytes(args.samples, args.seq_len, args.hidden)
    masks = result.cached_bytes - hidden
    share = f"{host['budget'] / result.cached_bytes:.0%} of the activations"
    transit = result.host_bytes - host["budget"]
    wall, reference = result.wall_seconds, result.reference_seconds
    rows = [
        [
            "activations cached",
            f"{format_bytes(result.cached_bytes)} ({args.samples} samples: "
            f"hidden states {format_bytes(hidden)}, causal masks {format_bytes(masks)})",
        ],
        [
            "host memory",
            f"{format_bytes(result.host_bytes)} (host_bytes: the host tier, and "
            f"{format_bytes(transit)} for values on their way to and from disk)"
            if result.host_bytes
            else "0 B (host_bytes 0: no host tier; values on their way to and from disk "
            "are in ordinary memory)",
        ],
        ["host tier", f"{format_bytes(host['budget'])} ({share})"],
        ["written to disk", format_bytes(disk["bytes_written"])],
        ["read from disk", format_bytes(disk["bytes_read"])],
        ["stalled on I/O", f"{stats['stall_seconds']:.2f} s"],
        ["wall time", f"{wall:.2f} s (all in RAM: {reference:.2f} s, {wall / reference:.2f}x)"],
    ]
    if kept is not None:
        rows.append(["store kept at", kept])
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)} : {value}" for name, value in rows] + [""]

    def tier(name: str, figures: dict, misses: str) -> list[str]:
        budget = "no limit" if figures["budget"] is None else format_bytes(figures["budget"])
        if name == "disk" and figures["path"] is None:
            budget = "no disk tier"
        held = format_bytes(figures["bytes"])
        return [name, str(figures["hits"]), misses, held, budget]

    tiers = [
        ["tier", "hits", "misses", "held", "budget"],
        tier("device", stats["device"], str(stats["device"]["misses"])),
        tier("host", host, str(host["misses"])),
        tier("write-behind", stats["write_behind"], "-"),
        tier("disk", disk, str(disk["misses"])),
    ]
    lines.append(aligned(tiers))
    lines.append(
        "(reads: a read the host tier misses is served from the write-behind area, where a\n"
        " value waits for its disk write, or from the disk; held: bytes at the end of the run)"
    )
    verdict = "yes" if result.identical else "NO"
    lines += ["", f"statistics equal to the all-in-RAM run, bit for bit: {verdict}"]
    return "\n".join(lines)
