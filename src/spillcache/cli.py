"""The ``spillcache`` command: stores on disk (du, gc, inspect, show, verify), the
effective config, a run's plan, and the demo.

Every subcommand prints aligned tables for people (``--json`` for scripts where a
script would want it) and exits 0; a problem is one line on stderr and exit status 2.
``verify`` and ``inspect`` exit 1 for a store that is damaged, ``demo`` for a run
that differs from its all-in-RAM twin.
"""

# This module holds the parser and the store subcommands; config, plan, report and demo
# have modules of their own under _internal (config_cli, plan_cli, report_cli,
# demo_cli). Its docstring is the command's --help text.

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from spillcache._internal.cli.config_cli import add_config_command
from spillcache._internal.cli.demo_cli import add_demo_command
from spillcache._internal.cli.plan_cli import add_plan_command
from spillcache._internal.cli.report_cli import add_report_command
from spillcache._internal.dtypes import dtype_name
from spillcache._internal.process.resolved import disk_directories
from spillcache._internal.store import store_dirs
from spillcache._internal.store.checkpoints import ACTIVATIONS, describe_store, store_text
from spillcache._internal.store.summary import state_text
from spillcache._internal.sysinfo import directory_problem
from spillcache._internal.text import aligned, format_bytes, os_error_text
from spillcache.config import CacheConfig
from spillcache.errors import SpillCacheError, StoreCorruptError

__all__ = ["main"]


def _stores_dirs(args: argparse.Namespace) -> list[Path]:
    """DIR (its activation stores, for a calibration's checkpoint_dir), else the
    configured disk_path's directories (one per drive)."""
    if args.dir is not None:
        activations = Path(args.dir) / ACTIVATIONS
        if activations.is_dir() and not store_dirs.find_stores(args.dir):
            return [activations]
        return [Path(args.dir)]
    return [Path(d) for d in disk_directories(CacheConfig.from_env().disk_path)]


def _store_row(path: Path, attributes: dict, run: Path | None = None, rank: int | None = None):
    return {
        "path": str(path),
        "bytes": store_dirs.store_bytes(path),
        "pid": attributes.get("pid"),
        "alive": store_dirs.owner_alive(attributes),
        "complete": bool(attributes.get("complete")),
        "run": None if run is None else str(run),
        "rank": rank,
        "checkpoint": describe_store(path, attributes),
    }


def _survey(directories: list[Path]) -> tuple[list[dict], dict[Path, dict[int, Path]]]:
    """Every store under ``directories``: directly in one, and in the rank directories
    of the run directories in one (or of one itself, if it is one); and the runs."""
    rows, runs = [], {}
    for directory in directories:
        stores = store_dirs.find_stores(directory)  # first: a missing directory is an error
        rows += [_store_row(path, attributes) for path, attributes in stores.items()]
        runs.update(store_dirs.find_runs(directory))
    for run_dir, ranks in runs.items():
        for rank, rank_dir in ranks.items():
            for path, attributes in store_dirs.find_stores(rank_dir).items():
                rows.append(_store_row(path, attributes, run_dir, rank))
    return rows, runs


def _alive_text(alive: bool | None) -> str:
    return {True: "alive", False: "dead", None: "unknown"}[alive]


def _owner_counts(rows: list[dict]) -> str:
    """How many stores' owner processes are in each state ("1 alive, 2 dead")."""
    counts = Counter(_alive_text(row["alive"]) for row in rows)
    return ", ".join(f"{counts[w]} {w}" for w in ("alive", "dead", "unknown") if counts[w])


def _owners(rows: list[dict]) -> str:
    """The processes owning these stores ("pid 4242 alive, pid 977 dead")."""
    owners = dict.fromkeys(f"pid {row['pid']} {_alive_text(row['alive'])}" for row in rows)
    return ", ".join(owners) or "-"


def _du(args: argparse.Namespace) -> int:
    rows, runs = _survey(_stores_dirs(args))
    if args.json:
        print(json.dumps(rows))
        return 0
    total = format_bytes(sum(r["bytes"] for r in rows))
    blocks = []
    plain = [row for row in rows if row["run"] is None]
    if plain or not runs:
        table = [["store", "size", "pid", "process", "state"]]
        for row in plain:
            state = state_text({**row, "owner_alive": row["alive"]}, detailed=False)
            table.append(
                [row["path"], format_bytes(row["bytes"]), str(row["pid"]),
                 _alive_text(row["alive"]), state]
            )  # fmt: skip
        if not runs:
            table.append(["total", total, "", "", ""])
        blocks.append(aligned(table))
    for run_dir, ranks in runs.items():
        in_run = [row for row in rows if row["run"] == str(run_dir)]
        table = [["rank", "stores", "size", "owners"]]
        for rank in ranks:
            mine = [row for row in in_run if row["rank"] == rank]
            size = format_bytes(sum(r["bytes"] for r in mine))
            owners = _owners(mine)
            saved = [store_text(row["checkpoint"]) for row in mine if row["checkpoint"]]
            table.append([str(rank), str(len(mine)), size, "; ".join([owners, *saved])])
        size = format_bytes(sum(r["bytes"] for r in in_run))
        table.append(["total", str(len(in_run)), size, _owner_counts(in_run) or "-"])
        counted = f"{len(ranks)} rank{'s' if len(ranks) != 1 else ''}"
        blocks.append(f"run {run_dir} ({counted})\n{aligned(table)}")
    if runs:
        runs_text = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
        blocks.append(f"total {total} in {len(rows)} stores ({runs_text})")
    print("\n\n".join(blocks))
    return 0


def _gc(args: argparse.Namespace) -> int:
    from spillcache._internal.store.summary import collect_garbage

    for line in collect_garbage(*_survey(_stores_dirs(args)), remove=args.yes, everything=args.all):
        print(line)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from spillcache._internal.store.summary import report_damage, summarize

    ranks = store_dirs.rank_dirs(args.path)
    if ranks:
        return _inspect_run(args, Path(args.path), ranks)
    try:
        info = summarize(args.path)
    except StoreCorruptError as error:  # its root: the arrays are not read without it
        problem = str(error)
        if args.json:
            print(json.dumps({"path": str(args.path), "problems": [problem]}))
        return report_damage("inspect", [problem])
    if args.json:
        print(json.dumps(info))
        return 1 if info["problems"] else 0
    owner = f"pid {info['pid']} on {info['hostname']} ({_alive_text(info['owner_alive'])})"
    rows = [
        ["store", info["path"]],
        ["format", f"version {info['format_version']}"],
        ["state", state_text(info)],
        ["owner", owner],
        ["written", f"{info['written']} by torch {info['torch_version']}"],
        ["batches", "not recorded" if info["batches"] is None else str(info["batches"])],
        ["arrays", f"{info['arrays']}, {format_bytes(info['bytes'])}"],
        ["checksums", _checksum_text(info)],
    ]
    if found := info["checkpoint"]:
        directory = found["checkpoint_dir"]
        rows.append(["checkpoint", f"{store_text(found)[len('checkpoint, '):]}; the same "
                     f"script with checkpoint_dir {directory} resumes it, removing that "
                     "directory starts afresh"])  # fmt: skip
    print(aligned(rows))
    if not info["keys"]:
        print("\nno keys recorded: a kept store records its batches on close and flush()")
        return report_damage("inspect", info["problems"])
    table = [["key", "shapes", "dtypes", "bytes", "batches"]]
    for key, entry in info["keys"].items():
        shapes = "; ".join(str(tuple(t["shape"])) for t in entry["tensors"]) or "-"
        kinds = ", ".join(dict.fromkeys(t["dtype"] for t in entry["tensors"])) or "-"
        table.append(
            [repr(key), shapes, kinds, format_bytes(entry["bytes"]), str(entry["batches"])]
        )
    print()
    print(aligned(table))
    return report_damage("inspect", info["problems"])


def _checksum_text(info: dict) -> str:
    from spillcache._internal.store.summary import undetectable_rot

    if not info["arrays"]:
        return "-"
    warning = undetectable_rot(info["unchecksummed"], info["arrays"])
    return warning or "a CRC32C on every chunk, checked on every read"


def _inspect_run(args: argparse.Namespace, run_dir: Path, ranks: dict[int, Path]) -> int:
    """A run directory: each rank's stores (state, owner, arrays, bytes) and totals."""
    from spillcache._internal.store.summary import summarize

    listing = []
    for rank, rank_dir in ranks.items():
        stores = []
        for path in store_dirs.find_stores(rank_dir):
            try:
                stores.append(summarize(path))
            except SpillCacheError as error:  # a store of another version: say so, go on
                stores.append({"path": str(path), "error": str(error)})
        listing.append({"rank": rank, "dir": str(rank_dir), "stores": stores})
    readable = [info for entry in listing for info in entry["stores"] if "error" not in info]
    count = sum(len(entry["stores"]) for entry in listing)
    arrays, nbytes = sum(i["arrays"] for i in readable), sum(i["bytes"] for i in readable)
    damaged = 1 if any(info.get("problems") for info in readable) else 0
    if args.json:
        summary = {"run": str(run_dir), "ranks": listing, "stores": count}
        print(json.dumps({**summary, "arrays": arrays, "bytes": nbytes}))
        return damaged
    print(aligned([
        ["run", str(run_dir)],
        ["ranks", f"{len(ranks)} ({', '.join(map(str, ranks))})"],
        ["stores", f"{count}, {arrays} arrays, {format_bytes(nbytes)}"],
    ]))  # fmt: skip
    table = [["rank", "store", "state", "owner", "arrays", "bytes"]]
    for entry in listing:
        if not entry["stores"]:
            table.append([str(entry["rank"]), "-", "no store", "", "", ""])
        for info in entry["stores"]:
            name = Path(info["path"]).name
            if "error" in info:
                table.append([str(entry["rank"]), name, f"unreadable: {info['error']}", "", "", ""])
                continue
            owner = f"pid {info['pid']} ({_alive_text(info['owner_alive'])})"
            state = state_text(info, detailed=False)
            table.append(
                [str(entry["rank"]), name, state, owner, str(info["arrays"]),
                 format_bytes(info["bytes"])]
            )  # fmt: skip
    table.append(["total", f"{count} stores", "", "", str(arrays), format_bytes(nbytes)])
    print()
    print(aligned(table))
    return damaged


def _describe(value: Any, indent: str, tensors: list) -> list[str]:
    """Lines describing a value's structure; its tensors are numbered and collected."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return [f"tensor #{len(tensors) - 1} {tuple(value.shape)} {dtype_name(value.dtype)}"]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)]
        head = type(value).__name__
    elif isinstance(value, dict):
        items, head = list(value.items()), "dict"
    elif isinstance(value, (list, tuple)):
        items, head = list(enumerate(value)), type(value).__name__
    else:
        return [repr(value)]
    lines = [head]
    for name, child in items:
        child_lines = _describe(child, indent + "  ", tensors)
        lines.append(f"{indent}  {name!r}: {child_lines[0]}")
        lines.extend(child_lines[1:])
    return lines


def _check_export(path: Path) -> None:
    """--export's file must be one that can be written: said before the value is read,
    in one line naming the option and the fix, not as an errno (or torch's own error)."""
    if path.suffix not in (".pt", ".npy"):
        raise ValueError(f"--export: {path.name} must end in .pt or .npy")
    directory = path.absolute().parent
    if path.is_dir():
        raise ValueError(f"--export: {path} is a directory; name a file such as {path / 'x.pt'}")
    problem = directory_problem(directory)
    if problem == "missing":
        raise ValueError(
            f"--export: the directory {directory} does not exist; create it first, or name "
            "a file in an existing directory"
        )
    if problem == "read-only":
        raise ValueError(
            f"--export: {directory} is not writable by this process; name a file in a "
            "writable directory"
        )


def _export(tensor: torch.Tensor, path: Path) -> str:
    try:
        return _export_to(tensor, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a bad path as RuntimeError
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ValueError(
            f"--export: cannot write {path} ({reason}); name a file in a writable directory "
            "with room"
        ) from None


def _export_to(tensor: torch.Tensor, path: Path) -> str:
    if path.suffix == ".pt":
        torch.save(tensor.clone(), path)
        return f"wrote {path} (torch.save, {dtype_name(tensor.dtype)})"
    import numpy

    try:
        array = tensor.numpy()
        note = ""
    except TypeError:  # numpy has no such type: float ones widen exactly to float32
        if not tensor.is_floating_point():
            raise ValueError(
                f"--export: numpy has no {dtype_name(tensor.dtype)}; export to a .pt file"
            ) from None
        array, note = tensor.float().numpy(), f", widened exactly from {dtype_name(tensor.dtype)}"
    numpy.save(path, array)
    return f"wrote {path} (numpy {array.dtype}{note})"


def _check_leaf(leaf: int, count: int) -> None:
    """--leaf must number one of the value's ``count`` tensors (as ``show`` numbers them)."""
    if not 0 <= leaf < count:
        fix = {0: "it holds none: leave out --leaf", 1: "it holds one: give 0"}.get(
            count, f"its tensors are numbered 0 to {count - 1}: give one of those"
        )
        raise ValueError(f"--leaf: {leaf} is not a tensor of this value; {fix}")


def _show(args: argparse.Namespace) -> int:
    from spillcache._internal.store.summary import (
        load_value,
        report_damage,
        tensor_stats,
        undetectable_rot,
    )

    read: list = []
    if args.export:  # found out before anything is read
        _check_export(Path(args.export))
    try:
        value = load_value(args.path, args.batch, args.key, read)
    except StoreCorruptError as error:
        return report_damage("show", [str(error)])
    rot = undetectable_rot(
        sum(not info.checksum for info in read), len(read), f"batch {args.batch}, key {args.key!r}"
    )
    tensors: list[torch.Tensor] = []
    lines = _describe(value, "", tensors)
    if args.leaf is not None:  # refused with or without --export, before anything is printed
        _check_leaf(args.leaf, len(tensors))
    stats = [tensor_stats(tensor) for tensor in tensors]
    if rot:  # the statistics below may be of damaged bytes, and nothing could tell
        print(f"WARNING {rot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"structure": lines, "tensors": stats, "checksummed": not rot}))
    else:
        print("\n".join(lines))
        for index, figures in enumerate(stats):
            shown = ", ".join(
                f"{name} {value:.6g}" if isinstance(value, float) else f"{name} {value}"
                for name, value in figures.items()
            )
            print(f"tensor #{index}: {shown}")
    if args.export:
        if len(tensors) != 1 and args.leaf is None:
            raise ValueError(
                f"--export: the value holds {len(tensors)} tensors; pick one with --leaf N"
            )
        leaf = args.leaf or 0  # in range: checked above, or the value's only tensor
        print(
            _export(tensors[leaf], Path(args.export)), file=sys.stderr if args.json else sys.stdout
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from spillcache._internal.store.summary import undetectable_rot, verify, verify_lines

    try:
        report = verify(args.path)
    except StoreCorruptError as error:  # its root: the arrays are not read without it
        problem = str(error)
        report = {"path": str(args.path), "arrays": 0, "checksummed": 0, "unchecksummed": 0,
                  "bad": [], "problems": [problem], "orphans": None}  # fmt: skip
        if not args.json:
            print(f"BAD {problem}")
            print("its arrays were not checked: the root says which format they are in; 1 bad")
            return 1
    if args.json:
        print(json.dumps(report))
    else:
        for problem in report["problems"]:  # not one array's: a structure, the root
            print(f"BAD {problem}")
        for bad in report["bad"]:
            where = "; ".join(bad["used_by"]) or "no recorded key"
            print(f"BAD {bad['array']} ({where}): {bad['error']}")
        for line in verify_lines(report["orphans"]):  # leftovers: not damage
            print(line)
        readable = report["checksummed"] + report["unchecksummed"]
        if warning := undetectable_rot(report["unchecksummed"], readable):
            print(f"WARNING {warning}; their sizes were checked")
        checked = f"{report['arrays']} arrays checked, {report['checksummed']} with a CRC32C"
        print(f"{checked}; {len(report['bad']) + len(report['problems'])} bad")
    return 1 if report["bad"] or report["problems"] else 0


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    add_demo_command(commands)
    add_config_command(commands)
    inspect = commands.add_parser("inspect", help="summarize a store: state, arrays, keys")
    inspect.add_argument(
        "path", help="a store directory (spillcache-<pid>-<id>), or a run directory (torchrun)"
    )
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=_inspect)

    show = commands.add_parser("show", help="one value of a kept store: structure, statistics")
    show.add_argument("path", help="a kept store directory")
    show.add_argument("batch", type=int)
    show.add_argument("key")
    show.add_argument("--export", help="write the tensor to a .pt or .npy file")
    show.add_argument("--leaf", type=int, help="which tensor of the value to export")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_show)

    verify = commands.add_parser(
        "verify", help="read every chunk and check it (exit 1 if any is damaged)"
    )
    verify.add_argument("path", help="a store directory")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(run=_verify)

    du = commands.add_parser("du", help="list stores with their size and owner process")
    du.add_argument("dir", nargs="?", help="where stores are (default: the config's disk_path)")
    du.add_argument("--json", action="store_true")
    du.set_defaults(run=_du)

    add_plan_command(commands)
    add_report_command(commands)
    gc = commands.add_parser("gc", help="remove stores whose process is dead (dry run)")
    gc.add_argument("dir", nargs="?", help="where stores are (default: the config's disk_path)")
    gc.add_argument("--yes", action="store_true", help="delete them (default: only list them)")
    gc.add_argument(
        "--all", action="store_true", help="also kept (complete) stores of dead processes"
    )
    gc.set_defaults(run=_gc)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SpillCacheError, OSError, ValueError, TypeError, KeyError, IndexError) as error:
        # A KeyError's str() is the repr of its message: print the message itself.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if isinstance(error, OSError):
            message = os_error_text(error)
        print(f"spillcache {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
