"""The ``spillcache`` command. Uses the public API and the store format only.

Every subcommand prints aligned tables for people (``--json`` for scripts where a
script would want it) and exits 0; a problem is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from . import format as store_format
from .config import AUTO, CacheConfig, parse_size
from .dtypes import dtype_name
from .errors import SpillCacheError, StoreCorruptError
from .plan_cli import add_plan_command

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
    resolved = _resolved_here(config)
    if args.json:
        figures = {name: {"value": values[name], "source": sources[name]} for name in values}
        for name, (extra, _) in resolved.items():
            figures[name].update(extra)
        print(json.dumps(figures))
        return 0
    rows = [["setting", "value", "from"]]
    for name, value in values.items():
        text = _setting_text(name, value)
        if name in resolved:  # "512 (512 B)" -> "512 (512 B for the node: ...)"
            note = resolved[name][1]
            text = f"{text[:-1]} {note})" if text.endswith(")") else f"{text} ({note})"
        rows.append([name, text, sources[name]])
    print(_table(rows))
    return 0


def _resolved_here(config: CacheConfig) -> dict[str, tuple[dict, str]]:
    """What "auto" and node-wide settings come to in this process: setting -> (keys for
    --json, a note for people), for the settings where the value used differs."""
    from . import ranks

    info = ranks.rank_info()
    budgets = ranks.process_budgets(config)
    here: dict[str, tuple[dict, str]] = {}
    for name in ranks.NODE_SIZES:
        value, used = getattr(config, name), getattr(budgets, name)
        if value == AUTO:
            whose = "this process" if info is None else "this rank"
            share = "" if info is None else f" over {info.local_world_size} local ranks"
            note = f"= {_format_bytes(used)} for {whose}: half the available RAM{share}"
            here[name] = ({"resolved": used}, note)
        elif used != value:
            note = f"for the node: {_format_bytes(used)} for each of its {budgets.shares} ranks"
            here[name] = ({"resolved": used}, note)
    if config.disk_path is not None:
        disk_dirs = _disk_dirs(config.disk_path)
        parents = [str(ranks.store_parent(disk_dir)) for disk_dir in disk_dirs]
        notes = [f"= {disk_dirs[0]}"] if config.disk_path == AUTO else []
        notes += [] if info is None else [f"this rank's stores in {', '.join(parents)}"]
        if notes:
            resolved = parents[0] if len(parents) == 1 else parents
            here["disk_path"] = ({"resolved": resolved}, "; ".join(notes))
    if config.device_bytes == AUTO:
        here["device_bytes"] = _device_bytes_here()
    if config.direct_io == AUTO:
        here["direct_io"] = _direct_io_here(config.disk_path)
    if info is not None:
        here["budget_scope"] = (
            {"rank": dataclasses.asdict(info)},
            f"rank {info.rank} of {info.world_size}, {info.local_world_size} on this node, "
            f"run {info.run_id}",
        )
    return here


def _device_bytes_here() -> tuple[dict, str]:
    """device_bytes "auto": what CacheCore makes of it for each kind of offload_device,
    and whether this machine has an accelerator to keep values on at all."""
    accelerator = None
    api = getattr(torch, "accelerator", None)  # torch 2.6+: CUDA, ROCm, XPU, MPS, ...
    if api is not None and api.is_available():
        accelerator = {"type": api.current_accelerator().type, "count": api.device_count()}
    elif api is None and torch.cuda.is_available():
        accelerator = {"type": "cuda", "count": torch.cuda.device_count()}
    if accelerator is None:
        where = "no accelerator here"
    else:
        count = accelerator["count"]
        where = f"accelerator here: {count} {accelerator['type']} device{'s' * (count != 1)}"
    note = f"= 0 offloading to the CPU, else no limit: values stay put; {where}"
    # null: no limit. offload_device "cpu" is IntermediatesCache's default.
    resolved = {"offload_device_cpu": 0, "offload_device_none_or_accelerator": None}
    return {"resolved": resolved, "accelerator": accelerator}, note


def _direct_io_here(disk_path: str | tuple[str, ...] | None) -> tuple[dict, str]:
    """direct_io "auto": whether each disk_path directory takes O_DIRECT, asked of the
    store format's own decision (one probe file, written and removed)."""
    from . import ranks

    if disk_path is None:
        return {"resolved": None}, "unused: no disk tier"
    answers, notes, errors = [], [], {}
    for disk_dir in _disk_dirs(disk_path):
        # A store directory is made on first use: probe the filesystem it will be made on.
        probed = ranks.store_parent(disk_dir).absolute()
        while not probed.exists() and probed != probed.parent:
            probed = probed.parent
        try:
            direct = store_format._resolve_direct_io(probed, AUTO)
        except OSError as error:  # unwritable, say: the cache itself would fail there too
            answers.append(None)
            errors[disk_dir] = str(error)
            notes.append(f"cannot tell for {disk_dir}: {error.strerror or error}")
            continue
        answers.append(direct)
        notes.append(
            f"= true: {probed} takes O_DIRECT"
            if direct
            else f"= false: {probed} refuses O_DIRECT (buffered I/O there)"
        )
    figures: dict[str, Any] = {"resolved": answers[0] if len(answers) == 1 else answers}
    if errors:
        figures["errors"] = errors
    return figures, "; ".join(notes)


def _setting_text(name: str, value: Any) -> str:
    """A setting as a config file would spell it; sizes with a readable unit too."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) and name.endswith("_bytes"):
        return f"{value} ({_format_bytes(value)})"
    if isinstance(value, tuple):  # disk_path: one directory per drive
        return json.dumps(list(value))
    return str(value)


def _disk_dirs(disk_path: str | tuple[str, ...] | None) -> list[str]:
    """The directories a disk_path setting names ("auto" and None: the temp directory)."""
    if disk_path in (AUTO, None):
        return [tempfile.gettempdir()]
    return [disk_path] if isinstance(disk_path, str) else list(disk_path)


def _stores_dirs(args: argparse.Namespace) -> list[Path]:
    """DIR, else the configured disk_path's directories (one per drive)."""
    if args.dir is not None:
        return [Path(args.dir)]
    return [Path(d) for d in _disk_dirs(CacheConfig.from_env().disk_path)]


def _store_row(path: Path, attributes: dict, run: Path | None = None, rank: int | None = None):
    return {
        "path": str(path),
        "bytes": store_format.store_bytes(path),
        "pid": attributes.get("pid"),
        "alive": store_format.owner_alive(attributes),
        "complete": bool(attributes.get("complete")),
        "run": None if run is None else str(run),
        "rank": rank,
    }


def _survey(directories: list[Path]) -> tuple[list[dict], dict[Path, dict[int, Path]]]:
    """Every store under ``directories``: directly in one, and in the rank directories
    of the run directories in one (or of one itself, if it is one); and the runs."""
    rows, runs = [], {}
    for directory in directories:
        stores = store_format.find_stores(directory)  # first: a missing directory is an error
        rows += [_store_row(path, attributes) for path, attributes in stores.items()]
        runs.update(store_format.find_runs(directory))
    for run_dir, ranks in runs.items():
        for rank, rank_dir in ranks.items():
            for path, attributes in store_format.find_stores(rank_dir).items():
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
    total = _format_bytes(sum(r["bytes"] for r in rows))
    blocks = []
    plain = [row for row in rows if row["run"] is None]
    if plain or not runs:
        table = [["store", "size", "pid", "process", "state"]]
        for row in plain:
            state = "complete" if row["complete"] else "in use or left by a crash"
            table.append(
                [row["path"], _format_bytes(row["bytes"]), str(row["pid"]),
                 _alive_text(row["alive"]), state]
            )  # fmt: skip
        if not runs:
            table.append(["total", total, "", "", ""])
        blocks.append(_table(table))
    for run_dir, ranks in runs.items():
        in_run = [row for row in rows if row["run"] == str(run_dir)]
        table = [["rank", "stores", "size", "owners"]]
        for rank in ranks:
            mine = [row for row in in_run if row["rank"] == rank]
            size = _format_bytes(sum(r["bytes"] for r in mine))
            table.append([str(rank), str(len(mine)), size, _owners(mine)])
        size = _format_bytes(sum(r["bytes"] for r in in_run))
        table.append(["total", str(len(in_run)), size, _owner_counts(in_run) or "-"])
        counted = f"{len(ranks)} rank{'s' if len(ranks) != 1 else ''}"
        blocks.append(f"run {run_dir} ({counted})\n{_table(table)}")
    if runs:
        runs_text = f"{len(runs)} run{'s' if len(runs) != 1 else ''}"
        blocks.append(f"total {total} in {len(rows)} stores ({runs_text})")
    print("\n\n".join(blocks))
    return 0


def _gc(args: argparse.Namespace) -> int:
    from .leftovers import collect_garbage

    for line in collect_garbage(*_survey(_stores_dirs(args)), remove=args.yes, everything=args.all):
        print(line)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .summary import report_damage, state_text, summarize

    ranks = store_format.rank_dirs(args.path)
    if ranks:
        return _inspect_run(args, Path(args.path), ranks)
    info = summarize(args.path)
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
        ["arrays", f"{info['arrays']}, {_format_bytes(info['bytes'])}"],
    ]
    print(_table(rows))
    if not info["keys"]:
        print("\nno keys recorded: a kept store records its batches on close and flush()")
        return report_damage("inspect", info["problems"])
    table = [["key", "shapes", "dtypes", "bytes", "batches"]]
    for key, entry in info["keys"].items():
        shapes = "; ".join(str(tuple(t["shape"])) for t in entry["tensors"]) or "-"
        kinds = ", ".join(dict.fromkeys(t["dtype"] for t in entry["tensors"])) or "-"
        table.append(
            [repr(key), shapes, kinds, _format_bytes(entry["bytes"]), str(entry["batches"])]
        )
    print()
    print(_table(table))
    return report_damage("inspect", info["problems"])


def _store_state(info: dict) -> str:
    if problems := len(info["problems"]):
        return f"damaged ({problems} problem{'s' * (problems > 1)}: inspect the store)"
    if info["complete"]:
        return "complete"
    alive = info["owner_alive"]
    return {True: "open", False: "left by a crash", None: "open on another host?"}[alive]


def _inspect_run(args: argparse.Namespace, run_dir: Path, ranks: dict[int, Path]) -> int:
    """A run directory: each rank's stores (state, owner, arrays, bytes) and totals."""
    from .summary import summarize

    listing = []
    for rank, rank_dir in ranks.items():
        stores = []
        for path in store_format.find_stores(rank_dir):
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
    print(_table([
        ["run", str(run_dir)],
        ["ranks", f"{len(ranks)} ({', '.join(map(str, ranks))})"],
        ["stores", f"{count}, {arrays} arrays, {_format_bytes(nbytes)}"],
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
            table.append(
                [str(entry["rank"]), name, _store_state(info), owner, str(info["arrays"]),
                 _format_bytes(info["bytes"])]
            )  # fmt: skip
    table.append(["total", f"{count} stores", "", "", str(arrays), _format_bytes(nbytes)])
    print()
    print(_table(table))
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


def _export(tensor: torch.Tensor, path: Path) -> str:
    if path.suffix == ".pt":
        torch.save(tensor.clone(), path)
        return f"wrote {path} (torch.save, {dtype_name(tensor.dtype)})"
    if path.suffix != ".npy":
        raise ValueError(f"--export: {path.name} must end in .pt or .npy")
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


def _show(args: argparse.Namespace) -> int:
    from .summary import load_value, report_damage, tensor_stats

    try:
        value = load_value(args.path, args.batch, args.key)
    except StoreCorruptError as error:
        return report_damage("show", [str(error)])
    tensors: list[torch.Tensor] = []
    lines = _describe(value, "", tensors)
    stats = [tensor_stats(tensor) for tensor in tensors]
    if args.json:
        print(json.dumps({"structure": lines, "tensors": stats}))
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
        leaf = args.leaf or 0
        if not 0 <= leaf < len(tensors):
            raise ValueError(
                f"--leaf: {leaf} is not a tensor of this value (0..{len(tensors) - 1})"
            )
        print(
            _export(tensors[leaf], Path(args.export)), file=sys.stderr if args.json else sys.stdout
        )
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .leftovers import verify_lines
    from .summary import verify

    report = verify(args.path)
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
        checked = f"{report['arrays']} arrays checked, {report['checksummed']} with a CRC32C"
        if report["arrays"] and not report["checksummed"]:
            checked += " (sizes only: the store was written without checksum = true)"
        print(f"{checked}; {len(report['bad']) + len(report['problems'])} bad")
    return 1 if report["bad"] or report["problems"] else 0


# The demo's size options: flag, the size it sets (demo.DEFAULT_SIZES key), help.
_DEMO_SIZE_OPTIONS = (
    ("--samples", "samples", "calibration samples, one batch each"),
    ("--seq-len", "seq_len", "tokens per sample"),
    ("--hidden", "hidden", "hidden size; heads of 64 where it is a multiple of 64"),
    ("--layers", "layers", "decoder blocks, calibrated one after another"),
)


def _demo(args: argparse.Namespace) -> int:
    from .demo import activation_bytes, run_demo

    for flag, size, _ in _DEMO_SIZE_OPTIONS:
        if getattr(args, size) < 1:
            raise ValueError(f"{flag}: must be at least 1, got {getattr(args, size)}")
    config = CacheConfig.from_file(args.config) if args.config else CacheConfig.from_env()
    changes = {"keep_store": True} if args.keep_store else {}
    if args.host_bytes is not None:
        changes["host_bytes"] = parse_size("--host-bytes", args.host_bytes)
    config = config.replace(**changes) if changes else config
    cached = activation_bytes(args.samples, args.seq_len, args.hidden)
    if config.host_bytes == AUTO:
        # The demo is about spilling: default to a host budget a quarter of its activations.
        config = config.replace(host_bytes=cached // 4)
    result = run_demo(
        samples=args.samples,
        seq_len=args.seq_len,
        hidden=args.hidden,
        layers=args.layers,
        config=config,
        # tqdm draws on stderr; with --json a script reading stderr gets no bar lines
        # unless a person is watching it.
        progress=not args.json or sys.stderr.isatty(),
    )
    print(_demo_summary(args, result))
    return 0 if result.identical else 1


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
            "host_bytes": host["budget"],
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
    wall, reference = result.wall_seconds, result.reference_seconds
    rows = [
        [
            "activations cached",
            f"{_format_bytes(result.cached_bytes)} ({args.samples} samples: "
            f"hidden states {_format_bytes(hidden)}, causal masks {_format_bytes(masks)})",
        ],
        ["host budget", f"{_format_bytes(host['budget'])} ({share})"],
        ["written to disk", _format_bytes(disk["bytes_written"])],
        ["read from disk", _format_bytes(disk["bytes_read"])],
        ["stalled on I/O", f"{stats['stall_seconds']:.2f} s"],
        ["wall time", f"{wall:.2f} s (all in RAM: {reference:.2f} s, {wall / reference:.2f}x)"],
    ]
    if kept is not None:
        rows.append(["store kept at", kept])
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.ljust(width)} : {value}" for name, value in rows] + [""]

    def tier(name: str, figures: dict, misses: str) -> list[str]:
        budget = "no limit" if figures["budget"] is None else _format_bytes(figures["budget"])
        if name == "disk" and figures["path"] is None:
            budget = "no disk tier"
        held = _format_bytes(figures["bytes"])
        return [name, str(figures["hits"]), misses, held, budget]

    tiers = [
        ["tier", "hits", "misses", "held", "budget"],
        tier("device", stats["device"], str(stats["device"]["misses"])),
        tier("host", host, str(host["misses"])),
        tier("write-behind", stats["write_behind"], "-"),
        tier("disk", disk, str(disk["misses"])),
    ]
    lines.append(_table(tiers))
    lines.append(
        "(reads: a read the host tier misses is served from the write-behind area, where a\n"
        " value waits for its disk write, or from the disk; held: bytes at the end of the run)"
    )
    verdict = "yes" if result.identical else "NO"
    lines += ["", f"statistics equal to the all-in-RAM run, bit for bit: {verdict}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spillcache", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    from .demo import DEFAULT_SIZES

    demo = commands.add_parser(
        "demo",
        help="calibrate a small random-weight transformer layer by layer, spilling to disk",
        description="Calibrate a random-weight decoder-only transformer layer by layer (the "
        "GPTQ statistic X^T X of every linear layer) through a cache whose activations spill "
        "to disk, then check every statistic bit for bit against the same run all in RAM. "
        "Each sample caches a float32 hidden state (seq-len x hidden x 4 B) and a bool causal "
        "mask (seq-len x seq-len B). The defaults cache 160 MiB, four times the default host "
        "budget; the whole run takes 20-30 s on 2 CPU cores.",
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
        help="host RAM tier budget in bytes or with a unit, e.g. 64MiB (default: a quarter of "
        "the activations, unless the config sets host_bytes)",
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
        "only where stderr is a terminal (default: a table)",
    )
    demo.set_defaults(run=_demo)

    config = commands.add_parser(
        "config", help="print the effective configuration and where each value comes from"
    )
    config.add_argument("--file", help="a TOML config file (instead of $SPILLCACHE_CONFIG)")
    config.add_argument("--json", action="store_true")
    config.set_defaults(run=_config)

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
    except (SpillCacheError, OSError, ValueError, TypeError, KeyError, IndexError) as error:
        # A KeyError's str() is the repr of its message: print the message itself.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"spillcache {args.command}: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
