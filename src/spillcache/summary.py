"""What a store holds, for people and scripts: built from the store format's reader."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import format as store_format
from .dtypes import dtype_name

__all__ = ["summarize"]


def summarize(path: str | Path) -> dict[str, Any]:
    """A store's state, arrays and (when it was kept) keys; raises StoreError if ``path``
    is not a store this spillcache can read."""
    store = store_format.Store.open(path)
    attributes = store_format.read_root_attributes(store.path)
    arrays = {}
    for name in store.array_names():
        shape, dtype = store.array_info(name)
        arrays[name] = (shape, dtype, math.prod(shape) * dtype.itemsize)
    batches = attributes.get("num_batches", 0) if attributes.get("complete") else 0
    keys: dict[str, dict[str, Any]] = {}
    for index in range(batches):
        for key, spec in store.read_batch(index).items():
            entry = keys.setdefault(key, {"batches": 0, "bytes": 0, "tensors": []})
            entry["batches"] += 1
            for array in _arrays_in(spec):
                shape, dtype, nbytes = arrays[array.removeprefix("tensors/")]
                entry["bytes"] += nbytes
                if entry["batches"] == 1:
                    entry["tensors"].append({"shape": list(shape), "dtype": dtype_name(dtype)})
    return {
        "path": str(store.path),
        "format_version": attributes.get("format_version"),
        "complete": bool(attributes.get("complete")),
        "pid": attributes.get("pid"),
        "hostname": attributes.get("hostname"),
        "owner_alive": store_format.owner_alive(attributes),
        "written": attributes.get("written"),
        "torch_version": attributes.get("torch_version"),
        "batches": attributes.get("num_batches") if attributes.get("complete") else None,
        "arrays": len(arrays),
        "bytes": sum(nbytes for _, _, nbytes in arrays.values()),
        "keys": keys,
    }


def _arrays_in(spec: dict) -> Iterator[str]:
    """The array paths a stored structure refers to, in order."""
    if spec.get("type") == "tensor":
        if spec.get("array"):
            yield spec["array"]
        return
    for item in spec.get("items", []):
        for part in item if isinstance(item, list) else [item]:
            yield from _arrays_in(part)
    for _, child in spec.get("fields", []):
        yield from _arrays_in(child)
