"""A calibration's checkpoint directory: what a killed ``oneshot`` needs to go on from
the last subgraph it finished, and the check that it is the same run.

The directory holds

- ``activations/``: the sequential pipeline's cache, a kept spillcache store. After each
  subgraph it holds the next subgraph's inputs; its ``flush()`` makes them durable.
- ``states/NNNN.pt``: the model's tensors that subgraph NNNN changed (weights,
  quantization parameters, observers' buffers, by their ``state_dict`` names), each
  file written and fsync'd whole before anything names it. A rerun loads them into the
  model (``load_states``) only once every file is whole and every tensor fits the
  model's own.

Under torchrun each rank has its own part: its store where spillcache puts a rank's
stores (``activations/<run>/rank<R>/``, the run's name changing from launch to launch)
and its state files in ``states/rank<R>/`` (``Part``).

**The commit is the activation store's flush.** The note a flush writes into the
store's root (``zarr.json``, replaced atomically and fsync'd last) says how many
subgraphs are done, which state files hold what they changed (with their sizes and
CRC-32Cs) and the run's fingerprint. Killed before that root is written, the store
opens as of the flush before, whose note names the state files before: a checkpoint
is never seen in part. State files no note names (a checkpoint cut short) are removed
when the run resumes.

Nothing here imports llm-compressor: ``resumable_pipeline.py`` drives it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import google_crc32c
import numpy
import torch

from spillcache.errors import CheckpointError

from ..dtypes import byte_view, dtype_from_name, dtype_name, raw_dtype
from ..io import chunkio
from ..io.chunk_reads import crc32c_extend
from ..text import format_bytes
from .store_dirs import RANK_PREFIX, find_stores, owner_alive, rank_dirs, remove_empty_dirs

__all__ = [
    "NOTE_KEY", "Part", "describe_difference", "Checkpoint", "TensorCRCs", "check_states",
    "committed", "describe_store", "digest_tensors", "fingerprint", "iter_states",
    "load_states", "named_tensors", "remove_uncommitted_stores", "remove_unnamed_states",
    "save_states", "store_text",
]  # fmt: skip

NOTE_KEY = "checkpoint"
FORMAT = 1
ACTIVATIONS = "activations"
STATES = "states"
CHECK_PIECE = 16 * 2**20  # a state file is checked this much at a time
REMOVING = ".removing-"  # a store of a finished run being removed (never a store's name)


def fingerprint(parts: Mapping[str, str]) -> str:
    """One digest of what determines a calibration's result (each part a string)."""
    text = json.dumps(dict(sorted(parts.items())), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def digest_tensors(items: Iterable[tuple[str, Any]]) -> str:
    """A digest of named tensors' dtypes, shapes and bits (and of other values' repr):
    the model's starting weights, the calibration samples."""
    digest = hashlib.sha256()
    for name, value in items:
        digest.update(name.encode())
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}{tuple(value.shape)}".encode())
            digest.update(_tensor_crc(value).to_bytes(4, "little"))
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _tensor_crc(tensor: torch.Tensor) -> int:
    """The CRC-32C of a tensor's bits (on the CPU, in element order)."""
    data = tensor.detach().cpu().contiguous()
    return crc32c_extend(0, byte_view(data)) if data.numel() else 0


class Checkpoint:
    """What a committed checkpoint says (the note of its activation store's root)."""

    def __init__(self, note: Mapping[str, Any], store: Path) -> None:
        self.store = store
        self.fingerprint: str = note["fingerprint"]
        self.parts: dict[str, str] = dict(note.get("parts", {}))
        self.done: int = int(note["subgraphs_done"])
        self.subgraphs: int = int(note["subgraphs"])
        self.states: list[dict[str, Any]] = list(note["states"])

    @staticmethod
    def note(
        print_: str, parts: Mapping[str, str], done: int, subgraphs: int, states: list[dict]
    ) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "fingerprint": print_,
            "parts": {name: _short(value) for name, value in parts.items()},
            "subgraphs_done": done,
            "subgraphs": subgraphs,
            "states": list(states),
        }


def _short(value: str) -> str:
    # The note lives in the store's root, which is read whole: parts are kept short
    # (long ones by their digest), enough to name what differs.
    return value if len(value) <= 200 else "sha256:" + hashlib.sha256(value.encode()).hexdigest()


class Part:
    """One rank's part of a checkpoint directory (the whole of it for one process):
    where its activation store and its state files are."""

    def __init__(self, directory: Path, rank: int | None = None) -> None:
        self.directory = directory
        self.rank = rank  # None: one process
        self.activations = directory / ACTIVATIONS
        self.states = directory / STATES
        if rank is not None:
            self.states = self.states / f"{RANK_PREFIX}{rank}"

    def stores(self) -> dict[Path, dict]:
        """The stores of this part, with their root attributes."""
        found: dict[Path, dict] = {}
        for directory in self._store_dirs():
            found.update(find_stores(directory))
        return found

    def _store_dirs(self) -> list[Path]:
        """Where this part's stores are: ``activations/`` for one process, else its
        rank's directory in each run directory there (a run is named anew each launch)."""
        if not self.activations.is_dir():
            return []
        if self.rank is None:
            return [self.activations]
        runs = sorted(path for path in self.activations.iterdir() if path.is_dir())
        return [own for run in runs if (own := rank_dirs(run).get(self.rank)) is not None]

    def remove(self) -> None:
        """Remove this part's store and state files (after a run that finished), and
        the directories left empty, up to the checkpoint directory itself."""
        for path in self.stores():
            # Out of sight first, in one rename: a kill while the tree is deleted leaves
            # no store that reads as a checkpoint with arrays missing.
            hidden = path.with_name(f"{REMOVING}{path.name}")
            try:
                os.rename(path, hidden)
            except OSError:  # deleted where it is, then; what stays is warned about
                hidden = path
            shutil.rmtree(hidden, ignore_errors=True)
        for directory in self._store_dirs():
            for left in directory.glob(f"{REMOVING}*"):  # a removal a kill cut short
                shutil.rmtree(left, ignore_errors=True)
            remove_empty_dirs(directory, self.directory.parent)
        shutil.rmtree(self.states, ignore_errors=True)
        remove_empty_dirs(self.states.parent, self.directory.parent)
        if self.rank is None:
            shutil.rmtree(self.activations, ignore_errors=True)
        remove_empty_dirs(self.activations, self.directory.parent)


def other_parts(part: Part, world: int) -> list[Path]:
    """Checkpointed stores in ``part``'s checkpoint directory that belong to no rank
    of its job (``world`` processes; ``part.rank`` None: one process not started as a
    rank): a run with another number of processes left them."""
    directory = part.directory
    activations = directory / ACTIVATIONS
    if not activations.is_dir():
        return []
    parts = [Part(directory)] if part.rank is not None else []
    runs = [path for path in activations.iterdir() if path.is_dir() and rank_dirs(path)]
    ranks = {rank for run in runs for rank in rank_dirs(run)}
    parts += [Part(directory, r) for r in sorted(ranks) if part.rank is None or r >= world]
    return [
        path
        for other in parts
        for path, attributes in other.stores().items()
        if _checkpoint_note(attributes) is not None
    ]


def _checkpoint_note(attributes: Any) -> Any:
    """The checkpoint's part of a store root's note (None: no such part); what it
    holds is checked where it is read."""
    note = attributes.get("note") if isinstance(attributes, dict) else None
    return note.get(NOTE_KEY) if isinstance(note, dict) else None


def committed(part: Part) -> Checkpoint | None:
    """The checkpoint committed in ``part``, or None if none was (no store yet, or a
    store whose first flush did not complete). More than one store with a note (a
    directory used by two runs at once) is refused."""
    found = []
    for path, attributes in part.stores().items():
        note = _checkpoint_note(attributes)
        if note is not None:
            found.append((path, note))
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(
            f"{part.directory} holds {len(found)} checkpointed activation stores "
            f"({', '.join(str(path) for path, _ in found)}): one checkpoint_dir per "
            "run; remove the directory (or use another) to start afresh"
        )
    path, note = found[0]
    try:
        if note.get("format") != FORMAT:
            raise KeyError("format")
        return Checkpoint(note, path)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
        raise CheckpointError(
            f"the checkpoint in {part.directory} is damaged or of another spillcache "
            f"version (its note in {path / 'zarr.json'} does not read); remove the "
            "directory to start afresh"
        ) from None


def remove_uncommitted_stores(part: Part) -> None:
    """Remove the stores of ``part`` that commit no checkpoint and whose process is dead
    (a run killed before its first commit): a run that starts afresh makes its own."""
    for path, attributes in part.stores().items():
        if _checkpoint_note(attributes) is None and owner_alive(attributes) is False:
            shutil.rmtree(path, ignore_errors=True)


def describe_store(path: Path, attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a store's root says of the checkpoint it commits, for ``spillcache du``,
    ``inspect`` and ``gc``; None if it commits none (or says it unreadably)."""
    note = _checkpoint_note(attributes)
    try:
        states = list(note["states"])
        found = {
            "subgraphs_done": int(note["subgraphs_done"]),
            "subgraphs": int(note["subgraphs"]),
            "state_files": len(states),
            "state_bytes": sum(int(entry["bytes"]) for entry in states),
        }
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    directory = next((up.parent for up in Path(path).parents if up.name == ACTIVATIONS), None)
    return {**found, "checkpoint_dir": None if directory is None else str(directory)}


def store_text(found: Mapping[str, Any]) -> str:
    """``describe_store``'s answer in words."""
    return (
        f"checkpoint, {found['subgraphs_done']} of {found['subgraphs']} subgraphs done "
        f"({found['state_files']} state files, {format_bytes(found['state_bytes'])})"
    )


def named_tensors(
    model: torch.nn.Module, modules: list[torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """The parameters and buffers of ``modules`` (each once), by the names the model's
    ``state_dict`` gives them."""
    paths = {id(module): prefix for prefix, module in model.named_modules()}
    named = {}
    for module in modules:
        prefix = paths.get(id(module))
        if prefix is None:
            raise CheckpointError(
                f"a module of the subgraph ({type(module).__name__}) belongs to no module "
                "of the model"
            )
        named.update((full, tensor) for full, _, tensor in _own_of(prefix, module))
    return named


def _own_of(prefix: str, module: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``module``'s own parameters and buffers: (``state_dict`` name, name in it, tensor)."""
    for name, tensor in [
        *module.named_parameters(recurse=False),
        *module.named_buffers(recurse=False),
    ]:
        yield f"{prefix}.{name}" if prefix else name, name, tensor


class TensorCRCs:
    """The CRC-32C of each of a set of named tensors, to tell which changed since."""

    def __init__(self, named: Mapping[str, torch.Tensor]) -> None:
        self.crcs = {name: _crc(tensor) for name, tensor in named.items()}

    def changed(self, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: tensor for name, tensor in named.items() if self.crcs.get(name) != _crc(tensor)
        }


def _crc(tensor: torch.Tensor) -> tuple:
    return (tensor.dtype, tuple(tensor.shape), _tensor_crc(tensor))


def save_states(part: Part, index: int, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Write ``tensors`` (by their names in the model) as subgraph ``index``'s state
    file, whole and durably (streamed to a ``.partial`` file, its CRC-32C computed as it
    goes, fsync'd, renamed, its directory fsync'd): what a note records of it. No copy
    of the tensors is made in memory beyond what ``torch.save`` writes at a time."""
    states = part.states
    states.mkdir(parents=True, exist_ok=True)
    name = f"{index:04d}.pt"
    partial = states / f"{name}.partial"
    with open(partial, "wb") as file:
        writer = _CheckedWriter(file)
        # Each tensor as its bits in a same-width plain type, and its dtype's name:
        # torch.save refuses some dtypes (the sub-byte ones) that this way still go.
        raw = {
            key: tensor.detach().view(raw_dtype(tensor.dtype)) for key, tensor in tensors.items()
        }
        dtypes = {key: dtype_name(tensor.dtype) for key, tensor in tensors.items()}
        torch.save({"tensors": raw, "dtypes": dtypes}, writer)
        file.flush()
        os.fsync(file.fileno())
    os.replace(partial, states / name)
    for made in (states, *states.parents)[: len(states.relative_to(part.directory).parts) + 1]:
        chunkio.fsync_directory(made)  # the file's name, and the directories made for it
    return {"file": name, "bytes": writer.size, "crc32c": writer.crc}


class _CheckedWriter(io.RawIOBase):
    """A file opened for writing that counts the bytes written and their CRC-32C."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self._file = file
        self.size = 0
        self.crc = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")  # no copy: torch.save hands whole storages
        written = self._file.write(view)
        self.crc = google_crc32c.extend(self.crc, numpy.frombuffer(view[:written], numpy.uint8))
        self.size += written
        return written


def check_states(part: Part, checkpoint: Checkpoint) -> None:
    """Every state file the checkpoint names is there, whole: its size and its CRC-32C
    (read in pieces); CheckpointError naming the first that is not."""
    for entry in checkpoint.states:
        path = part.states / entry["file"]
        crc, size = 0, 0
        try:
            with open(path, "rb") as file:
                while piece := file.read(CHECK_PIECE):
                    crc = google_crc32c.extend(crc, piece)
                    size += len(piece)
        except FileNotFoundError:
            raise _damaged(part, f"its state file {path} is missing") from None
        if size != entry["bytes"]:
            raise _damaged(part, f"its state file {path} holds {size} bytes, not {entry['bytes']}")
        if crc != entry["crc32c"]:
            raise _damaged(part, f"its state file {path} does not match its CRC-32C")


def iter_states(part: Part, checkpoint: Checkpoint) -> Iterator[dict[str, torch.Tensor]]:
    """The tensors of each state file the checkpoint names, in order (later subgraphs'
    values of a tensor come later), mapped rather than read: check_states first."""
    for entry in checkpoint.states:
        saved = torch.load(
            part.states / entry["file"], weights_only=True, mmap=True, map_location="cpu"
        )
        yield {
            key: raw.view(dtype_from_name(saved["dtypes"][key]))
            for key, raw in saved["tensors"].items()
        }


def load_states(part: Part, checkpoint: Checkpoint, model: torch.nn.Module) -> None:
    """The checkpoint's saved tensors into the model: every state file checked whole,
    and every tensor checked to fit, before any is loaded."""
    check_states(part, checkpoint)
    own = _own_tensors(model)
    for tensors in iter_states(part, checkpoint):
        _check_fits(own, tensors, part.directory)
    for tensors in iter_states(part, checkpoint):
        _load_into(own, tensors)


def _check_fits(own: dict[str, tuple], tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """CheckpointError unless every saved tensor names one of the model's (``own``), of
    the same dtype and shape (else it is another model's, or another version's)."""
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise CheckpointError(
            f"the checkpoint in {directory} holds tensors this model does not have "
            f"({', '.join(unknown[:5])}); nothing of it was loaded. Remove the directory "
            "to start afresh"
        )
    for name, saved in tensors.items():
        target = own[name][2]
        if target.shape != saved.shape or target.dtype != saved.dtype:
            raise CheckpointError(
                f"the checkpoint in {directory} holds {name} as {saved.dtype} "
                f"{tuple(saved.shape)}, the model has {target.dtype} {tuple(target.shape)}; "
                "nothing of it was loaded. Remove the directory to start afresh"
            )


def _load_into(own: dict[str, tuple], tensors: dict[str, torch.Tensor]) -> None:
    """The saved tensors into the model's own, bit for bit (checked by _check_fits). A
    module offloaded by compressed-tensors (llm-compressor offloads the model it
    calibrates) hands out onloaded copies, so a copy into one would be lost: its
    tensors are written through its offload, which updates the offloaded value (CPU
    memory, a disk file) and any onloaded one."""
    with torch.no_grad():
        for name, saved in tensors.items():
            module, attribute, tensor = own[name]
            if not _offloaded(module):
                tensor.copy_(saved)
            elif _writes_offload(module):
                from compressed_tensors.offload import update_offload_parameter

                # contiguous: a disk offload writes a safetensors file, which needs it
                update_offload_parameter(module, attribute, saved.contiguous())


def _writes_offload(module: torch.nn.Module) -> bool:
    """Whether this process writes an offloaded module's tensors. Under torchrun an
    offload in CPU memory or on disk is one copy all ranks read: only the source rank
    writes it, as llm-compressor's own updates do (each rank saved the same final
    tensors; none reads them before every rank has loaded: Ranks.all_ready)."""
    from compressed_tensors.distributed import is_source_process
    from compressed_tensors.offload.cache import DistributedCPUCache, DistributedDiskCache

    shared = isinstance(module._parameters, (DistributedCPUCache, DistributedDiskCache))
    return not shared or is_source_process()


def _own_tensors(model: torch.nn.Module) -> dict[str, tuple]:
    """The model's parameters and buffers by their ``state_dict`` names: (module, name
    there, tensor). An offloaded module's are its offloaded values, read for their shape
    and dtype: onloading every one would put the whole model on the onload device."""
    disabled = contextlib.nullcontext()  # compressed-tensors may not even be installed
    if any(_offloaded(module) for module in model.modules()):
        from compressed_tensors.offload import disable_onloading

        disabled = disable_onloading()
    with disabled:
        return {
            full: (module, name, tensor)
            for prefix, module in model.named_modules()
            for full, name, tensor in _own_of(prefix, module)
        }


def _offloaded(module: torch.nn.Module) -> bool:
    # compressed-tensors replaces the dict of an offloaded module's tensors by a mapping
    # of its own (OffloadCache) that onloads on access.
    return not isinstance(vars(module).get("_parameters", {}), dict)


def _damaged(part: Part, what: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint in {part.directory} is damaged: {what}; nothing of it was loaded. "
        "Remove the directory to start afresh (or restore the file)"
    )


def remove_unnamed_states(part: Part, checkpoint: Checkpoint | None) -> list[str]:
    """Remove state files no committed note names (written by a checkpoint cut short)."""
    states = part.states
    if not states.is_dir():
        return []
    named = {entry["file"] for entry in checkpoint.states} if checkpoint else set()
    removed = []
    for path in sorted(states.iterdir()):
        if path.name not in named and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def describe_difference(saved: Mapping[str, str], now: Mapping[str, str]) -> str:
    """Which parts of two fingerprints differ, for the refusal's message."""
    differ = [
        name
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != _short(now.get(name, ""))  # a note keeps its parts short
    ]
    return ", ".join(differ) if differ else "the fingerprint (its parts read the same)"
