"""The ``spillcache`` command. Uses the public API only."""

from __future__ import annotations

import argparse
import sys

from .config import CacheConfig, parse_size
from .errors import SpillCacheError

__all__ = ["main"]


def _format_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    config = CacheConfig.from_file(args.config) if args.config else CacheConfig.from_env()
    changes = {"keep_store": True} if args.keep_store else {}
    if args.host_bytes is not None:
        changes["host_bytes"] = parse_size("--host-bytes", args.host_bytes)
    config = config.replace(**changes) if changes else config
    if config.host_bytes == "auto":
        # The demo is about spilling: default to a host budget a quarter of its activations.
        config = config.replace(host_bytes=args.samples * args.seq_len * args.hidden)
    result = run_demo(
        samples=args.samples,
        seq_len=args.seq_len,
        hidden=args.hidden,
        layers=args.layers,
        config=config,
    )
    stats = result.stats
    host, disk = stats["host"], stats["disk"]
    print(f"activations cached : {_format_bytes(result.cached_bytes)}")
    print(f"host budget        : {_format_bytes(host['budget'])}")
    print(f"written to disk    : {_format_bytes(disk['bytes_written'])}")
    print(f"read from disk     : {_format_bytes(disk['bytes_read'])}")
    print(f"hits host / disk   : {host['hits']} / {disk['hits']}")
    print(f"stalled on I/O     : {stats['stall_seconds']:.2f} s")
    wall, reference = result.wall_seconds, result.reference_seconds
    print(f"wall time          : {wall:.2f} s (all in RAM: {reference:.2f} s)")
    verdict = "yes" if result.identical else "NO"
    print(f"statistics equal to the all-in-RAM run, bit for bit: {verdict}")
    return 0 if result.identical else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a small calibration that spills to disk")
    demo.add_argument("--samples", type=int, default=32)
    demo.add_argument("--seq-len", type=int, default=256)
    demo.add_argument("--hidden", type=int, default=256)
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument(
        "--host-bytes", help="host tier budget, e.g. 2MiB (default: 1/4 of the activations)"
    )
    demo.add_argument("--config", help="a TOML config file")
    demo.add_argument("--keep-store", action="store_true", help="keep the store after the run")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SpillCacheError, OSError, ValueError, TypeError) as error:
        print(f"spillcache {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
