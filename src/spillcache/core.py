"""The state of one cache: batches of entries over the tiers, behind one lock.

``CacheCore`` owns everything a cache holds (entries, tiers, store, worker) and is
what the garbage-collection finalizer closes, so it must never refer back to the
public ``IntermediatesCache`` object.
"""

from __future__ import annotations

import itertools
import operator
import tempfile
import threading
import warnings
from collections.abc import Collection, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from . import dtypes
from .config import AUTO, CacheConfig
from .errors import CacheClosedError, ConfigError
from .format import Store
from .io import Worker
from .placement import Placement, TensorRecord
from .sysinfo import RAM_BACKED, available_ram, filesystem_type
from .tiers import DiskTier
from .tree import flatten, spec_to_json, unflatten

__all__ = ["CacheCore", "resolve_offload_device"]

CPU = torch.device("cpu")


class InlineTensor(NamedTuple):
    """A tensor kept with its entry in RAM: too small to tier, or not tierable."""

    tensor: torch.Tensor
    onload_device: torch.device
    requires_grad: bool


@dataclass
class Entry:
    spec: tuple
    leaves: list[TensorRecord | InlineTensor]
    opaques: list[Any]


def resolve_offload_device(offload_device: Any) -> torch.device | None:
    if offload_device is None:
        return None
    try:
        return torch.device(offload_device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"offload_device: {offload_device!r} is not a torch device; use 'cpu' "
            "(offload to host RAM, spilling to disk), None (keep values where they are) "
            "or an accelerator such as 'cuda:0'"
        ) from error


class CacheCore:
    """Batches of ``key -> Entry`` whose tensors live in a ``Placement``."""

    def __init__(self, config: CacheConfig, offload_device: torch.device | None) -> None:
        self.config = config
        self.offload_device = offload_device
        accelerator = offload_device if offload_device and offload_device.type != "cpu" else None
        device_budget = config.device_bytes
        if device_budget == AUTO:
            device_budget = 0 if offload_device is not None and accelerator is None else None
        host_budget = config.host_bytes
        if host_budget == AUTO:
            host_budget = available_ram() // 2
        disk_dir = config.disk_path
        if disk_dir == AUTO:
            disk_dir = tempfile.gettempdir()
        if disk_dir is not None and filesystem_type(disk_dir) in RAM_BACKED:
            warnings.warn(
                f"spillcache's disk tier is at {disk_dir}, which is RAM-backed "
                f"({filesystem_type(disk_dir)}): spilled values still use RAM. Set disk_path "
                "(or SPILLCACHE_DISK_PATH) to a directory on a local disk",
                stacklevel=4,
            )
        if config.keep_store and disk_dir is None:
            raise ConfigError("keep_store: there is no disk tier to keep; set disk_path too")
        disk = None
        if disk_dir is not None:
            disk = DiskTier(config.disk_bytes, lambda: Store.create(disk_dir))
        self.placement = Placement(
            device_budget=device_budget,
            device_target=accelerator,
            host_budget=host_budget,
            disk=disk,
            eviction=config.eviction,
            pin_host=torch.cuda.is_available(),
        )
        self._lock = threading.Lock()
        self._batches: list[dict[str, Entry]] = []
        self._generations: list[int] = []
        self._closed = False
        self.worker = Worker("spillcache-prefetch")

    # --------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError(
                "this cache is closed; create a new one (or reopen a kept store)"
            )

    def _index(self, batch_index: Any) -> int:
        index = operator.index(batch_index)
        count = len(self._batches)
        if not -count <= index < count:
            raise IndexError(
                f"batch index {batch_index} is out of range: the cache has {count} batches"
            )
        return index % count

    def _offload_inline(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where a tensor that stays with its entry is kept (one that cannot tier stays as is)."""
        if not dtypes.is_tierable(tensor):
            return tensor
        if self.offload_device is None:
            return tensor.detach()
        if self.offload_device.type == "cpu":
            return dtypes.to_host(tensor.detach())
        return dtypes.move(tensor.detach(), self.offload_device)

    # ----------------------------------------------------------------- write

    def num_batches(self) -> int:
        with self._lock:
            return len(self._batches)

    def add_batches(self, count: int) -> None:
        with self._lock:
            self._check_open()
            self._batches.extend({} for _ in range(count))
            self._generations.extend(0 for _ in range(count))

    def append(self, values: dict[str, Any], onload_device: torch.device | None = None) -> int:
        """Store ``values`` as a new last batch; on error the cache is unchanged."""
        with self._lock:
            self._check_open()
            self._batches.append({})
            self._generations.append(0)
            try:
                self._update_locked(len(self._batches) - 1, values, onload_device)
            except BaseException:
                self._batches.pop()
                self._generations.pop()
                raise
            return len(self._batches) - 1

    def update(self, batch_index: int, values: dict[str, Any]) -> None:
        with self._lock:
            self._check_open()
            self._update_locked(self._index(batch_index), values, None)

    def _update_locked(self, index: int, values: Any, onload_device: torch.device | None) -> None:
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict of name -> value, got {type(values).__name__}")
        for key in values:
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, got {key!r} ({type(key).__name__})")
        flats = {key: flatten(value, onload_device) for key, value in values.items()}
        tiered = {
            key: [self._is_tiered(leaf.tensor) for leaf in flat.tensors]
            for key, flat in flats.items()
        }
        to_admit = [
            (leaf.tensor, leaf.onload_device)
            for key, flat in flats.items()
            for leaf, is_tiered in zip(flat.tensors, tiered[key], strict=True)
            if is_tiered
        ]
        records = iter(self.placement.admit(to_admit))
        batch = self._batches[index]
        replaced: list[TensorRecord] = []
        for key, flat in flats.items():
            leaves: list[TensorRecord | InlineTensor] = []
            for leaf, is_tiered in zip(flat.tensors, tiered[key], strict=True):
                if is_tiered:
                    leaves.append(next(records))
                else:
                    offloaded = self._offload_inline(leaf.tensor)
                    leaves.append(
                        InlineTensor(offloaded, leaf.onload_device, leaf.tensor.requires_grad)
                    )
            if key in batch:
                replaced.extend(_records_of(batch[key]))
            batch[key] = Entry(flat.spec, leaves, flat.opaques)
        self.placement.release(replaced)
        self._generations[index] += 1

    def _is_tiered(self, tensor: torch.Tensor) -> bool:
        if not dtypes.is_tierable(tensor):
            warnings.warn(
                f"spillcache keeps {tensor.dtype} tensors with layout {tensor.layout} "
                f"({type(tensor).__name__}) in RAM as they are; only dense tensors spill",
                stacklevel=5,
            )
            return False
        return tensor.nbytes >= self.config.inline_bytes

    def delete(self, batch_index: int, consumed_names: Iterable[str] | None) -> None:
        with self._lock:
            self._check_open()
            index = self._index(batch_index)
            batch = self._batches[index]
            # A name given twice is one name: deleting it once is all that was asked.
            names = list(batch) if consumed_names is None else list(dict.fromkeys(consumed_names))
            missing = [name for name in names if name not in batch]
            if missing:
                raise KeyError(
                    f"batch {batch_index} has no value(s) named {missing}; nothing was deleted"
                )
            for name in names:
                self.placement.release(list(_records_of(batch.pop(name))))
            self._generations[index] += 1

    # ------------------------------------------------------------------ read

    def fetch(self, batch_index: int, input_names: Collection[str] | None) -> dict[str, Any]:
        return self.fetch_versioned(batch_index, input_names)[1]

    def fetch_versioned(
        self, batch_index: int, input_names: Collection[str] | None
    ) -> tuple[int, dict[str, Any]]:
        """The batch's values and its generation (bumped by every update and delete)."""
        with self._lock:
            self._check_open()
            index = self._index(batch_index)
            values = {
                key: self._load_entry(entry)
                for key, entry in self._batches[index].items()
                if input_names is None or key in input_names
            }
            return self._generations[index], values

    def generation(self, batch_index: int) -> int:
        with self._lock:
            return self._generations[self._index(batch_index)]

    def submit_fetch(self, batch_index: int, input_names: Collection[str] | None) -> Future:
        return self.worker.submit(self.fetch_versioned, batch_index, input_names)

    def _load_entry(self, entry: Entry) -> Any:
        tensors = [
            self.placement.load(leaf)
            if isinstance(leaf, TensorRecord)
            else dtypes.onload(leaf.tensor, leaf.onload_device, leaf.requires_grad)
            for leaf in entry.leaves
        ]
        return unflatten(entry.spec, tensors, entry.opaques)

    def prepare(self, batch_index: int, input_names: Collection[str] | None) -> None:
        """Bring a batch's tiered values up to the host tier ahead of use."""
        with self._lock:
            self._check_open()
            batch = self._batches[self._index(batch_index)]
            for key, entry in batch.items():
                if input_names is None or key in input_names:
                    for record in _records_of(entry):
                        if record.resident is None:
                            self.placement.load(record)

    # ------------------------------------------------------------- reporting

    def size(self) -> dict[torch.device, int]:
        with self._lock:
            sizes = self.placement.memory_by_device()
            seen: set[int] = set()
            for batch in self._batches:
                for entry in batch.values():
                    in_ram = [
                        leaf.tensor for leaf in entry.leaves if isinstance(leaf, InlineTensor)
                    ]
                    in_ram += [obj for obj in entry.opaques if isinstance(obj, torch.Tensor)]
                    for tensor in in_ram:
                        if id(tensor) not in seen and not tensor.is_meta:
                            seen.add(id(tensor))
                            sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
            return sizes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            placement = self.placement
            disk = placement.disk
            return {
                "device": {"bytes": placement.device.nbytes, "budget": placement.device.budget},
                "host": {"bytes": placement.host.nbytes, "budget": placement.host.budget},
                "disk": {
                    "bytes": disk.nbytes if disk is not None else 0,
                    # no disk tier can hold nothing; None is "no limit but the disk"
                    "budget": disk.budget if disk is not None else 0,
                    "path": self._store_path_locked(),
                },
                "counters": dict(placement.counters),
            }

    def store_path(self) -> str | None:
        with self._lock:
            return self._store_path_locked()

    def _store_path_locked(self) -> str | None:
        disk = self.placement.disk
        return str(disk.store.path) if disk is not None and disk.has_store else None

    # -------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Join the worker; keep (complete) or delete the store. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.worker.close()
        with self._lock:
            disk = self.placement.disk
            if self.config.keep_store:
                self._persist_locked()
            elif disk is not None and disk.has_store:
                disk.store.remove()

    def _persist_locked(self) -> None:
        store = self.placement.disk.store
        self.placement.persist(durable=True)
        inline_names = (f"i{n}" for n in itertools.count())
        for index, batch in enumerate(self._batches):
            entries = {}
            for key, entry in batch.items():
                described = [_describe_leaf(store, leaf, inline_names) for leaf in entry.leaves]
                entries[key] = spec_to_json(entry.spec, described.__getitem__)
            store.write_batch(index, entries, durable=True)
        store.write_root_attributes(complete=True, num_batches=len(self._batches), durable=True)


def _records_of(entry: Entry) -> Iterable[TensorRecord]:
    return (leaf for leaf in entry.leaves if isinstance(leaf, TensorRecord))


def _describe_leaf(store: Store, leaf: TensorRecord | InlineTensor, inline_names) -> dict:
    """JSON for one tensor leaf, writing inline tensors as arrays of their own."""
    if isinstance(leaf, TensorRecord):
        name, device, grad = str(leaf.rid), leaf.onload_device, leaf.requires_grad
    elif not dtypes.is_tierable(leaf.tensor):
        return {
            "array": None,
            "device": str(leaf.onload_device),
            "note": "kept in RAM only; not stored",
        }
    else:
        name, device, grad = next(inline_names), leaf.onload_device, leaf.requires_grad
        store.write_tensor(name, dtypes.to_host(leaf.tensor.detach()).contiguous(), durable=True)
    return {"array": f"tensors/{name}", "device": str(device), "requires_grad": grad}
