"""``spillcache plan``: what a calibration run will cache, and what it will ask of the
disks, before it starts; with the config to run it with. This module is the command:
its options, and the plan as it prints it (a report, or JSON) and as ``--write`` writes
it (a TOML config, sizes with units). The figures come from plan_figures.py; bad input
exits 2 with one line naming the option.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..text import format_bytes, size_text
from .plan_figures import PlanInputError, check_writable, make_plan

__all__ = ["add_plan_command", "config_toml", "format_plan", "node_lines"]


def add_plan_command(commands: Any) -> None:
    plan = commands.add_parser(
        "plan",
        help="size a calibration run before it starts: what it caches, disk traffic, config",
        description=(
            "Predict what llm-compressor's sequential pipeline caches for a model, what "
            "the disk tier writes and reads over the whole run at a host budget, the "
            "disk space it needs, how long that I/O takes at the measured disk speed, "
            "and the config to run it with."
        ),
    )
    model = plan.add_argument_group("the model (a config.json, or its sizes)")
    model.add_argument(
        "--model", metavar="PATH", help="a Hugging Face config.json (or its directory)"
    )
    model.add_argument("--hidden", type=int, help="hidden size (without --model)")
    model.add_argument("--layers", type=int, help="decoder layers (without --model)")
    model.add_argument(
        "--intermediate",
        type=int,
        help="MLP width, for AWQ (default: the model's, else 4 x hidden)",
    )
    model.add_argument(
        "--dtype",
        help="activation dtype, e.g. bfloat16 (default: the model's; bfloat16 without --model)",
    )
    model.add_argument(
        "--head-dim",
        type=int,
        help="rotary head dimension (default: the model's; none without --model)",
    )
    model.add_argument(
        "--weights-device",
        choices=("cpu", "gpu", "cuda"),
        default="cpu",
        help="where the model's weights are held during the run (with --model): cpu "
        "(offloaded, as llm-compressor's sequential pipeline does: they take host RAM "
        "beside host_bytes, counted once per node) or gpu/cuda (not host RAM) (default cpu)",
    )
    run = plan.add_argument_group("the run")
    run.add_argument("--samples", type=int, default=512, help="calibration samples (default 512)")
    run.add_argument("--seq-len", type=int, default=2048, help="tokens per sample (default 2048)")
    run.add_argument(
        "--mask",
        help="the causal mask cached per sample: none, bool or a dtype (default: the "
        "activation dtype, as llm-compressor 0.14's eager attention caches it)",
    )
    run.add_argument("--recipe", choices=("gptq", "awq"), default="gptq", help="default gptq")
    run.add_argument(
        "--awq-offload",
        choices=("gpu", "cpu"),
        default="gpu",
        help="where AWQ's caches keep values: gpu (offload_device None on a GPU model: "
        "dense models, the default) or cpu (MoE models, AWQModifier(offload_device='cpu'), "
        "or a CPU-only run): then they share the host budget and are replayed too",
    )
    run.add_argument("--ranks", type=int, default=1, help="torchrun ranks on the node (default 1)")
    node = plan.add_argument_group("the node")
    node.add_argument(
        "--host-bytes",
        help="host_bytes for the node: all the host RAM the cache holds values in, the "
        "host tier and the parts for values on their way to and from disk "
        "(write_behind_bytes, read_buffer_bytes) (default: the config's; auto: half of --ram "
        "less the weights on the CPU)",
    )
    node.add_argument(
        "--disk-path",
        nargs="+",
        metavar="DIR",
        help="one directory per drive (default: the config's)",
    )
    node.add_argument(
        "--ram",
        help="the target node's available RAM, before the model is loaded (default: this "
        "machine's available RAM now, which may not be the target node's)",
    )
    node.add_argument("--no-probe", action="store_true", help="do not measure the disks")
    out = plan.add_argument_group("output")
    out.add_argument("--check", action="store_true", help="exit 1 when the run will not fit")
    out.add_argument("--write", metavar="FILE", help="write the recommended config as TOML")
    out.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.set_defaults(run=_plan)


def _plan(args: argparse.Namespace) -> int:
    try:
        if args.write:  # found out now, not after the replay and the probe
            check_writable("--write", Path(args.write).absolute().parent, "the file")
        plan = make_plan(args)
        if args.write:
            try:
                Path(args.write).write_text(config_toml(plan["config"]))
            except OSError as error:
                raise PlanInputError(
                    f"--write: cannot write {args.write} ({error.strerror or error}); name "
                    "a file in a writable directory with room"
                ) from None
    except PlanInputError as error:
        print(f"spillcache plan: {error}", file=sys.stderr)
        return 2
    print(json.dumps(plan) if args.json else format_plan(plan))
    return 1 if args.check and not plan["fits"] else 0


def config_toml(config: dict[str, Any]) -> str:
    """The config as TOML, sizes with a unit ("11674MiB"), as a person writes them."""
    lines = ["# written by spillcache plan"]
    for name, value in config.items():
        if name.endswith("_bytes") and isinstance(value, int):
            value = size_text(value)
        lines.append(f"{name} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def node_lines(plan: dict[str, Any]) -> list[str]:
    """The node's figures, each saying where it came from; a warning where host_bytes
    and the weights held in host RAM are together more than the RAM."""
    f, sources, on_cpu = format_bytes, plan["sources"], plan["weights_host_bytes"] or 0
    lines = [f"node: RAM {f(plan['ram_bytes'])} ({sources['ram_bytes']})"]
    if plan["weights_bytes"] is not None:
        where = "on the CPU: host RAM besides host_bytes" if on_cpu else "on the GPUs"
        lines.append(
            f"model weights: {f(plan['weights_bytes'])} ({sources['weights_bytes']}), "
            f"{where} (--weights-device)"
        )
    ram = f"the RAM, {f(plan['ram_bytes'])}"
    if on_cpu >= plan["ram_bytes"]:
        lines.append(
            f"  WARNING: the weights on the CPU alone are more than {ram}: keep them on the "
            "GPUs (--weights-device gpu), or give the target node's RAM (--ram)"
        )
    elif not plan["fits_ram"]:
        held = f"host_bytes, {f(plan['host_bytes'])} ({sources['host_bytes']}), is"
        if on_cpu:
            held = f"{held[:-3]} and the weights on the CPU, {f(on_cpu)}, are together"
        lines.append(
            f"  WARNING: {held} more than {ram}: lower host_bytes"
            + (" or keep the weights on the GPUs" if on_cpu else "")
        )
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """``make_plan``'s figures as the command prints them."""
    model, f = plan["model"], format_bytes
    lines = [
        f"model: hidden {model['hidden']}, {model['layers']} layers, {model['dtype']}, "
        f"mask {model['mask'] or 'none'}, rotary head dim {model['head_dim'] or 'none'}",
        f"run: {plan['samples']} samples x {plan['seq_len']} tokens, "
        f"{plan['ranks']} rank(s), {plan['recipe']}",
        *node_lines(plan),
        "",
        "cached per sample: "
        + ", ".join(f"{what} {f(n)}" for what, n in plan["per_sample_bytes"].items()),
        f"cached per pass: {f(plan['cached_bytes'])} against a host tier of "
        f"{f(plan['host_tier_bytes'])} (host_bytes {f(plan['host_bytes'])}, from "
        f"{plan['sources']['host_bytes']}, less the parts for values on their way to and "
        "from disk): " + ("fits, nothing spills" if plan["fits_host"] else "spills to disk"),
        f"whole run, disk: {f(plan['disk_written_bytes'])} written, "
        f"{f(plan['disk_read_bytes'])} read",
    ]
    for disk in plan["disks"]:
        line = f"  {disk['path']}: needs {f(disk['needed_bytes'])} of {f(disk['free_bytes'])} free"
        if "write_bytes_per_second" in disk:
            line += (
                f"; measured {f(disk['write_bytes_per_second'])}/s write, "
                f"{f(disk['read_bytes_per_second'])}/s read"
            )
        if disk["needed_bytes"] > disk["free_bytes"]:
            line += "  WARNING: not enough free space: free some, or add a drive to disk_path"
        lines.append(line)
    if plan["replayed_layers"] < plan["model"]["layers"]:
        lines.append(
            f"  (an estimate: {plan['replayed_layers']} layers replayed, the others counted "
            "as the last but one)"
        )
    if plan["io_seconds"] is not None:
        lines.append(f"disk I/O at that speed: {plan['io_seconds']:.0f} s over the run")
    if "awq" in plan:
        awq = plan["awq"]
        lines.append(f"AWQ caches {f(awq['per_layer_bytes'])} per layer; {awq['note']}")
    lines += ["", "recommended config (per node):"]
    for name, value in plan["config"].items():
        shown = f(value) if name.endswith("_bytes") else value
        lines.append(f"  {name} = {shown}    # {plan['why'][name]}")
    if not plan["fits"]:
        lines.append("the run does not fit: see the warnings above")
    return "\n".join(lines)
