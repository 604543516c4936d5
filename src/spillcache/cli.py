"""The ``spillcache`` command. Uses the public API and the store format only.

Every subcommand prints aligned tables for people (``--json`` for scripts where a
script would want it) and exits 0; a problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from . import format as store_format
from .config import AUTO, CacheConfig, parse_size
from .errors import SpillCacheError

__all__ = ["main"]


def _format_bytes(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _config(args: argparse.Namespace) -> int:
    config, sources = CacheConfig.explain(file=args.file)
    values = {name: getattr(config, name) for name in CacheConfig.field_names()}
    if args.json:
        print(
            json.dumps({name: {"value": values[name], "source": sources[name]} for name in values})
        )
        return 0
    rows = [["setting", "value", "from"]]
    for name, value in values.items():
        shown = (
            "none"
            if value is None
            else str(value).lower()
            if isinstance(value, bool)
            else str(value)
        )
        if isinstance(value, int) and not isinstance(value, bool) and name.endswith("_bytes"):
            shown = f"{value} ({_format_bytes(value)})"
        rows.append([name, shown, sources[name]])
    print(_table(rows))
    return 0


def _stores_dir(args: argparse.Namespace) -> Path:
    if args.dir is not None:
        return Path(args.dir)
    disk_path = CacheConfig.from_env().disk_path
    return Path(tempfile.gettempdir() if disk_path in (AUTO, None) else disk_path)


def _store_rows(directory: Path) -> list[dict]:
    rows = []
    for path in store_format.find_stores(directory):
        attributes = store_format.read_root_attributes(path)
        rows.append(
            {
                "path": str(path),
                "bytes": store_format.store_bytes(path),
                "pid": attributes.get("pid"),
                "alive": store_format.owner_alive(attributes),
                "complete": bool(attributes.get("complete")),
            }
        )
    return rows


def _alive_text(alive: bool | None) -> str:
    return {True: "alive", False: "dead", None: "unknown"}[alive]


def _du(args: argparse.Namespace) -> int:
    rows = _store_rows(_stores_dir(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    table = [["store", "size", "pid", "process", "state"]]
    for row in rows:
        state = "complete" if row["complete"] else "in use or left by a crash"
        table.append(
            [row["path"], _format_bytes(row["bytes"]), str(row["pid"]),
             _alive_text(row["alive"]), state]
        )  # fmt: skip
    table.append(["total", _format_bytes(sum(r["bytes"] for r in rows)), "", "", ""])
    print(_table(table))
    return 0


def _gc(args: argparse.Namespace) -> int:
    rows = _store_rows(_stores_dir(args))
    # Only stores whose process is known to be dead; kept (complete) stores only with --all.
    doomed = [r for r in rows if r["alive"] is False and (args.all or not r["complete"])]
    verb = "removed" if args.yes else "would remove"
    for row in doomed:
        if args.yes:
            shutil.rmtree(row["path"], ignore_errors=True)
        print(f"{verb} {row['path']} ({_format_bytes(row['bytes'])}, pid {row['pid']} is dead)")
    freed = _format_bytes(sum(r["bytes"] for r in doomed))
    print(f"{verb} {len(doomed)} of {len(rows)} stores, {freed}")
    if doomed and not args.yes:
        print("dry run: pass --yes to delete them")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .summary import summarize

    info = summarize(args.path)
    if args.json:
        print(json.dumps(info))
        return 0
    if info["complete"]:
        state = "complete (kept when its cache closed)"
    elif info["owner_alive"] is False:
        state = "incomplete: left by a run that did not close (its process is gone)"
    else:
        state = "incomplete: its cache is still open (or its process is on another host)"
    owner = f"pid {info['pid']} on {info['hostname']} ({_alive_text(info['owner_alive'])})"
    rows = [
        ["store", info["path"]],
        ["format", f"version {info['format_version']}"],
        ["state", state],
        ["owner", owner],
        ["written", f"{info['written']} by torch {info['torch_version']}"],
        ["batches", "not recorded" if info["batches"] is None else str(info["batches"])],
        ["arrays", f"{info['arrays']}, {_format_bytes(info['bytes'])}"],
    ]
    print(_table(rows))
    if not info["keys"]:
        print("\nno keys recorded: a store records its batches' structures when it is kept")
        return 0
    table = [["key", "shapes", "dtypes", "bytes", "batches"]]
    for key, entry in info["keys"].items():
        shapes = "; ".join(str(tuple(t["shape"])) for t in entry["tensors"]) or "-"
        kinds = ", ".join(dict.fromkeys(t["dtype"] for t in entry["tensors"])) or "-"
        table.append(
            [repr(key), shapes, kinds, _format_bytes(entry["bytes"]), str(entry["batches"])]
        )
    print()
    print(_table(table))
    return 0


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

    config = commands.add_parser(
        "config", help="print the effective configuration and where each value comes from"
    )
    config.add_argument("--file", help="a TOML config file (instead of $SPILLCACHE_CONFIG)")
    config.add_argument("--json", action="store_true")
    config.set_defaults(run=_config)

    inspect = commands.add_parser("inspect", help="summarize a store: state, arrays, keys")
    inspect.add_argument("path", help="a store directory (spillcache-<pid>-<id>)")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=_inspect)

    du = commands.add_parser("du", help="list stores with their size and owner process")
    du.add_argument("dir", nargs="?", help="where stores are (default: the config's disk_path)")
    du.add_argument("--json", action="store_true")
    du.set_defaults(run=_du)

    gc = commands.add_parser("gc", help="remove stores whose process is dead (dry run)")
    gc.add_argument("dir", nargs="?", help="where stores are (default: the config's disk_path)")
    gc.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    gc.add_argument(
        "--all", action="store_true", help="also kept (complete) stores of dead processes"
    )
    gc.set_defaults(run=_gc)
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
