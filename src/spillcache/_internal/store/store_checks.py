"""Reading a store as data: never a path to follow, an allocation to trust or a program.

A store on disk is input like any other file: a batch structure may name an array
``tensors/../../etc``, an array's metadata may claim 10^12 elements, a chunk may be a
symbolic link to a file elsewhere. Everything read from a store passes through here
before it is followed, allocated or built:

- an array reference must be a name the writer makes and can go on from (``tensors/17``,
  ``tensors/17.2``, ``tensors/i3``), so it resolves inside ``<store>/tensors``;
- nothing where the format expects a file or directory may be a symbolic link;
- an array's metadata must be what ``store_format.array_metadata`` writes for its shape and
  torch dtype, and its chunk file must hold exactly that many bytes: checked with a
  stat, before any buffer is allocated;
- a batch's structure must be JSON of the grammar in docs/format.md (``tree``).

Each failure is a ``StoreCorruptError`` whose message names the batch and key (or the
array, or the file) and says what is wrong, in one line.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spillcache.errors import StoreCorruptError, StoreError

from .. import dtypes
from ..tree import StructureError, spec_from_json
from . import store_format, tensor_store
from .store_format import BATCHES, PARTIAL_NAME, STORED_NAME, TENSORS, batch_dir, tensors_dir

__all__ = [
    "ArrayInfo",
    "Survey",
    "TensorRef",
    "array_name",
    "batch_structure",
    "committed_flush",
    "entry_where",
    "leaf_problem",
    "parse_entry",
    "read_array",
    "recorded_batches",
    "survey",
    "tensor_dirs",
]

_ARRAY_METADATA_BYTES = 1 << 20  # an array's zarr.json is a few hundred bytes
_STRUCTURE_BYTES = 1 << 30  # a batch's structures: large, but never a whole disk
_MAX_DIMS = 64  # torch's own limit
# The metadata fields that say how to read the chunk: all must be what the writer writes.
_LAYOUT = ("zarr_format", "node_type", "shape", "data_type", "chunk_grid",
           "chunk_key_encoding", "codecs")  # fmt: skip


def _shown(value: Any, limit: int = 60) -> str:
    """A stored value in a message: its repr, cut short (a store may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def entry_where(batch: int, key: str) -> str:
    """'batch 3, key 'h'': how messages name an entry."""
    return f"batch {batch}, key {_shown(key)}"


def _corrupt(where: str, problem: str) -> StoreCorruptError:
    return StoreCorruptError(f"{where}: {problem}")


# ---------------------------------------------------------------------- files


def _check_dir(root: Path, directory: Path, where: str) -> None:
    """``directory`` (under ``root``) and every directory between them are real
    directories: a symbolic link there could lead anywhere on the machine."""
    path = root
    for part in directory.relative_to(root).parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            raise _corrupt(where, f"{_relative(root, path)} is missing") from None
        except OSError as error:
            raise _unreadable(error, where, path) from None
        if stat.S_ISLNK(mode):
            raise _corrupt(where, f"{_relative(root, path)} is a symbolic link; a store holds none")
        if not stat.S_ISDIR(mode):
            raise _corrupt(where, f"{_relative(root, path)} is not a directory")


def _unreadable(error: OSError, where: str, path: Path) -> StoreError:
    return StoreError(error.errno, f"{where}: cannot read {path}: {error.strerror}")


def _relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _read_json(root: Path, path: Path, limit: int, where: str) -> Any:
    """The JSON in a regular file of the store (``store_format.read_small_file``)."""
    name = _relative(root, path)
    try:
        text = store_format.read_small_file(path, limit)
    except FileNotFoundError:
        raise _corrupt(where, f"{name} is missing") from None
    except store_format.NotPlainFile as error:
        raise _corrupt(where, f"{name} {error}") from None
    except OSError as error:
        raise _unreadable(error, where, path) from None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise _corrupt(where, f"{name} is not valid JSON") from None


def _chunk_size(root: Path, path: Path, where: str) -> int:
    name = _relative(root, path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise _corrupt(where, f"its chunk file {name} is missing") from None
    if stat.S_ISLNK(info.st_mode):
        raise _corrupt(where, f"its chunk file {name} is a symbolic link; a store holds none")
    if not stat.S_ISREG(info.st_mode):
        raise _corrupt(where, f"its chunk file {name} is not a regular file")
    return info.st_size


# --------------------------------------------------------------------- arrays


@dataclass(frozen=True)
class ArrayInfo:
    """An array's checked metadata: what its chunk holds, and where it came from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    checksum: bool
    batch: int | None = None  # the batch and key it was stored under (None: not recorded)
    key: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def owner(self) -> str:
        if self.batch is None or self.key is None:
            return f"array tensors/{self.name} (batch and key not recorded)"
        return entry_where(self.batch, self.key)


def read_array(root: str | os.PathLike[str], name: str) -> ArrayInfo:
    """The checked metadata of array ``tensors/<name>`` of the store at ``root``, its
    chunk file's size included (StoreCorruptError otherwise)."""
    root = Path(root)
    if not STORED_NAME.fullmatch(name):
        raise _corrupt(f"array tensors/{_shown(name)}", "not an array name spillcache writes")
    where = f"array tensors/{name}"
    directory = tensors_dir(root) / name
    _check_dir(root, directory, where)
    metadata = _read_json(root, directory / "zarr.json", _ARRAY_METADATA_BYTES, where)
    info = _array_fields(name, metadata, where)
    if info.nbytes:
        size = _chunk_size(root, directory / store_format.chunk_name(len(info.shape)), where)
        expected = store_format.chunk_bytes(info.nbytes, info.checksum)
        if size != expected:
            raise _corrupt(
                where,
                f"its chunk file holds {size} bytes, but its metadata says "
                f"{tuple(info.shape)} {dtypes.dtype_name(info.dtype)}"
                f"{' with a CRC32C' if info.checksum else ''}: {expected} bytes",
            )
    return info


def _array_fields(name: str, metadata: Any, where: str) -> ArrayInfo:
    if not isinstance(metadata, dict):
        raise _corrupt(where, "its zarr.json is not a JSON object")
    attributes = metadata.get("attributes")
    own = attributes.get(store_format.ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(own, dict):
        raise _corrupt(where, "its zarr.json has no spillcache attributes")
    dtype = _stored_dtype(own.get("torch_dtype"), where)
    shape = metadata.get("shape")
    if (
        type(shape) is not list
        or len(shape) > _MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise _corrupt(where, f"its shape {_shown(shape)} is not a list of sizes")
    try:  # no chunk bounds an empty array's sizes: past int64, torch fails deep inside
        torch.empty(shape, device="meta")  # allocates nothing
    except (RuntimeError, TypeError, OverflowError):
        raise _corrupt(where, f"its shape {_shown(shape)} is more than torch can hold") from None
    for checksum in (False, True):
        expected = store_format.array_metadata(tuple(shape), dtype, checksum)
        if all(metadata.get(key) == expected[key] for key in _LAYOUT):
            batch, key = own.get("batch"), own.get("key")
            batch, key = batch if type(batch) is int else None, key if type(key) is str else None
            return ArrayInfo(name, tuple(shape), dtype, checksum, batch, key)
    expected = store_format.array_metadata(tuple(shape), dtype)
    differs = next(key for key in _LAYOUT if metadata.get(key) != expected[key])
    raise _corrupt(
        where,
        f"its {differs} {_shown(metadata.get(differs))} is not what spillcache writes for "
        f"a {tuple(shape)} {dtypes.dtype_name(dtype)} array",
    )


def _stored_dtype(name: Any, where: str) -> torch.dtype:
    if type(name) is str:
        try:
            dtype = dtypes.dtype_from_name(name)
        except ValueError:
            pass
        else:
            if dtypes.is_storable(dtype):
                return dtype
    raise _corrupt(where, f"its torch_dtype {_shown(name)} is not a dtype spillcache stores")


def array_name(reference: Any, names: re.Pattern = store_format.ARRAY_NAME) -> str:
    """The array a structure names (``"tensors/<name>"``) if it is one of ``names`` (a
    reader's are fewer than the writer's); StructureError otherwise (``../../etc``)."""
    if type(reference) is str and reference.startswith(store_format.ARRAY_PREFIX):
        name = reference[len(store_format.ARRAY_PREFIX) :]
        if names.fullmatch(name):
            return name
    raise StructureError(
        f"it names array {_shown(reference)}, which is not one spillcache writes "
        "(tensors/<n>, tensors/<n>.<m> or tensors/i<n>, inside the store; a stored n < 10**17)"
    )


def tensor_dirs(root: str | os.PathLike[str]) -> dict[str, str]:
    """What ``<root>/tensors`` holds, by entry name: ``"array"`` (a directory with its
    zarr.json, not yet checked), ``"incomplete"`` (a directory without one: a write a
    crash interrupted), ``"partial"`` (a file a crash left), or what a store never
    holds: ``"link"``, ``"file"``, ``"bad name"``. The group's own zarr.json is left out."""
    root = Path(root)
    _check_dir(root, tensors_dir(root), TENSORS)
    found = {}
    with os.scandir(tensors_dir(root)) as entries:
        for entry in entries:
            if entry.name == "zarr.json":
                continue
            if entry.is_symlink():
                found[entry.name] = "link"
            elif PARTIAL_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                found[entry.name] = "partial"
            elif not entry.is_dir(follow_symlinks=False):
                found[entry.name] = "file"
            elif not STORED_NAME.fullmatch(entry.name):
                found[entry.name] = "bad name"
            elif os.path.lexists(os.path.join(entry.path, "zarr.json")):
                found[entry.name] = "array"
            else:
                found[entry.name] = "incomplete"
    return dict(sorted(found.items()))


# ----------------------------------------------------------------- structures


@dataclass(frozen=True)
class TensorRef:
    """A tensor node of a stored structure, checked."""

    array: str | None  # the array's name (under tensors/); None: not stored
    device: torch.device  # where it was onloaded
    requires_grad: bool


def _tensor_ref(node: dict) -> TensorRef:
    reference = node.get("array")
    name = None if reference is None else array_name(reference, STORED_NAME)
    device_name = node.get("device", "cpu")
    requires_grad = node.get("requires_grad", False)
    if type(device_name) is not str:
        raise StructureError(f"its tensor's device {_shown(device_name)} is not a str")
    try:
        device = torch.device(device_name)
    except (RuntimeError, ValueError):
        raise StructureError(f"its tensor's device {_shown(device_name)} is no device") from None
    if type(requires_grad) is not bool:
        raise StructureError(f"its tensor's requires_grad {_shown(requires_grad)} is not a bool")
    return TensorRef(name, device, requires_grad)


def leaf_problem(ref: TensorRef, info: ArrayInfo) -> str | None:
    """What is wrong with a tensor node given its array (None: nothing): torch lets only
    floating-point and complex tensors require grad, and fails each fetch of another."""
    if ref.requires_grad and not (info.dtype.is_floating_point or info.dtype.is_complex):
        name = dtypes.dtype_name(info.dtype)
        return f"its {name} tensor requires grad, which only floating-point and complex ones can"
    return None


def recorded_batches(store: tensor_store.Store) -> int:
    """How many batches the store records (its root's ``num_batches``), checked against
    its batch directories: a forged count is no endless loop, and a rotten one drops no
    batch (one past the count is a crashed store's, of a flush that did not finish)."""
    count, where = store.attributes.get("num_batches", 0), "root zarr.json"
    if type(count) is not int or count < 0:
        raise _corrupt(where, f"num_batches {_shown(count)} is not a count")
    # Checked even with no batch recorded: a crashed store's batches/ is tidied
    # (reopen._stray_files), and a link there would lead outside the store.
    _check_dir(store.path, batch_dir(store.path), BATCHES)
    with os.scandir(batch_dir(store.path)) as entries:
        present = [int(e.name) for e in entries if store_format.BATCH_NAME.fullmatch(e.name)]
    if count > len(present):
        raise _corrupt(where, f"it records {count} batches, but batches/ holds {len(present)}")
    complete = store.attributes.get("complete") is True
    for index in sorted(index for index in present if index >= count):
        try:  # batches are only added: one that a completed flush wrote is counted
            flush = 0 if complete else batch_structure(store, index)[0]
        except StoreCorruptError:
            continue  # unreadable, or only an unfinished flush's: a crash's leftover
        if complete or 0 < flush <= committed_flush(store):
            by = "this complete store" if complete else f"flush {flush}, which completed,"
            raise _corrupt(where, f"num_batches is {count}, but {by} wrote batches/{index}")
    return count


def committed_flush(store: tensor_store.Store) -> int:
    """The number of the last flush (or close) whose structures were all written, as
    the root records it (0 for stores written before flushes were counted)."""
    flush = store.attributes.get("flush", 0)
    if type(flush) is not int or flush < 0:
        raise _corrupt("root zarr.json", f"flush {_shown(flush)} is not a count")
    return flush


def batch_structure(
    store: tensor_store.Store, index: int, as_of: int | None = None
) -> tuple[int, dict[str, Any]]:
    """Batch ``index``'s entries as the last completed flush (or flush ``as_of``)
    recorded them (key -> structure JSON, not yet parsed), with that flush's number: a
    batch a later, unfinished flush rewrote gives the structure it kept as ``before``."""
    where = f"batch {index}"
    name = f"batches/{index}/zarr.json"
    directory = batch_dir(store.path, index)
    _check_dir(store.path, directory, where)
    group = _read_json(store.path, directory / "zarr.json", _STRUCTURE_BYTES, where)
    attributes = group.get("attributes") if isinstance(group, dict) else None
    own = attributes.get(store_format.ATTRS_KEY) if isinstance(attributes, dict) else None
    if not isinstance(own, dict):
        raise _corrupt(where, f"{name} records no entries")
    committed = committed_flush(store) if as_of is None else as_of
    flush = own.get("flush", 0)
    if type(flush) is not int or flush < 0:
        raise _corrupt(where, f"{name}: flush {_shown(flush)} is not a count")
    if flush > committed:  # written by a flush that did not complete
        own = own.get("before")
        flush = own.get("flush") if isinstance(own, dict) else None
        if type(flush) is not int or not 0 <= flush <= committed:
            raise _corrupt(
                where, f"{name} was written by an unfinished flush and keeps no earlier structure"
            )
    entries = own.get("entries")
    if not isinstance(entries, dict):
        raise _corrupt(where, f"{name} records no entries")
    return flush, entries


def parse_entry(
    batch: int, key: str, node: Any, tensor_leaf: Callable[[TensorRef], int | None]
) -> tuple:
    """An entry's spec (``tree.spec_from_json``), every node and tensor reference
    checked; ``tensor_leaf`` gets each tensor's ``TensorRef`` in leaf order."""
    try:
        return spec_from_json(node, lambda tensor: tensor_leaf(_tensor_ref(tensor)))
    except (StructureError, StoreCorruptError) as error:
        raise _corrupt(entry_where(batch, key), str(error)) from None
    except RecursionError:
        raise _corrupt(entry_where(batch, key), "its structure is nested too deeply") from None


# --------------------------------------------------------------------- survey


@dataclass
class Survey:
    """A whole store, checked: its recorded entries, the arrays they use, what else
    ``tensors/`` holds, and every problem found (one line each)."""

    batches: int = 0
    kinds: dict[str, str] = field(default_factory=dict)  # what tensors/ holds (tensor_dirs)
    flush: int = 0  # the last completed flush (committed_flush)
    structures: list[tuple[int, dict]] = field(default_factory=list)  # per batch, as read
    # (batch, key, spec, refs): refs[i] is tensor leaf i of spec (stored tensors only)
    entries: list[tuple[int, str, tuple, list[TensorRef]]] = field(default_factory=list)
    arrays: dict[str, ArrayInfo] = field(default_factory=dict)  # every sound array
    used: dict[str, list[str]] = field(default_factory=dict)  # array -> entries using it
    unused: dict[str, str] = field(default_factory=dict)  # name -> kind (tensor_dirs)
    bad_arrays: dict[str, str] = field(default_factory=dict)  # entry of tensors/ -> problem
    problems: list[str] = field(default_factory=list)  # the rest: structures, the root

    def all_problems(self) -> list[str]:
        """Every problem, one line each; a bad array with the entries that use it."""
        lines = list(self.problems)
        for name, problem in self.bad_arrays.items():
            users = self.used.get(name, [])
            more = f" (and {len(users) - 1} more)" if len(users) > 1 else ""
            lines.append(f"{users[0]}{more}: {problem}" if users else problem)
        return lines


def survey(store: tensor_store.Store, *, structures: bool, as_of: int | None = None) -> Survey:
    """Check every array of ``store`` and (with ``structures``) every batch structure
    it records (as of flush ``as_of``, else its last); problems are collected, not
    raised, so that all of them are said."""
    found = Survey()
    try:
        kinds = tensor_dirs(store.path)
    except StoreCorruptError as error:
        found.problems.append(str(error))
        kinds = {}
    found.kinds = kinds
    bad = found.bad_arrays
    for name, kind in kinds.items():
        if kind == "array":
            try:
                found.arrays[name] = read_array(store.path, name)
            except StoreCorruptError as error:
                bad[name] = str(error)
        elif kind in _NEVER_IN_TENSORS:
            bad[name] = f"tensors/{_shown(name)} is {_NEVER_IN_TENSORS[kind]}; a store holds none"
    if structures:
        _survey_structures(store, found, kinds, as_of)
    return found


_NEVER_IN_TENSORS = {
    "link": "a symbolic link",
    "file": "a file where arrays are",
    "bad name": "a directory not named as arrays are",
}


def _survey_structures(
    store: tensor_store.Store, found: Survey, kinds: dict[str, str], as_of: int | None
) -> None:
    try:
        found.batches = recorded_batches(store)
        found.flush = committed_flush(store) if as_of is None else as_of
    except StoreCorruptError as error:
        found.problems.append(str(error))
        return
    for index in range(found.batches):
        try:
            flush, entries = batch_structure(store, index, as_of)
        except StoreCorruptError as error:
            found.problems.append(str(error))
            continue
        found.structures.append((flush, entries))
        for key, node in entries.items():
            refs: list[TensorRef] = []

            def leaf(ref: TensorRef, refs: list[TensorRef] = refs) -> int | None:
                if ref.array is None:  # not stored (kept in RAM by its run): None
                    return None
                refs.append(ref)
                return len(refs) - 1

            try:
                spec = parse_entry(index, key, node, leaf)
            except StoreCorruptError as error:
                found.problems.append(str(error))
                continue
            where = entry_where(index, key)
            sound = True
            for ref in refs:
                found.used.setdefault(ref.array, []).append(where)
                info = found.arrays.get(ref.array)
                problem = leaf_problem(ref, info) if info is not None else None
                if problem is not None:
                    sound = False
                    found.problems.append(f"{where}: {problem}")
                elif info is None:
                    sound = False
                    if ref.array not in found.bad_arrays:  # said once, with its users
                        state = "missing" if ref.array not in kinds else "incomplete"
                        found.problems.append(f"{where}: its array tensors/{ref.array} is {state}")
            if sound:
                found.entries.append((index, key, spec, refs))
    found.unused = {name: kind for name, kind in kinds.items() if name not in found.used}
