"""What a store holds, for people and scripts, and what a cut-short run left in it:
built from the store format's reader, every name, size and structure checked
(``store_checks``) before it is used.

A store that is not what spillcache writes (a structure naming a path outside it, an
array whose chunk does not match its metadata, a symbolic link) is *damaged*:
``summarize`` and ``verify`` list each problem, one line apiece, and ``load_value``
raises ``StoreCorruptError`` saying which batch and key.

Leftovers ("orphans") of a store whose process is gone are not damage (no value reads
wrong because of them):

- ``.partial`` files: writes that never finished (every file is written under such a
  name and renamed into place);
- half-written arrays: directories under ``tensors/`` without their ``zarr.json`` (it
  is written last);
- in a complete store, whole arrays that no batch structure refers to.

While the store's process may still be writing (it is alive, or on another host, and
the store is not complete), these are writes in progress, not leftovers: ``verify``
says so and nothing removes them. In an incomplete kept store of a dead process, whole
arrays that no flushed batch refers to are reported (reopening drops them) but
``spillcache gc`` (``collect_garbage``, which also removes stores whose process is
dead) leaves them: they hold data, and their batch and key may still be read by hand.
Only paths found by listing the store's own directories are ever removed, never a name
read from a structure in it.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from spillcache.errors import StoreCorruptError, StoreError

from ..dtypes import RAW_DTYPES, dtype_name
from ..text import format_bytes
from ..tree import unflatten
from . import store_checks, store_dirs, store_format, tensor_store
from .checkpoints import describe_store, store_text
from .store_format import array_ref, tensors_dir

__all__ = [
    "collect_garbage",
    "find_orphans",
    "load_value",
    "report_damage",
    "state_text",
    "summarize",
    "tensor_stats",
    "undetectable_rot",
    "verify",
    "verify_lines",
]


def summarize(path: str | Path) -> dict[str, Any]:
    """A store's state, arrays, the keys its batch structures record (on close or
    flush() of a kept store), and its ``problems`` (one line each; none: sound).
    Raises StoreError if ``path`` is not a store this spillcache can read."""
    store = tensor_store.Store.open(path)
    attributes = store.attributes
    found = store_checks.survey(store, structures=True)
    keys: dict[str, dict[str, Any]] = {}
    for _, key, _, refs in found.entries:
        entry = keys.setdefault(key, {"batches": 0, "bytes": 0, "tensors": []})
        entry["batches"] += 1
        for ref in refs:
            info = found.arrays[ref.array]
            entry["bytes"] += info.nbytes
            if entry["batches"] == 1:
                entry["tensors"].append(
                    {"shape": list(info.shape), "dtype": dtype_name(info.dtype)}
                )
    recorded = found.batches if attributes.get("complete") or found.batches else None
    return {
        "path": str(store.path),
        "format_version": attributes.get("format_version"),
        "complete": attributes.get("complete") is True,
        "pid": attributes.get("pid"),
        "hostname": attributes.get("hostname"),
        "owner_alive": store_dirs.owner_alive(attributes),
        "written": attributes.get("written"),
        "torch_version": attributes.get("torch_version"),
        "batches": recorded,
        "arrays": len(found.arrays),
        "bytes": sum(info.nbytes for info in found.arrays.values()),
        "unchecksummed": sum(not info.checksum for info in found.arrays.values()),
        "keys": keys,
        "problems": found.all_problems(),
        "checkpoint": describe_store(store.path, attributes),
    }


def state_text(info: dict[str, Any], *, detailed: bool = True) -> str:
    """A store's state in words, the one wording every command uses. ``info`` holds
    ``complete`` and ``owner_alive``, and where known ``checkpoint`` (``describe_store``'s
    answer), ``problems`` and ``batches`` (how many its last flush recorded).
    ``detailed``: a sentence (``spillcache inspect`` of a store); else a table cell
    (``du``, ``inspect`` of a run)."""
    if not detailed:
        if problems := len(info.get("problems") or ()):
            return f"damaged ({problems} problem{'s' * (problems > 1)}: inspect the store)"
        if info.get("checkpoint"):
            return store_text(info["checkpoint"])
        if info["complete"]:
            return "complete"
        alive = info["owner_alive"]
        return {True: "open", False: "left by a crash", None: "open on another host?"}[alive]
    if info["complete"]:
        return "complete (kept when its cache closed)"
    flushed = ""
    if info["batches"] is not None:
        flushed = f"; its last flush() recorded {info['batches']} batches"
    if info["owner_alive"] is False:
        reopen = ", which IntermediatesCache.open(path) reopens" if flushed else ""
        gone = "left by a run that did not close (its process is gone)"
        return f"incomplete: {gone}{flushed}{reopen}"
    return f"incomplete: its cache is still open (or its process is on another host){flushed}"


def undetectable_rot(unchecked: int, arrays: int, what: str = "this store") -> str | None:
    """What a store (or value) with ``unchecked`` of its ``arrays`` carrying no CRC32C
    cannot promise, in words; None where every array carries one."""
    if not unchecked:
        return None
    some = "" if unchecked == arrays else f"{unchecked} of its {arrays} arrays "
    return (
        f"{what}: {some}written without checksums (checksum = false): bit rot in "
        f"{'them' if some else 'it'} cannot be detected, only missing or cut-short chunks"
    )


def report_damage(command: str, problems: list[str]) -> int:
    """Say each problem of a damaged store on one line of stderr; the exit status
    (1: damaged, 0: sound)."""
    for problem in problems:
        print(f"spillcache {command}: damaged: {problem}", file=sys.stderr)
    return 1 if problems else 0


def load_value(
    path: str | Path, batch: int, key: str, read: list[store_checks.ArrayInfo] | None = None
) -> Any:
    """One value of a kept store, rebuilt from its stored structure (tensors on the CPU;
    a tensor the store does not hold comes back as None). A damaged entry is a
    StoreCorruptError naming the batch and key. ``read``, if given, receives the
    metadata of every array read (whether each carries a checksum, say)."""
    store = tensor_store.Store.open(path)
    count = store_checks.recorded_batches(store)
    if not count and not store.attributes.get("complete"):
        raise store_format.StoreFormatError(
            f"{store.path} records no batch structures (its run did not close or flush() "
            "with keep_store); `spillcache inspect` lists its arrays"
        )
    if not 0 <= batch < count:
        raise IndexError(f"batch {batch} is out of range: the store has {count} batches")
    entries = store_checks.batch_structure(store, batch)[1]
    if key not in entries:
        shown = sorted(entries)
        more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
        raise KeyError(f"batch {batch} has no key {key!r}; it has {shown[:20]}{more}")
    tensors: list[Any] = []

    def tensor_leaf(ref: store_checks.TensorRef) -> int | None:
        if ref.array is None:
            return None
        info = store_checks.read_array(store.path, ref.array)
        problem = store_checks.leaf_problem(ref, info)
        if problem is not None:  # said as the entry's damage, like the others (parse_entry)
            raise StoreCorruptError(problem)
        tensors.append(_read(store, info))
        if read is not None:
            read.append(info)
        return len(tensors) - 1

    spec = store_checks.parse_entry(batch, key, entries[key], tensor_leaf)
    return unflatten(spec, tensors, [])


def _read(store: tensor_store.Store, info: store_checks.ArrayInfo) -> torch.Tensor:
    """A checked array's tensor; a size this machine cannot allocate is a StoreError."""
    try:
        return store.read_tensor(info.name, info.shape, info.dtype, checksum=info.checksum)
    except (RuntimeError, MemoryError):  # torch's allocation failure is a RuntimeError
        raise StoreError(
            f"array {store_format.array_ref(info.name)}: its {info.nbytes} bytes do not fit in "
            "memory here"
        ) from None


def tensor_stats(tensor: torch.Tensor) -> dict[str, Any]:
    """min, max, mean, std, and NaN/inf counts, computed in float64 ("of": values, the
    magnitudes of complex values, or the raw bits of types with no arithmetic)."""
    values, of = tensor.detach(), "values"
    if values.is_complex():
        values, of = values.abs(), "magnitudes"
    try:
        values = values.to(torch.float64)
    except (RuntimeError, NotImplementedError):  # bits*, int1..int7, float4: no casts
        values = values.view(RAW_DTYPES[values.dtype.itemsize]).to(torch.float64)
        of = "raw bits"
    values = values.reshape(-1)
    finite = values[torch.isfinite(values)]
    figures: dict[str, Any] = {
        "of": of,
        "count": values.numel(),
        "nan": int(torch.isnan(values).sum()),
        "inf": int(torch.isinf(values).sum()),
    }
    if finite.numel():
        figures.update(
            min=finite.min().item(),
            max=finite.max().item(),
            mean=finite.mean().item(),
            std=finite.std(unbiased=False).item(),
        )
    return figures


def verify(path: str | Path) -> dict[str, Any]:
    """Check a store: its structures and every array's metadata (``store_checks``),
    then every array's chunk, read whole (size, and CRC32C where it has one).

    Returns how many arrays were checked, how many carry a checksum, the bad ones
    (``{"array", "used_by", "error"}``, where ``used_by`` names the batches and keys that
    refer to the array, for stores that record structures), the ``problems`` that are
    not one array's (a structure naming a path outside the store, say), and its
    leftovers (``find_orphans``).
    """
    store = tensor_store.Store.open(path)
    found = store_checks.survey(store, structures=True)
    bad = [
        {"array": name, "used_by": found.used.get(name, []), "error": error}
        for name, error in found.bad_arrays.items()
        # One no batch uses, its zarr.json alone: an orphan below (open() takes it too).
        if found.used.get(name) or not store_format.deletion_cut_short(store.path, name)
    ]
    for name, info in found.arrays.items():
        try:
            _read(store, info)
        except StoreError as error:
            bad.append({"array": name, "used_by": found.used.get(name, []), "error": str(error)})
    return {
        "path": str(store.path),
        "arrays": len(found.arrays) + len(found.bad_arrays),
        "checksummed": sum(info.checksum for info in found.arrays.values()),
        # readable arrays written without a CRC32C: bit rot in them cannot be detected
        "unchecksummed": sum(not info.checksum for info in found.arrays.values()),
        "bad": sorted(bad, key=lambda item: item["array"]),
        "problems": found.problems,
        # Leftovers of writes cut short (not damage: no value reads wrong because of them).
        "orphans": find_orphans(store.path, store.attributes),
    }


# ------------------------------------------------------------------ leftovers


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
    store = tensor_store.Store(path)
    store.attributes = attributes
    names: set[str] = set()

    def named(ref: store_checks.TensorRef) -> None:
        if ref.array is not None:
            names.add(ref.array)

    try:
        for index in range(store_checks.recorded_batches(store)):
            entries = store_checks.batch_structure(store, index)[1]
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
    failed = []  # still there after rmtree: a link, or not this user's to delete
    for row in doomed:
        if remove:
            shutil.rmtree(row["path"], ignore_errors=True)
            if os.path.lexists(row["path"]):
                failed.append(row)
                yield f"could not remove {row['path']} (a link, or not this user's to delete)"
                continue
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
    doomed = [row for row in doomed if row not in failed]
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
