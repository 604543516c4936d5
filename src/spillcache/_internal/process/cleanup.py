"""Nothing left behind: a process's stores go when a signal ends it, and a new cache
removes the stores that dead processes left where it spills.

Signals. On SIGTERM and SIGHUP (what SLURM and Kubernetes send at a time limit or on
preemption, and a closed terminal) exit handlers do not run, so a store would stay on
disk. Where such a signal would end the process outright (its action is the default,
``SIG_DFL``), spillcache's handler removes every store of this process that is not kept
(the ``store_dirs`` registry), then puts the default action back and sends the signal
again: the process ends as the signal would have made it (killed by it: exit status
143 for SIGTERM). A signal the program handles itself is left to the program: an
ignored one stays ignored, and a Python handler it installed stays in place, because
the program may go on using its caches (if the handler ends the program by
``sys.exit`` or an exception, ``close()`` and the exit finalizers remove the stores on
the way out). SIGINT is the same: by default Python turns it into KeyboardInterrupt,
which a program may catch and go on; uncaught, the finalizers remove the stores as it
unwinds. Only where SIGINT's action is SIG_DFL does the handler act on it.

The handler runs on the main thread between two bytecodes, possibly while that thread
holds the pool's lock and while I/O threads write into the stores: it takes no lock,
and removes a tree again if a file appeared in it meanwhile.

Dead processes' stores. A cache removes, once per directory per process, the stores
under each of its ``disk_path`` directories (and in their run directories' rank
directories) that were not made to be kept and whose owner on this host is dead
(``store_dirs.owner_alive``), and logs one warning saying what it freed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from spillcache.config import CacheConfig

from ..store import store_dirs
from ..text import format_bytes

__all__ = ["SIGNALS", "install_signal_handlers", "on_new_cache", "sweep"]

log = logging.getLogger("spillcache")

SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
_REMOVE_ATTEMPTS = 20  # I/O threads may add a file to a tree once per attempt at most
_decided: set[int] = set()  # signals whose handler was installed, or left as it was

_swept: set[str] = set()  # directories already swept by this process (real paths)
_swept_lock = threading.Lock()


def on_new_cache(config: CacheConfig, disk_dirs: list[str]) -> None:
    """What a new cache with a disk tier does before its first spill: install the
    signal handlers, sweep its directories (as ``config`` says)."""
    if not disk_dirs:
        return
    if config.remove_stores_on_signal:
        install_signal_handlers()
    if config.remove_dead_stores:
        sweep(disk_dirs)


# ------------------------------------------------------------------------- signals


def install_signal_handlers() -> None:
    """Handle each of SIGNALS whose action is the default one; decided once per signal,
    and only on the main thread (elsewhere Python cannot install handlers: a later call
    from the main thread does it)."""
    if len(_decided) == len(SIGNALS) or threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        if signum in _decided:
            continue
        _decided.add(signum)
        try:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # not the main interpreter: leave it alone
            pass


def _on_signal(signum: int, frame: object) -> None:
    try:
        store_dirs.stop_registering()  # a store made from now on removes itself
        remove_own_stores()
    finally:  # whatever happened, the process ends as the signal says
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # not reached: the default action ended the process


def remove_own_stores() -> None:
    """Remove every registered store of this process, and the run and rank directories
    under its disk_path that leaves empty. Takes no lock (see the module docstring)."""
    for _ in range(3):  # stores registered while the last ones were being removed
        paths = store_dirs.registered()
        if not paths:
            return
        for path in paths:
            root = store_dirs.root_of(path)  # its disk_path: neither it nor above is ours
            remove_tree(path)
            store_dirs.unregister(path)
            store_dirs.remove_empty_dirs(path.parent, root)


def remove_tree(path: Path) -> bool:
    """Remove ``path`` and everything in it, again if a writer added a file while it
    was going (rmdir then fails: the directory is not empty); True once it is gone."""
    for _ in range(_REMOVE_ATTEMPTS):
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path):
            return True
    return False


# ---------------------------------------------------------------- dead owners' stores


def sweep(disk_dirs: Iterable[str]) -> list[tuple[Path, int]]:
    """Remove the stores a dead process left under ``disk_dirs`` (each directory once per
    process), and the rank and run directories that leaves empty; log one warning if
    anything went. Returns (store, bytes) of each store removed."""
    with _swept_lock:
        todo = [d for d in disk_dirs if os.path.realpath(d) not in _swept]
        _swept.update(os.path.realpath(d) for d in todo)
    freed: list[tuple[Path, int]] = []
    where: list[str] = []
    for disk_dir in todo:
        found = [(p, n) for parent in _store_parents(Path(disk_dir)) for p, n in _sweep_one(parent)]
        for parent in {path.parent for path, _ in found} - {Path(disk_dir)}:
            store_dirs.remove_empty_dirs(parent, disk_dir)
        freed += found
        where += [disk_dir] if found else []
    if freed:
        total = format_bytes(sum(nbytes for _, nbytes in freed))
        stores = f"{len(freed)} store{'s' if len(freed) != 1 else ''}"
        log.warning(
            "spillcache removed %s (%s) left by dead processes under %s "
            "(remove_dead_stores = false leaves them for `spillcache gc`)",
            stores, total, ", ".join(where),
        )  # fmt: skip
    return freed


def _store_parents(disk_dir: Path) -> Iterator[Path]:
    """Where stores may be under a disk directory: itself, and every rank directory of
    the run directories in it."""
    yield disk_dir
    try:
        runs = store_dirs.find_runs(disk_dir)
    except OSError:  # made on first spill (nothing there yet), or not ours to read
        return
    for ranks in runs.values():
        yield from ranks.values()


def _sweep_one(parent: Path) -> Iterator[tuple[Path, int]]:
    """Remove the abandoned stores directly in ``parent``. ``find_stores`` skips what is
    not a store, one being made, and another user's private store (in a shared temp
    directory it is unreadable): none of them stops the sweep or the cache being built."""
    try:
        stores = store_dirs.find_stores(parent)
    except OSError:  # gone (made on first spill), or not ours to list
        return
    for path, attributes in stores.items():
        if not abandoned(attributes):
            continue
        try:
            nbytes = store_dirs.store_bytes(path)
            if remove_tree(path):
                yield path, nbytes
        except OSError:  # removed by its owner or another sweep meanwhile
            continue


def abandoned(attributes: dict) -> bool:
    """A store nobody will use again: not made to be kept (stores written before the
    ``keep`` attribute existed are left to ``spillcache gc``), and its owner is dead."""
    return (
        attributes.get("keep") is False
        and not attributes.get("complete")
        and store_dirs.owner_alive(attributes) is False
    )
