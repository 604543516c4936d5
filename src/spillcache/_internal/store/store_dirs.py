"""Where stores are, and whose: the stores directly under a directory, torchrun's run
and rank directories, what a store occupies, the process that owns a store and whether
it still runs, this process's stores that nobody keeps, and removing the directories a
run leaves empty. ``spillcache gc`` and ``du``, the dead-store sweep, the signal handler
and the pool use it; store_format.py says what a store itself holds.

A store records its owner's pid and hostname, and with them what tells that process
apart from a later one given the same pid: its start time (``/proc/<pid>/stat`` field
22, clock ticks since boot), the boot it started in (``/proc/sys/kernel/random/boot_id``)
and its pid namespace (a container's pids mean nothing outside it). ``owner_alive``
reads them back: a zombie, a pid now held by another process, or a store from an
earlier boot has a dead owner. Where a store cannot be judged from here (another host
or container), its owner is unknown, never dead: nothing removes it.

The registry of this process's unkept stores is what a signal handler removes
(``cleanup``). A handler runs between two bytecodes of the main thread, possibly while
that thread is inside ``register``: so the registry takes no lock; each change is one
dict operation, atomic under the GIL.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from spillcache.errors import StoreError, StoreNotFoundError

from .store_format import STORE_PREFIX, read_root_attributes

__all__ = [
    "RANK_PREFIX",
    "find_runs",
    "find_stores",
    "owner_alive",
    "owner_identity",
    "rank_dirs",
    "register",
    "registered",
    "remove_empty_dirs",
    "root_of",
    "run_store_parent",
    "stop_registering",
    "store_bytes",
    "unregister",
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
    safe directory name: see ``resolved.run_id``)."""
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


# ------------------------------------------------------------------- owners

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# str(path) -> (pid of the process that made it, the directory it was made under): a
# forked child inherits the dict but owns none of those stores; only the run and rank
# directories between a store and its disk_path are spillcache's to remove once empty
# (a disk_path, or a user's directory above it, may be named like them).
_live: dict[str, tuple[int, str]] = {}
_ending = False  # a signal is ending this process: stores made now are removed at once
_identity: dict[int, dict] = {}  # by pid (a fork has a new one)


def _read(path: str) -> str | None:
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError:
        return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process from /proc, or None where there is no such
    process (or no /proc)."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    # The name (field 2) is in parentheses and may hold spaces and ')': split after the
    # last one. What follows is field 3 (state) onwards; field 22 is start time.
    fields = text[text.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _pid_namespace(pid: int | str = "self") -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def owner_identity() -> dict:
    """What a store records about this process, beyond its pid and hostname (None for
    what this system does not tell)."""
    pid = os.getpid()
    if pid not in _identity:
        stat = _stat(pid)
        _identity[pid] = {
            "start_time": None if stat is None else stat[1],
            "boot_id": _read(str(_BOOT_ID)),
            "pid_namespace": _pid_namespace(),
        }
    return _identity[pid]


def owner_alive(attributes: dict) -> bool | None:
    """Whether the process that wrote a store's root ``attributes`` still runs (a
    zombie or a reused pid is dead): None when that cannot be known from here (another
    host, another pid namespace)."""
    pid = attributes.get("pid")
    if attributes.get("hostname") != socket.gethostname() or type(pid) is not int:
        return None
    mine = owner_identity()
    namespace = attributes.get("pid_namespace")
    if namespace is not None and mine["pid_namespace"] not in (None, namespace):
        return None  # another container with the same hostname: its pids are not ours
    boot = attributes.get("boot_id")
    if boot is not None and mine["boot_id"] not in (None, boot):
        return False  # written before a reboot
    if mine["start_time"] is None:  # no /proc: signal 0 is all there is
        return _answers_signal(pid)
    stat = _stat(pid)
    if stat is None:
        return False
    state, start_time = stat
    if state in ("Z", "X"):  # exited; its parent has not reaped it yet
        return False
    recorded = attributes.get("start_time")
    return recorded is None or recorded == start_time  # else: the pid was reused


def _answers_signal(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


# ---------------------------------------------------------------- this process's stores


def register(path: Path, root: str | os.PathLike[str] | None = None) -> None:
    """A store that is not kept was made at ``path`` under ``root`` (its parent if
    None): a signal removes it, and the directories between it and ``root`` it leaves
    empty. Raises StoreError if a signal is ending the process (the maker removes what
    it made)."""
    _live[str(path)] = (os.getpid(), str(path.parent if root is None else root))
    if _ending:
        raise StoreError(f"not creating {path}: a signal is ending this process")


def unregister(path: Path) -> None:
    _live.pop(str(path), None)


def root_of(path: Path) -> Path:
    """The directory a registered store was made under (``register``'s ``root``)."""
    return Path(_live.get(str(path), (0, path.parent))[1])


def registered() -> list[Path]:
    """This process's registered stores (safe to call from a signal handler)."""
    pid = os.getpid()
    return [Path(path) for path, (owner, _) in list(_live.items()) if owner == pid]


def stop_registering() -> None:
    """A signal is ending the process: a store made from now on removes itself."""
    global _ending
    _ending = True
