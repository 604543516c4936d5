"""What a crashed run leaves inside a store, and `spillcache gc`'s removal of stores and
leftovers whose process is dead.

Leftovers ("orphans") of a store whose process is gone:

- ``.partial`` files: writes that never finished (every file is written under such a
  name and renamed into place);
- half-written arrays: directories under ``tensors/`` without their ``zarr.json`` (it
  is written last);
- in a complete store, whole arrays that no batch structure refers to.

While the store's process may still be writing (it is alive, or on another host, and
the store is not complete), these are writes in progress, not leftovers: ``verify``
says so and nothing removes them. In an incomplete kept store of a dead process, whole
arrays that no flushed batch refers to are reported (reopening drops them) but ``gc``
leaves them: they hold data, and their batch and key may still be read by hand. Only
paths found by listing the store's own directories are ever removed, never a name read
from a structure in it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from spillcache.errors import StoreError

from ..text import format_bytes
from . import store_checks, store_dirs, store_format
from .checkpoints import store_text
from .store_format import array_ref, tensors_dir
from .tensor_store import Store

__all__ = ["collect_garbage", "find_orphans", "verify_lines"]


def find_orphans(path: str | os.PathLike[str], attributes: dict) -> dict[str, Any]:
    """A store's leftovers: ``partial`` files and ``unfinished`` arrays (paths relative
    to the store), ``unreferenced`` arrays (names), their ``bytes``, and whether they
    are ``in_progress`` (the store's process may still be writing) rather than left."""
    path = Path(path)
    partial = sorted(str(p.relative_to(path)) for p in _partial_files(path))
    # Real directories only: a link in a store (tampered) leads outside it.
    arrays = [d for d in sorted(tensors_dir(path).glob("*")) if d.is_dir() and not d.is_symlink()]
    unfinished = [array_ref(d.name) for d in arrays if not (d / "zarr.json").is_file()]
    unreferenced: list[str] = []
    if attributes.get("complete") or attributes.get("keep"):  # it records structures
        referenced = _referenced_arrays(path, attributes)
        if referenced is not None:
            whole = [d.name for d in arrays if array_ref(d.name) not in unfinished]
            unreferenced = [name for name in whole if name not in referenced]
    alive = store_dirs.owner_alive(attributes)
    in_progress = not attributes.get("complete") and alive is not False
    files = [path / p for p in partial] + [path / p for p in unfinished]
    files += [tensors_dir(path) / name for name in unreferenced]
    return {
        "partial": partial,
        "unfinished": unfinished,
        "unreferenced": unreferenced,
        "bytes": _bytes(_outermost(files)),
        "in_progress": in_progress,
    }


def _outermost(paths: list[Path]) -> list[Path]:
    """``paths`` less those inside another of them (a .partial file in a half-written
    array goes with the array)."""
    listed = set(paths)
    return [p for p in paths if not any(parent in listed for parent in p.parents)]


def _bytes(paths: list[Path]) -> int:
    return sum(store_dirs.store_bytes(p) if p.is_dir() else _size(p) for p in paths)


def _partial_files(path: Path) -> Iterator[Path]:
    """The ``.partial`` files in a store: regular files, found without following links."""
    for root, _, names in os.walk(path):  # followlinks=False
        for name in names:
            found = Path(root, name)
            if name.endswith(".partial") and found.is_file() and not found.is_symlink():
                yield found


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def _referenced_arrays(path: Path, attributes: dict) -> set[str] | None:
    """Names of the arrays the store's batch structures refer to, as the last completed
    flush left them (read as reopening reads them: ``store_checks``); None if one of
    them cannot be read (then no array is called unreferenced)."""
    store = Store(path)
    store.attributes = attributes
    names: set[str] = set()

    def named(ref: store_checks.TensorRef) -> None:
        if ref.array is not None:
            names.add(ref.array)

    try:
        for index in range(store_checks.recorded_batches(store)):
            entries = store_checks.batch_entries(store, index)
            for key, node in entries.items():
                store_checks.parse_entry(index, key, node, named)
    except StoreError:  # damaged or tampered: StoreCorruptError, or unreadable
        return None
    return names


def _removable(path: Path, orphans: dict, complete: bool) -> list[Path]:
    """What ``gc`` removes from a dead process's store it keeps (see the module docstring)."""
    found = [path / p for p in orphans["partial"] + orphans["unfinished"]]
    return found + ([tensors_dir(path) / n for n in orphans["unreferenced"]] if complete else [])


def verify_lines(orphans: dict) -> list[str]:
    """`spillcache verify`'s lines about a store's leftovers (none if it has none)."""
    named = [(p, "a write that never finished") for p in orphans["partial"]]
    named += [(p, "half-written: no zarr.json") for p in orphans["unfinished"]]
    named += [(f"array {n}", "no batch refers to it") for n in orphans["unreferenced"]]
    if not named:
        return []
    size = format_bytes(orphans["bytes"])
    if orphans["in_progress"]:
        writes = f"{len(named)} unfinished write{'s' if len(named) != 1 else ''}"
        return [f"in progress: {writes} ({size}); the store's process may still be writing"]
    lines = [f"ORPHAN {where} ({why})" for where, why in named]
    lines.append(
        f"{len(named)} orphans ({size}): not damage; `spillcache gc --yes` removes them "
        "once the store's process has exited"
    )
    return lines


def collect_garbage(
    rows: list[dict], runs: dict[Path, dict[int, Path]], *, remove: bool, everything: bool
) -> Iterator[str]:
    """`spillcache gc` over stores found by the CLI's survey (``rows``: path, bytes,
    pid, alive, complete) and their ``runs``: remove (or with ``remove`` False, only
    name) every store whose process is dead, except those made to be kept (unless
    ``everything``), the leftovers in those, and the rank and run directories left
    empty. Yields the lines to print."""
    verb = "removed" if remove else "would remove"
    # A calibration's checkpoint is never garbage: its rerun resumes from it (and a rank
    # of a torchrun job may need the arrays its last flush no longer names).
    for row in rows:
        if row.get("checkpoint"):
            found = row["checkpoint"]
            yield (
                f"kept {row['path']} ({format_bytes(row['bytes'])}): a calibration's "
                f"{store_text(found)}; the same script with checkpoint_dir "
                f"{found['checkpoint_dir']} resumes it, removing that directory drops it"
            )
    rows = [row for row in rows if not row.get("checkpoint")]
    dead = [row for row in rows if row["alive"] is False]
    attributes = {row["path"]: _attributes(row["path"]) for row in dead}
    kept = {path for path, found in attributes.items() if _kept(found)}
    doomed = [row for row in dead if everything or row["path"] not in kept]
    for row in doomed:
        if remove:
            shutil.rmtree(row["path"], ignore_errors=True)
        yield f"{verb} {row['path']} ({format_bytes(row['bytes'])}, pid {row['pid']} is dead)"
    orphans = 0
    orphan_bytes = 0
    for row in dead:
        if row in doomed:
            continue
        path, found = Path(row["path"]), attributes[row["path"]]
        leftovers = find_orphans(path, found)
        files = _outermost(_removable(path, leftovers, bool(found.get("complete"))))
        if not files:
            continue
        nbytes = _bytes(files)
        if remove:
            _remove_all(files)
        orphans, orphan_bytes = orphans + len(files), orphan_bytes + nbytes
        yield (
            f"{verb} {len(files)} orphan files ({format_bytes(nbytes)}) from {path} "
            f"(pid {row['pid']} is dead)"
        )
    emptied = yield from _empty_directories(runs, {row["path"] for row in doomed}, remove, verb)
    freed = format_bytes(sum(row["bytes"] for row in doomed))
    plural = "directory" if len(emptied) == 1 else "directories"
    directories = f" and {len(emptied)} empty {plural}" if emptied else ""
    extra = f"; {orphans} orphan files, {format_bytes(orphan_bytes)}" if orphans else ""
    yield f"{verb} {len(doomed)} of {len(rows)} stores, {freed}{directories}{extra}"
    if (doomed or emptied or orphans) and not remove:
        yield "dry run: pass --yes to delete them"


def _empty_directories(
    runs: dict[Path, dict[int, Path]], gone: set[str], remove: bool, verb: str
) -> Iterator[str]:
    """The rank directories left empty, and a run directory with none left (rmdir only:
    a directory holding anything, such as a live rank's store, stays); returns them."""
    emptied: list[Path] = []
    for run_dir, ranks in runs.items():
        for rank_dir in ranks.values():
            if remove:
                emptied += store_dirs.remove_empty_dirs(rank_dir, stop=run_dir.parent)
            elif all(str(entry) in gone for entry in rank_dir.iterdir()):
                emptied.append(rank_dir)
        if not remove and all(rank_dir in emptied for rank_dir in ranks.values()):
            emptied.append(run_dir)
    for directory in emptied:
        yield f"{verb} empty directory {directory}"
    return emptied


def _kept(attributes: dict) -> bool:
    """Made to be kept: complete (closed with keep_store), or by a keep_store run that died."""
    return bool(attributes.get("keep") or attributes.get("complete"))


def _attributes(path: str) -> dict:
    try:
        return store_format.read_root_attributes(path)
    except OSError:  # StoreError included
        return {}


def _remove_all(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
