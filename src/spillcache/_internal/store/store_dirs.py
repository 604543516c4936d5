"""Where stores are: the stores directly under a directory, torchrun's run and rank
directories, what a store occupies, whether its process still runs, and removing the
directories a run leaves empty. ``spillcache gc`` and ``du``, the dead-store sweep and the
pool use it; store_format.py says what a store itself holds.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from spillcache.errors import StoreError, StoreNotFoundError

from . import owners
from .store_format import STORE_PREFIX, read_root_attributes

__all__ = [
    "RANK_PREFIX",
    "find_runs",
    "find_stores",
    "owner_alive",
    "rank_dirs",
    "remove_empty_dirs",
    "run_store_parent",
    "store_bytes",
]

RANK_PREFIX = "rank"
_RANK_NAME = re.compile(rf"{RANK_PREFIX}(0|[1-9][0-9]*)")


def find_stores(directory: str | os.PathLike[str]) -> dict[Path, dict]:
    """The spillcache stores directly under ``directory`` (any format version), by name,
    each with its root attributes."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreNotFoundError(f"no directory {directory}")
    found = {}
    for path in sorted(directory.glob(f"{STORE_PREFIX}*")):
        try:
            found[path] = read_root_attributes(path)
        except (StoreError, PermissionError):
            continue  # not a store, one being created right now, or another user's
    return found


# Run directories (torchrun): every rank's stores under <disk_path>/<run>/rank<R>/.


def run_store_parent(disk_dir: str | os.PathLike[str], run_id: str, rank: int) -> Path:
    """Where rank ``rank`` of run ``run_id`` creates its stores (``run_id`` is already a
    safe directory name: see ``ranks.run_id``)."""
    return Path(disk_dir) / run_id / f"{RANK_PREFIX}{rank}"


def rank_dirs(directory: str | os.PathLike[str]) -> dict[int, Path]:
    """The ``rank<R>`` directories of a run directory, by rank; ``{}`` if ``directory``
    is no run directory: one is a directory holding ``rank<R>`` directories and nothing
    else (so that no other directory, in the temp directory say, is taken for one)."""
    found: dict[int, Path] = {}
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                match = _RANK_NAME.fullmatch(entry.name)
                if match is None or not entry.is_dir(follow_symlinks=False):
                    return {}
                found[int(match.group(1))] = Path(entry.path)
    except OSError:  # gone, not a directory, or not ours to read
        return {}
    return dict(sorted(found.items()))


def find_runs(directory: str | os.PathLike[str]) -> dict[Path, dict[int, Path]]:
    """The run directories at ``directory`` itself or directly under it, each with its
    rank directories (``find_stores`` lists a rank directory's stores)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise StoreNotFoundError(f"no directory {directory}")
    own = rank_dirs(directory)
    if own:
        return {directory: own}
    runs = {}
    for path in sorted(directory.iterdir()):
        if path.is_dir() and not path.is_symlink() and (ranks := rank_dirs(path)):
            runs[path] = ranks
    return runs


def remove_empty_dirs(path: str | os.PathLike[str], stop: str | os.PathLike[str]) -> list[Path]:
    """Remove ``path`` and then its parents while they are empty, never ``stop`` or a
    directory outside it (rmdir only: nothing that holds a file or a store goes). For
    a rank directory and its run directory once their last store is gone; returns the
    directories removed."""
    path, stop = Path(path), Path(stop)
    removed = []
    while path != stop and stop in path.parents:
        try:
            path.rmdir()
        except OSError:  # not empty (another rank's store, one being made), or gone
            break
        removed.append(path)
        path = path.parent
    return removed


def store_bytes(path: Path) -> int:
    """Bytes of every file in the store (what deleting it frees)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass  # deleted by its cache meanwhile
    return total


def owner_alive(attributes: dict) -> bool | None:
    """Whether the process that wrote the store still runs (``owners.alive``: a zombie
    or a reused pid is dead; None, never dead, for another host's store)."""
    return owners.alive(attributes)
