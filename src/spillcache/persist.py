"""Writing a whole cache into its store on close, for ``keep_store``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from . import dtypes
from .entries import Entry, InlineTensor
from .format import Store
from .placement import Placement, TensorRecord
from .tenants import Tenant
from .tree import spec_to_json

__all__ = ["persist"]


def persist(placement: Placement, tenant: Tenant, batches: list[dict[str, Entry]]) -> None:
    """Every tensor of the cache (from every tier) and every batch's structure, durably,
    then the root's ``complete`` flag last: a store marked complete holds everything."""
    store = tenant.store
    placement.persist(tenant, durable=True)
    taken = set(store.array_names())  # a reopened store already has some "i<n>"
    inline_names = (name for n in itertools.count() if (name := f"i{n}") not in taken)
    for index, batch in enumerate(batches):
        entries = {}
        for key, entry in batch.items():
            described = [_describe_leaf(store, leaf, inline_names) for leaf in entry.leaves]
            entries[key] = spec_to_json(entry.spec, described.__getitem__)
        store.write_batch(index, entries, durable=True)
    store.write_root_attributes(complete=True, num_batches=len(batches), durable=True)


def _describe_leaf(
    store: Store, leaf: TensorRecord | InlineTensor, inline_names: Iterator[str]
) -> dict:
    """JSON for one tensor leaf, writing inline tensors as arrays of their own."""
    if isinstance(leaf, TensorRecord):
        name, device, grad = leaf.array, leaf.onload_device, leaf.requires_grad
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
