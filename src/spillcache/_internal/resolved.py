"""What a ``CacheConfig`` comes to in this process: every "auto" resolved, the node's
sizes shared out among its ranks, the disk directories named and checked, the offload
device parsed. The rest of the cache gets numbers, directories and devices from here
and never reads "auto" itself; ``spillcache config`` shows the same resolution.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AUTO, CacheConfig
from ..errors import ConfigError
from .ranks import rank_info
from .sysinfo import RAM_BACKED, available_ram, filesystem_type, nearest_existing
from .text import format_bytes

__all__ = [
    "NODE_SIZES",
    "ResolvedBudgets",
    "auto_host_bytes",
    "checked_disk_dirs",
    "disk_directories",
    "keeps_device_tier",
    "resolve_offload_device",
    "process_budgets",
    "transit_bytes",
]

# Sizes that are the node's under budget_scope = "node" (RAM, and the node's disks).
NODE_SIZES = ("host_bytes", "write_behind_bytes", "read_buffer_bytes", "disk_bytes")


@dataclass(frozen=True)
class ResolvedBudgets:
    """The sizes this process uses: "auto" resolved and node-wide sizes divided among
    the node's ranks. ``device_bytes`` is per GPU (None: no limit, which "auto" is
    wherever the device tier is kept, see ``keeps_device_tier``); ``shares`` is what
    node-wide sizes were divided by (1 outside torchrun or with budget_scope = "rank")."""

    host_bytes: int
    write_behind_bytes: int
    read_buffer_bytes: int
    disk_bytes: int | None
    device_bytes: int | None
    shares: int

    @property
    def host_tier_bytes(self) -> int:
        """What the host tier may hold: host_bytes less the parts kept for values on
        their way to and from disk (0 without a region, host_bytes = 0)."""
        if self.host_bytes == 0:
            return 0
        return self.host_bytes - self.write_behind_bytes - self.read_buffer_bytes


# "auto" write_behind_bytes and read_buffer_bytes: each an eighth of host_bytes, at
# most this; without a region (host_bytes = 0), this much of ordinary memory.
TRANSIT_FRACTION = 8
TRANSIT_MAX = 512 * 2**20
NO_REGION_TRANSIT = 256 * 2**20


def transit_bytes(host_bytes: int) -> int:
    """What "auto" write_behind_bytes (and read_buffer_bytes) come to."""
    if host_bytes == 0:
        return NO_REGION_TRANSIT
    return min(host_bytes // TRANSIT_FRACTION, TRANSIT_MAX)


def process_budgets(
    config: CacheConfig, ram_available: int | None = None, ranks_on_node: int | None = None
) -> ResolvedBudgets:
    """The budgets of this process. "auto" host_bytes is half the available RAM
    (``ram_available``, else measured now), divided among the ranks on this node; with
    budget_scope = "node" the explicit NODE_SIZES are divided among them too. Outside
    torchrun nothing is divided. ``ranks_on_node``: one rank's budgets on a node of
    that many ranks (``spillcache plan``), instead of this process's."""
    if ranks_on_node is None:
        info = rank_info()
        ranks_on_node = 1 if info is None else info.local_world_size
    shares = ranks_on_node if config.budget_scope == "node" else 1
    sizes: dict[str, int | None] = {}
    for name in NODE_SIZES:
        value = getattr(config, name)
        if value == AUTO and name == "host_bytes":  # the node's RAM, shared among its ranks
            ram = available_ram() if ram_available is None else ram_available
            sizes[name] = auto_host_bytes(ram, ranks_on_node)
        elif value == AUTO:  # a part of this process's host_bytes
            sizes[name] = transit_bytes(sizes["host_bytes"])
        else:
            sizes[name] = None if value is None else value // shares
    device_bytes = None if config.device_bytes == AUTO else config.device_bytes
    budgets = ResolvedBudgets(**sizes, device_bytes=device_bytes, shares=shares)
    if budgets.host_tier_bytes < 0:
        raise ConfigError(
            f"write_behind_bytes ({format_bytes(budgets.write_behind_bytes)}) and "
            f"read_buffer_bytes ({format_bytes(budgets.read_buffer_bytes)}) are parts of "
            f"host_bytes ({format_bytes(budgets.host_bytes)}"
            + (" for this rank" if shares > 1 else "")
            + '), and together more than it: lower them (or leave them "auto") or raise '
            "host_bytes"
        )
    return budgets


def auto_host_bytes(ram_available: int, ranks_on_node: int = 1) -> int:
    """What host_bytes = "auto" gives each rank: half the node's available RAM (the
    rest is the model's, the page cache's and everything else's), shared evenly."""
    return ram_available // 2 // ranks_on_node


def resolve_offload_device(value: Any) -> torch.device | None:
    """The ``offload_device`` argument as a device (None: values stay where they are)."""
    if value is None:
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"offload_device: {value!r} is not a torch device; use 'cpu' "
            "(offload to host RAM, spilling to disk), None (keep values where they are) "
            "or an accelerator such as 'cuda:0'"
        ) from error


def keeps_device_tier(config: CacheConfig, device: torch.device | None) -> bool:
    """Whether a cache offloading to ``device`` keeps values on an accelerator.
    device_bytes = "auto" keeps none when offloading to the CPU (the stock behaviour)
    and leaves values where they are otherwise; a number always keeps the tier."""
    offloads_to_cpu = device is not None and device.type == "cpu"
    return not (config.device_bytes == AUTO and offloads_to_cpu)


def disk_directories(disk_path: str | tuple[str, ...] | None) -> list[str]:
    """The directories a disk_path setting names ("auto" and None: the temp directory)."""
    if disk_path in (AUTO, None):
        return [tempfile.gettempdir()]
    return [disk_path] if isinstance(disk_path, str) else list(disk_path)


def checked_disk_dirs(config: CacheConfig) -> list[str]:
    """The disk tier's directories, one per drive ([] for no disk tier): refused when
    they can never hold a store, with a warning for RAM-backed ones."""
    if config.disk_path is None:
        return []
    disk_dirs = disk_directories(config.disk_path)
    for disk_dir in disk_dirs:
        _check_writable(disk_dir)
        if filesystem_type(disk_dir) in RAM_BACKED:
            warnings.warn(
                f"spillcache's disk tier is at {disk_dir}, which is RAM-backed "
                f"({filesystem_type(disk_dir)}): spilled values still use RAM. Set disk_path "
                "(or SPILLCACHE_DISK_PATH) to a directory on a local disk",
                stacklevel=5,  # the IntermediatesCache constructor's caller
            )
    return disk_dirs


def _check_writable(disk_dir: str) -> None:
    """A disk_path that can never hold a store is refused when the cache is made, not
    when its first value spills."""
    path = nearest_existing(disk_dir)  # made on first use, in its parent
    if not path.is_dir():
        raise ConfigError(
            f"disk_path: {disk_dir} is not a directory ({path} is a file); set disk_path "
            "to a directory on a local disk"
        )
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(
            f"disk_path: {disk_dir} is not writable ({path} is read-only to this process); "
            "set disk_path to a writable directory on a local disk"
        )
