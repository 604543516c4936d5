"""Where this process sits in a torchrun job: its rank, how many ranks share its node,
the run every rank agrees on, and so its share of the node's budgets and its store
directory.

Everything here is read from the environment (and, when it is initialised, from
``torch.distributed``'s local state): no collective call is ever made, so nothing waits
on another rank, and a rank that dies cannot hang the others.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from spillcache.errors import ConfigError

from ..store import store_dirs

__all__ = ["RankInfo", "rank_info", "run_id", "store_parent"]

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
