"""Opening a kept store as a cache again: its batches, keys and values, read-write.

Only what a store records is read: JSON structures and array metadata. Classes named
in a structure are looked up among modules already imported (``tree.spec_from_json``);
nothing in a store is imported, unpickled or run.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from .config import CacheConfig
from .core import CacheCore
from .entries import Entry
from .errors import StoreFormatError
from .format import Store
from .placement import TensorRecord
from .tree import spec_from_json

__all__ = ["reopen"]

CPU = torch.device("cpu")


def reopen(path: str | os.PathLike[str], config: CacheConfig) -> CacheCore:
    """A cache core over the complete store at ``path`` (kept when it closes again)."""
    store = Store.open(
        path,
        direct_io=config.direct_io,
        writers=config.io_threads,
        read_buffer_bytes=config.read_buffer_bytes,
    )
    attributes = store.attributes
    if not attributes.get("complete"):
        raise StoreFormatError(
            f"{store.path} is not complete: its run did not close with keep_store = true, "
            "so it records no batch structures (`spillcache inspect` lists its arrays)"
        )
    kept = config.replace(disk_path=str(store.path.parent), keep_store=True)
    core = CacheCore(kept, CPU)
    placement = core.placement
    core.tenant.attach(store)
    placement.skip_record_ids(store.array_names())
    records: dict[str, TensorRecord] = {}
    batches = []
    for index in range(attributes.get("num_batches", 0)):
        batches.append(
            {
                key: _entry(store, core, records, node, index, key)
                for key, node in store.read_batch(index).items()
            }
        )
    core.adopt_batches(batches)
    # Open again: not complete until this cache closes and writes it whole.
    store.write_root_attributes(complete=False, num_batches=len(batches))
    return core


def _entry(
    store: Store,
    core: CacheCore,
    records: dict[str, TensorRecord],
    node: dict,
    batch: int,
    key: str,
) -> Entry:
    leaves: list[TensorRecord] = []

    def tensor_leaf(tensor_node: dict) -> int:
        name = tensor_node["array"].removeprefix("tensors/")
        record = records.get(name)
        if record is None:
            shape, dtype, _ = store.array_info(name)
            record = core.placement.adopt(
                name,
                shape,
                dtype,
                _device(tensor_node.get("device", "cpu")),
                bool(tensor_node.get("requires_grad", False)),
                tenant=core.tenant,
                batch=batch,
                label=f"batch {batch}, key {key!r}",
            )
            records[name] = record
        core.placement.hold(record)
        leaves.append(record)
        return len(leaves) - 1

    spec = spec_from_json(_without_unstored(node), tensor_leaf)
    return Entry(spec, leaves, [])


def _device(name: str) -> torch.device:
    """Where a value goes when fetched: its recorded device, or the CPU where that kind
    of device is not present."""
    device = torch.device(name)
    if device.type != "cpu" and not getattr(torch, device.type).is_available():
        return CPU
    return device


def _without_unstored(node: Any) -> Any:
    """The structure with tensors the store does not hold (kept in RAM only by the run
    that wrote it) as None."""
    if isinstance(node, dict):
        if node.get("type") == "tensor" and not node.get("array"):
            return {"type": "none"}
        return {key: _without_unstored(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_without_unstored(item) for item in node]
    return node
