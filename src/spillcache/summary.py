"""What a store holds, for people and scripts: built from the store format's reader."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from . import format as store_format
from .dtypes import RAW_DTYPES, dtype_name
from .tree import spec_from_json, unflatten

__all__ = ["load_value", "summarize", "tensor_stats", "verify"]


def summarize(path: str | Path) -> dict[str, Any]:
    """A store's state, arrays and (when it was kept) keys; raises StoreError if ``path``
    is not a store this spillcache can read."""
    store = store_format.Store.open(path)
    attributes = store.attributes
    arrays = {}
    for name in store.array_names():
        shape, dtype, _ = store.array_info(name)
        arrays[name] = (shape, dtype, math.prod(shape) * dtype.itemsize)
    keys: dict[str, dict[str, Any]] = {}
    for _, key, spec in _recorded_entries(store):
        entry = keys.setdefault(key, {"batches": 0, "bytes": 0, "tensors": []})
        entry["batches"] += 1
        for array in _arrays_in(spec):
            shape, dtype, nbytes = arrays[array]
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


def _recorded_entries(store: store_format.Store) -> Iterator[tuple[int, str, dict]]:
    """(batch, key, stored structure) of every entry a kept store records (none for a
    store whose run did not close)."""
    if not store.attributes.get("complete"):
        return
    for index in range(store.attributes.get("num_batches", 0)):
        for key, spec in store.read_batch(index).items():
            yield index, key, spec


def _arrays_in(spec: dict) -> Iterator[str]:
    """The names of the arrays a stored structure refers to, in order."""
    if spec.get("type") == "tensor":
        if spec.get("array"):
            yield spec["array"].removeprefix("tensors/")
        return
    for item in spec.get("items", []):
        for part in item if isinstance(item, list) else [item]:
            yield from _arrays_in(part)
    for _, child in spec.get("fields", []):
        yield from _arrays_in(child)


def load_value(path: str | Path, batch: int, key: str) -> Any:
    """One value of a kept store, rebuilt from its stored structure (tensors on the CPU;
    a tensor the store does not hold comes back as None)."""
    store = store_format.Store.open(path)
    attributes = store.attributes
    if not attributes.get("complete"):
        raise store_format.StoreFormatError(
            f"{store.path} records no batch structures (its run did not close with "
            "keep_store); `spillcache inspect` lists its arrays"
        )
    count = attributes.get("num_batches", 0)
    if not 0 <= batch < count:
        raise IndexError(f"batch {batch} is out of range: the store has {count} batches")
    entries = store.read_batch(batch)
    if key not in entries:
        raise KeyError(f"batch {batch} has no key {key!r}; it has {sorted(entries)}")
    tensors: list[Any] = []

    def tensor_leaf(node: dict) -> int:
        array = node.get("array")
        if array:
            name = array.removeprefix("tensors/")
            shape, dtype, checksum = store.array_info(name)
            tensors.append(store.read_tensor(name, shape, dtype, checksum=checksum))
        else:
            tensors.append(None)
        return len(tensors) - 1

    spec = spec_from_json(entries[key], tensor_leaf)
    return unflatten(spec, tensors, [])


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
    """Read every array of a store, checking its size and (where it has one) its CRC32C.

    Returns how many arrays were checked, how many carry a checksum, and the bad ones:
    ``{"array", "used_by", "error"}``, where ``used_by`` names the batches and keys
    that refer to the array (known for kept stores only).
    """
    store = store_format.Store.open(path)
    used_by: dict[str, list[str]] = {}
    for index, key, spec in _recorded_entries(store):
        for array in _arrays_in(spec):
            used_by.setdefault(array, []).append(f"batch {index}, key {key!r}")
    bad, checksummed = [], 0
    names = store.array_names()
    for name in names:
        try:
            shape, dtype, checksum = store.array_info(name)
            checksummed += checksum
            store.read_tensor(name, shape, dtype, checksum=checksum)
        except store_format.StoreError as error:
            bad.append({"array": name, "used_by": used_by.get(name, []), "error": str(error)})
    return {"path": str(store.path), "arrays": len(names), "checksummed": checksummed, "bad": bad}
