"""What a store holds, for people and scripts: built from the store format's reader,
every name, size and structure checked (``store_checks``) before it is used.

A store that is not what spillcache writes (a structure naming a path outside it, an
array whose chunk does not match its metadata, a symbolic link) is *damaged*:
``summarize`` and ``verify`` list each problem, one line apiece, and ``load_value``
raises ``StoreCorruptError`` saying which batch and key.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from spillcache.errors import StoreError

from ..dtypes import RAW_DTYPES, dtype_name
from ..tree import unflatten
from . import store_checks, store_dirs, store_format, tensor_store
from .checkpoints import describe_store, store_text
from .leftovers import find_orphans
from .small_files import NotPlainFile, read_small_file

__all__ = [
    "load_value",
    "report_damage",
    "root_damage",
    "state_text",
    "summarize",
    "tensor_stats",
    "undetectable_rot",
    "verify",
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


def root_damage(path: str | Path) -> str | None:
    """What is wrong with the root ``zarr.json`` of a directory laid out as a store (it
    holds the store's ``tensors`` group) whose root cannot be read: missing, not a
    regular file, or not a JSON object (cut short, overwritten). None for a directory
    that is not laid out as a store, or whose root reads (then what the store format's
    reader says of it stands: not a spillcache store, or another format version)."""
    path = Path(path)
    if not (path / store_format.TENSORS).is_dir():
        return None
    root = path / "zarr.json"
    try:
        metadata = json.loads(read_small_file(root, 1 << 20))
    except FileNotFoundError:
        return f"{root} is missing: the store's root metadata (format version, state) is gone"
    except NotPlainFile as error:
        return f"{root} {error}"
    except OSError as error:
        return f"{root} cannot be read ({error.strerror or error})"
    except (ValueError, RecursionError) as error:  # cut short, or overwritten
        return f"{root} is not valid JSON ({error}): the store's root metadata is damaged"
    if not isinstance(metadata, dict):
        return f"{root} is not a JSON object: the store's root metadata is damaged"
    return None


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
    entries = store_checks.batch_entries(store, batch)
    if key not in entries:
        shown = sorted(entries)
        more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
        raise KeyError(f"batch {batch} has no key {key!r}; it has {shown[:20]}{more}")
    tensors: list[Any] = []

    def tensor_leaf(ref: store_checks.TensorRef) -> int | None:
        if ref.array is None:
            return None
        info = store_checks.read_array(store.path, ref.array)
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
    leftovers (``leftovers.find_orphans``).
    """
    store = tensor_store.Store.open(path)
    found = store_checks.survey(store, structures=True)
    bad = [
        {"array": name, "used_by": found.used.get(name, []), "error": error}
        for name, error in found.bad_arrays.items()
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
