"""A calibration's checkpoint directory: what a killed ``oneshot`` needs to go on from
the last subgraph it finished, and the check that it is the same run.

The directory holds

- ``activations/``: the sequential pipeline's cache, a kept spillcache store. After each
  subgraph it holds the next subgraph's inputs; its ``flush()`` makes them durable.
- ``states/NNNN.pt``: the model's tensors that subgraph NNNN changed (weights,
  quantization parameters, observers' buffers), each file written and fsync'd whole
  before anything names it.

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

import hashlib
import io
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from . import chunkio
from .store_dirs import find_stores
from .store_format import crc32c_extend

__all__ = [
    "NOTE_KEY",
    "describe_difference",
    "Checkpoint",
    "TensorCRCs",
    "committed",
    "digest_tensors",
    "fingerprint",
    "load_states",
    "remove_unnamed_states",
    "save_states",
]

NOTE_KEY = "checkpoint"
FORMAT = 1
ACTIVATIONS = "activations"
STATES = "states"


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
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            crc = crc32c_extend(0, _bytes_of(tensor)) if tensor.numel() else 0
            digest.update(crc.to_bytes(4, "little"))
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


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
            "states": states,
        }


def _short(value: str) -> str:
    # The note lives in the store's root, which is read whole: parts are kept short
    # (long ones by their digest), enough to name what differs.
    return value if len(value) <= 200 else "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def committed(directory: Path) -> Checkpoint | None:
    """The checkpoint committed in ``directory``, or None if none was (no store yet,
    or a store whose first flush did not complete). More than one store with a note
    (a directory used by two runs at once) is refused."""
    activations = directory / ACTIVATIONS
    if not activations.is_dir():
        return None
    found = []
    for path, attributes in find_stores(activations).items():
        note = attributes.get("note") or {}
        if NOTE_KEY in note:
            found.append((path, note[NOTE_KEY]))
    if not found:
        return None
    if len(found) > 1:
        raise CheckpointError(
            f"{activations} holds {len(found)} checkpointed activation stores "
            f"({', '.join(str(path.name) for path, _ in found)}): one checkpoint_dir per "
            "run; remove the directory (or use another) to start afresh"
        )
    path, note = found[0]
    try:
        if note.get("format") != FORMAT:
            raise KeyError("format")
        return Checkpoint(note, path)
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(
            f"the checkpoint in {directory} is damaged or of another spillcache version "
            f"(its note in {path / 'zarr.json'} does not read); remove the directory to "
            "start afresh"
        ) from None


class TensorCRCs:
    """The CRC-32C of each of a set of named tensors, to tell which changed since."""

    def __init__(self, named: Mapping[str, torch.Tensor]) -> None:
        self.crcs = {name: _crc(tensor) for name, tensor in named.items()}

    def changed(self, named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: tensor for name, tensor in named.items() if self.crcs.get(name) != _crc(tensor)
        }


def _crc(tensor: torch.Tensor) -> tuple:
    data = tensor.detach().cpu().contiguous()
    crc = crc32c_extend(0, _bytes_of(data)) if data.numel() else 0
    return (data.dtype, tuple(data.shape), crc)


def save_states(directory: Path, index: int, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Write ``tensors`` (by their names in the model) as subgraph ``index``'s state
    file, whole and durably; what a note records of it."""
    states = directory / STATES
    states.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({name: t.detach().cpu().clone() for name, t in tensors.items()}, buffer)
    data = bytearray(buffer.getbuffer())
    view = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    name = f"{index:04d}.pt"
    chunkio.write_file(states / name, view, direct=False, staging=None, durable=True)
    chunkio.fsync_directory(states)
    chunkio.fsync_directory(directory)
    return {"file": name, "bytes": len(data), "crc32c": crc32c_extend(0, view) if data else 0}


def load_states(directory: Path, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Every state file the checkpoint names, checked (size and CRC-32C) and read, in
    order: later subgraphs' values of a tensor replace earlier ones."""
    merged: dict[str, torch.Tensor] = {}
    for entry in checkpoint.states:
        path = directory / STATES / entry["file"]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise _damaged(directory, f"its state file {path} is missing") from None
        if len(data) != entry["bytes"]:
            raise _damaged(
                directory, f"its state file {path} holds {len(data)} bytes, not {entry['bytes']}"
            )
        crc = crc32c_extend(0, torch.frombuffer(bytearray(data), dtype=torch.uint8)) if data else 0
        if crc != entry["crc32c"]:
            raise _damaged(directory, f"its state file {path} does not match its CRC-32C")
        merged.update(torch.load(io.BytesIO(data), weights_only=True))
    return merged


def _damaged(directory: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"the checkpoint in {directory} is damaged: {what}; nothing of it was loaded. "
        "Remove the directory to start afresh (or restore the file)"
    )


def remove_unnamed_states(directory: Path, checkpoint: Checkpoint | None) -> list[str]:
    """Remove state files no committed note names (written by a checkpoint cut short)."""
    states = directory / STATES
    if not states.is_dir():
        return []
    named = {entry["file"] for entry in checkpoint.states} if checkpoint else set()
    removed = []
    for path in sorted(states.iterdir()):
        if path.name not in named:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def describe_difference(saved: Mapping[str, str], now: Mapping[str, str]) -> str:
    """Which parts of two fingerprints differ, for the refusal's message."""
    differ = [
        name
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != _short(now.get(name, "")) and saved.get(name) != now.get(name)
    ]
    return ", ".join(differ) if differ else "the fingerprint (its parts read the same)"
