"""``spillcache config``: the effective settings, where each came from, and what
"auto" and node-wide sizes come to in this process."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import warnings
from typing import Any

import torch

from spillcache.config import AUTO, CacheConfig
from spillcache.errors import ConfigError

from .. import sysinfo
from ..process.resolved import disk_directories
from ..store import tensor_store
from ..text import aligned, format_bytes

__all__ = ["add_config_command"]


def add_config_command(commands: Any) -> None:
    config = commands.add_parser(
        "config", help="print the effective configuration and where each value comes from"
    )
    config.add_argument("--file", help="a TOML config file (instead of $SPILLCACHE_CONFIG)")
    config.add_argument("--json", action="store_true")
    config.set_defaults(run=_config)


def _config(args: argparse.Namespace) -> int:
    config, sources = CacheConfig.explain(file=args.file)
    values = {name: getattr(config, name) for name in CacheConfig.field_names()}
    _check_host_budget(config)
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
    print(aligned(rows))
    return 0


def _check_host_budget(config: CacheConfig) -> None:
    """What a cache made here with ``config`` would say of its host budget (refused
    beyond this machine's RAM, warned about beyond what is available now): one line on
    stderr, the table still printed. The config may be meant for another node (a
    torchrun job's, planned from a login node): it is shown either way."""
    from ..process import resolved

    budgets = resolved.process_budgets(config)  # its own errors (RANK=x) are the command's
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            resolved.check_host_budget(config, budgets)
        except ConfigError as refusal:
            print(
                f"spillcache config: a cache made here would refuse it: {refusal}", file=sys.stderr
            )
    for warning in said:
        print(f"spillcache config: warning: {warning.message}", file=sys.stderr)


def _resolved_here(config: CacheConfig) -> dict[str, tuple[dict, str]]:
    """What "auto" and node-wide settings come to in this process: setting -> (keys for
    --json, a note for people), for the settings where the value used differs."""
    from ..process import resolved

    info = resolved.rank_info()
    budgets = resolved.process_budgets(config)
    here: dict[str, tuple[dict, str]] = {}
    for name in resolved.NODE_SIZES:
        value, used = getattr(config, name), getattr(budgets, name)
        if value == AUTO:
            whose = "this process" if info is None else "this rank"
            share = "" if info is None else f" over {info.local_world_size} local ranks"
            if name == "host_bytes":
                how = f"half the available RAM{share}"
            elif budgets.host_bytes:
                how = "an eighth of host_bytes, at most 512.0 MiB"
            else:
                how = "host_bytes = 0 maps no region: ordinary memory beyond any budget"
            note = f"= {format_bytes(used)} for {whose}: {how}"
            here[name] = ({"resolved": used}, note)
        elif used != value:
            note = f"for the node: {format_bytes(used)} for each of its {budgets.shares} ranks"
            here[name] = ({"resolved": used}, note)
    if config.disk_path is not None:
        disk_dirs = disk_directories(config.disk_path)
        parents = [str(resolved.store_parent(disk_dir)) for disk_dir in disk_dirs]
        notes = [f"= {disk_dirs[0]}"] if config.disk_path == AUTO else []
        notes += [] if info is None else [f"this rank's stores in {', '.join(parents)}"]
        if notes:
            where = parents[0] if len(parents) == 1 else parents
            here["disk_path"] = ({"resolved": where}, "; ".join(notes))
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
    from ..process import resolved

    if disk_path is None:
        return {"resolved": None}, "unused: no disk tier"
    answers, notes, errors = [], [], {}
    for disk_dir in disk_directories(disk_path):
        # A store directory is made on first use: probe the filesystem it will be made on.
        probed = sysinfo.nearest_existing(resolved.store_parent(disk_dir))
        try:
            direct = tensor_store.resolve_direct_io(probed, AUTO)
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
        return f"{value} ({format_bytes(value)})"
    if isinstance(value, tuple):  # disk_path: one directory per drive
        return json.dumps(list(value))
    return str(value)
