"""``spillcache plan``'s figures as text: the report it prints, and the config file
``--write`` writes (plan_cli.py works them out)."""

from __future__ import annotations

import json
from typing import Any

from ..text import format_bytes, size_text

__all__ = ["config_toml", "node_lines", "plan_text"]


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


def plan_text(plan: dict[str, Any]) -> str:
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
