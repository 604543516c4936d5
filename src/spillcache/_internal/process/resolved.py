"""What a ``CacheConfig`` comes to in this process: every "auto" resolved, the node's
sizes shared out among its ranks, the disk directories named and checked, the offload
device parsed. The rest of the cache gets numbers, directories and devices from here
and never reads "auto" itself; ``spillcache config`` shows the same resolution.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from spillcache.config import AUTO, CacheConfig
from spillcache.errors import ConfigError

from ..sysinfo import (
    RAM_BACKED,
    available_ram,
    directory_problem,
    filesystem_type,
    nearest_existing,
    ram_limit,
)
from ..text import format_bytes
from .ranks import rank_info

__all__ = [
    "NODE_SIZES",
    "ResolvedBudgets",
    "auto_host_bytes",
    "check_host_budget",
    "checked_disk_dirs",
    "checked_process_budgets",
    "disk_directories",
    "keeps_device_tier",
    "resolve_offload_device",
    "process_budgets",
    "setting_fix",
    "setting_origin",
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


def checked_process_budgets(config: CacheConfig) -> ResolvedBudgets:
    """``process_budgets(config)`` for a cache being made in this process: its host
    budget checked against this machine's memory (``check_host_budget``)."""
    budgets = process_budgets(config)
    check_host_budget(config, budgets)
    return budgets


def check_host_budget(
    config: CacheConfig,
    budgets: ResolvedBudgets,
    *,
    ram: tuple[int, str] | None = None,
    available: int | None = None,
    warn: bool = True,
    stacklevel: int = 5,  # the IntermediatesCache constructor's caller, from the pool
) -> None:
    """Refuse a host budget this machine can never hold, and warn about one it cannot
    hold now, before anything is stored: a region larger than the RAM is only found
    out hours into a run, when the kernel's OOM killer ends it as the region fills.

    What is compared is the node's figure: host_bytes under budget_scope = "node" (and
    outside torchrun), each rank's host_bytes times the node's ranks under "rank".
    Above the RAM (``sysinfo.ram_limit``: MemTotal, or the cgroup's limit where lower):
    ConfigError. Above what is available now (MemAvailable), but within the RAM: a
    warning (the model and other processes hold the difference now; they may let go),
    unless ``warn`` is False (a check ahead of the cache, which will warn). "auto" is
    half the available RAM and never either; 0 maps no region. ``ram`` and
    ``available``: this machine's, measured now, unless given."""
    if config.host_bytes == AUTO or budgets.host_bytes == 0:
        return
    info = rank_info()
    ranks = 1 if info is None else info.local_world_size
    node_bytes = budgets.host_bytes * ranks if budgets.shares == 1 else config.host_bytes
    what = format_bytes(node_bytes, tib=True)
    if budgets.shares == 1 and ranks > 1:
        what = (
            f"{format_bytes(budgets.host_bytes, tib=True)} for each of this node's {ranks} "
            f'ranks (budget_scope = "rank"): {format_bytes(node_bytes, tib=True)} in all'
        )
    origin, fix = setting_origin(config, "host_bytes"), setting_fix(config, "host_bytes")
    ram_bytes, ram_what = ram_limit() if ram is None else ram
    if node_bytes > ram_bytes:
        raise ConfigError(
            f"host_bytes: {what} ({origin}) is more than {ram_what}, "
            f"{format_bytes(ram_bytes)}: a cache would be killed for want of memory as "
            f"it fills; {fix} to what the node can spare besides the model and the "
            'program, or to "auto" (half the available RAM)'
        )
    free_now = available_ram() if available is None else available
    if warn and node_bytes > free_now:
        warnings.warn(
            f"spillcache's host_bytes, {what} ({origin}), is more than the memory "
            f"available now, {format_bytes(free_now)} of {format_bytes(ram_bytes)} "
            f"({ram_what}): as the cache fills, the machine may swap or kill the run; "
            f"{fix} lower, or free memory first",
            stacklevel=stacklevel,
        )


def setting_origin(config: CacheConfig, name: str) -> str:
    """Where setting ``name`` came from, for a message: "SPILLCACHE_HOST_BYTES",
    "--host-bytes", "host_bytes in spill.toml", "host_bytes as given in code"."""
    source = config.source_of(name)
    if source is None:
        return f"{name} as given in code"
    if source == "default":
        return f"the default {name}"
    if source.startswith(("SPILLCACHE_", "--")):
        return source
    return f"{name} in {source}"


def setting_fix(config: CacheConfig, name: str) -> str:
    """How to change setting ``name`` where it was set ("set SPILLCACHE_HOST_BYTES"),
    to be followed by what to set it to."""
    source = config.source_of(name)
    if source is None or source == "default":
        return f"set {name}"
    if source.startswith("SPILLCACHE_"):
        return f"set {source}"
    if source.startswith("--"):
        return f"give {source}"
    return f"set {name} in {source}"


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


def checked_disk_dirs(config: CacheConfig, *, warn_ram_backed: bool = True) -> list[str]:
    """The disk tier's directories, one per drive ([] for no disk tier): refused when
    they can never hold a store, with a warning for RAM-backed ones (unless
    ``warn_ram_backed`` is False: a check ahead of the cache that will warn)."""
    if config.disk_path is None:
        return []
    disk_dirs = disk_directories(config.disk_path)
    fix = setting_fix(config, "disk_path")
    for disk_dir in disk_dirs:
        _check_writable(disk_dir, fix)
        if warn_ram_backed and filesystem_type(disk_dir) in RAM_BACKED:
            warnings.warn(
                f"spillcache's disk tier is at {disk_dir}, which is RAM-backed "
                f"({filesystem_type(disk_dir)}): spilled values still use RAM. Set disk_path "
                "(or SPILLCACHE_DISK_PATH) to a directory on a local disk",
                stacklevel=5,  # the IntermediatesCache constructor's caller
            )
    return disk_dirs


def _check_writable(disk_dir: str, fix: str) -> None:
    """A disk_path that can never hold a store is refused when the cache is made, not
    when its first value spills; ``fix``: how to change it where it was set."""
    path = nearest_existing(disk_dir)  # made on first use, in its parent
    problem = directory_problem(path)
    if problem == "missing":  # nearest_existing found something: a file
        raise ConfigError(
            f"disk_path: {disk_dir} is not a directory ({path} is a file); {fix} to a "
            "directory on a local disk"
        )
    if problem == "read-only":
        raise ConfigError(
            f"disk_path: {disk_dir} is not writable ({path} is read-only to this process); "
            f"{fix} to a writable directory on a local disk"
        )
