"""The process that owns a store: who it is, whether it still runs, and which stores
this process owns that nobody keeps.

A store records its owner's pid and hostname, and with them what tells that process
apart from a later one given the same pid: its start time (``/proc/<pid>/stat`` field
22, clock ticks since boot), the boot it started in (``/proc/sys/kernel/random/boot_id``)
and its pid namespace (a container's pids mean nothing outside it). ``alive`` reads
them back: a zombie, a pid now held by another process, or a store from an earlier boot
has a dead owner. Where a store cannot be judged from here (another host or container),
its owner is unknown, never dead: nothing removes it.

The registry is what a signal handler removes (``cleanup``). A handler runs between
two bytecodes of the main thread, possibly while that thread is inside ``register``:
so the registry takes no lock; each change is one dict operation, atomic under the GIL.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from spillcache.errors import StoreError

__all__ = ["alive", "identity", "register", "registered", "stop_registering", "unregister"]

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

# str(path) -> pid of the process that made it (a forked child inherits the dict but
# owns none of those stores).
_live: dict[str, int] = {}
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


def identity() -> dict:
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


def alive(attributes: dict) -> bool | None:
    """Whether the process that wrote a store's root ``attributes`` still runs: None
    when that cannot be known from here (another host, another pid namespace)."""
    pid = attributes.get("pid")
    if attributes.get("hostname") != socket.gethostname() or type(pid) is not int:
        return None
    mine = identity()
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


def register(path: Path) -> None:
    """A store that is not kept was made at ``path``: a signal removes it. Raises
    StoreError if a signal is ending the process (the maker removes what it made)."""
    _live[str(path)] = os.getpid()
    if _ending:
        raise StoreError(f"not creating {path}: a signal is ending this process")


def unregister(path: Path) -> None:
    _live.pop(str(path), None)


def registered() -> list[Path]:
    """This process's registered stores (safe to call from a signal handler)."""
    pid = os.getpid()
    return [Path(path) for path, owner in list(_live.items()) if owner == pid]


def stop_registering() -> None:
    """A signal is ending the process: a store made from now on removes itself."""
    global _ending
    _ending = True
