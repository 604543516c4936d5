"""What a ``CacheConfig`` comes to in this process: where the process sits in a torchrun
job, every "auto" resolved, the node's sizes shared out among its ranks, the disk
directories named and checked (and this rank's store directory in each), the offload
device parsed. The rest of the cache gets numbers, directories and devices from here
and never reads "auto" itself; ``spillcache config`` shows the same resolution.

A process's place in a job (its rank, how many ranks share its node, the run every
rank agrees on) is read from the environment (and, when it is initialised, from
``torch.distributed``'s local state): no collective call is ever made, so nothing waits
on another rank, and a rank that dies cannot hang the others.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spillcache.config import AUTO, CacheConfig
from spillcache.errors import ConfigError

from ..store import store_dirs
from ..sysinfo import (
    RAM_BACKED,
    available_ram,
    directory_problem,
    filesystem_type,
    nearest_existing,
    ram_limit,
)
from ..text import format_bytes

__all__ = [
    "NODE_SIZES",
    "RankInfo",
    "ResolvedBudgets",
    "auto_host_bytes",
    "check_host_budget",
    "checked_disk_dirs",
    "checked_process_budgets",
    "disk_directories",
    "keeps_device_tier",
    "process_budgets",
    "rank_info",
    "resolve_offload_device",
    "run_id",
    "setting_fix",
    "setting_origin",
    "store_parent",
    "transit_bytes",
]

# -------------------------------------------------------- this process in a job

# The variables torchrun sets for every worker, with the least each may be.
RANK_VARIABLES = {"RANK": 0, "WORLD_SIZE": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1}
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a job: global rank and size, rank and size on this node,
    and the run's name (a safe directory name, the same on every rank)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    run_id: str


def _read(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    least = RANK_VARIABLES[name]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:
        raise ConfigError(
            f"{name}={environ[name]!r}: expected a whole number, {least} or more; torchrun "
            f"sets {name} for every worker: unset it outside a torchrun job, or fix the "
            "launcher that set it"
        )
    return value


def _initialised_group() -> tuple[int, int] | None:
    """(rank, world size) of torch.distributed's default group, if one is initialised.
    Local state only; torch.distributed is not imported if nothing imported it."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.get_rank(), dist.get_world_size()


def rank_info(environ: Mapping[str, str] | None = None) -> RankInfo | None:
    """This process's rank and run, or None when it is not one rank of a job (none of
    RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE set and no torch.distributed group).

    Rank and world size come from torch.distributed when it is initialised, else from
    RANK and WORLD_SIZE (LOCAL_RANK and LOCAL_WORLD_SIZE alone: a one-node job). Without
    LOCAL_WORLD_SIZE every rank is taken to be on this node (the safe guess: budgets can
    only come out smaller than they could be, never larger), and LOCAL_RANK defaults to
    the rank modulo it. Malformed or inconsistent values raise ConfigError.
    """
    environ = os.environ if environ is None else environ
    values = {name: _read(environ, name) for name in RANK_VARIABLES}
    group = _initialised_group()
    if group is None and all(value is None for value in values.values()):
        return None
    if group is not None:
        (rank, world), names = group, ("torch.distributed's rank", "world size")
    else:
        rank, world = values["RANK"], values["WORLD_SIZE"]
        names = ("RANK", "WORLD_SIZE")
        if rank is None and world is None:  # LOCAL_* only: a job of one node
            rank, world = values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"]
            names = ("LOCAL_RANK", "LOCAL_WORLD_SIZE")
        if rank is None or world is None:
            given, missing = (names[0], names[1]) if world is None else (names[1], names[0])
            raise ConfigError(
                f"{given} is set but {missing} is not: spillcache cannot tell this process's "
                f"place in the job; set both, as torchrun does (RANK, WORLD_SIZE, LOCAL_RANK, "
                f"LOCAL_WORLD_SIZE), or unset {given}"
            )
    local_world = values["LOCAL_WORLD_SIZE"] or world
    local_rank = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank % local_world
    for low, high, low_name, high_name in (
        (rank, world, names[0], names[1]),
        (local_rank, local_world, "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
    ):
        if low >= high:
            raise ConfigError(
                f"{low_name} ({low}) must be below {high_name} ({high}); fix the launcher's "
                "variables (torchrun sets them consistently)"
            )
    if local_world > world:
        raise ConfigError(
            f"LOCAL_WORLD_SIZE ({local_world}) is larger than the job's {names[1]} ({world}); "
            "fix the launcher's variables (torchrun sets them consistently)"
        )
    return RankInfo(rank, world, local_rank, local_world, run_id(environ))


def run_id(environ: Mapping[str, str] | None = None) -> str:
    """The run's name, as a safe directory name, agreed by every rank without talking:
    TORCHELASTIC_RUN_ID (torchrun's rendezvous id) unless unset or torchrun's default
    "none"; else "job-<MASTER_ADDR>-<MASTER_PORT>-p<parent pid>": the launcher that
    started the ranks (torchrun's agent, mp.spawn's parent) is every local rank's
    parent, and the address and port are the job's."""
    environ = os.environ if environ is None else environ
    given = environ.get("TORCHELASTIC_RUN_ID", "").strip()
    if given and given.lower() != "none":
        return _safe_name(given)
    parts = [environ.get(name, "").strip() for name in ("MASTER_ADDR", "MASTER_PORT")]
    return _safe_name("-".join(["job", *filter(None, parts), f"p{os.getppid()}"]))


def _safe_name(text: str) -> str:
    """One path component: no separator, no "..", no leading dot or dash, <= 100 chars."""
    name = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", text)).strip("._-")[:100].rstrip("._-")
    return name or "run"


def store_parent(disk_dir: str | os.PathLike[str]) -> Path:
    """Where this process creates its stores: ``<disk_dir>/<run>/rank<R>`` (R the global
    rank) under torchrun, else ``disk_dir`` itself."""
    info = rank_info()
    if info is None:
        return Path(disk_dir)
    return store_dirs.run_store_parent(disk_dir, info.run_id, info.rank)


# -------------------------------------------------------------------- budgets

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


# The least "auto" gives: below it the host tier holds nothing worth its bookkeeping.
AUTO_HOST_FLOOR = 2**20


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
            if sizes[name] < AUTO_HOST_FLOOR:  # 0 would mean no region: unbounded memory
                raise ConfigError(
                    f'host_bytes "auto" is half the RAM available now, {format_bytes(ram)} '
                    f"(MemAvailable, or what this process's cgroup still allows), shared by "
                    f"{ranks_on_node} rank(s): less than {format_bytes(AUTO_HOST_FLOOR)}; "
                    "free memory, or set host_bytes to what this process may use"
                )
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
    ConfigError. Above what is available now (``sysinfo.available_ram``: MemAvailable,
    or what the cgroup still allows where less), but within the RAM: a warning (the
    model and other processes hold the difference now; they may let go), unless
    ``warn`` is False (a check ahead of the cache, which will warn). "auto" is half the
    available RAM and never either; 0 maps no region. ``ram`` and ``available``: this
    machine's, measured now, unless given."""
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
