"""What code written for llm-compressor's stock cache reaches past its documented methods.

The stock class keeps its batches in a plain list, ``batch_intermediates``, of dicts
of ``IntermediateValue`` trees, and offloads and onloads through two classmethods. Code
that imports the class (llm-compressor's own tests, users' scripts) reads that list,
checks keys in it, and calls those helpers. Here:

- ``BatchIntermediates`` is a live view of a spillcache cache shaped like that list,
  each batch a ``dict`` that reads and writes the cache (``stock_batch.BatchView``).
- ``offload_value``, ``onload_value`` and ``pin_intermediate`` are the helpers with
  the stock semantics; ``OverrideEqMode`` is the stock module's mode in which
  ``tensor == tensor`` compares identity and returns one bool.

Writing through the view goes to the cache (``cache.update``, ``cache.delete``,
``cache.append``); what the view cannot mean (removing a batch, which would shift
every later index) raises an error naming the call to make.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..tree import IntermediateValue, build_dataclass, is_intermediate_value
from .stock_batch import BatchView, ViewedCache

__all__ = [
    "BatchIntermediates",
    "OverrideEqMode",
    "offload_value",
    "onload_value",
    "pin_intermediate",
]

_PLAIN = (int, str, float, bool, torch.dtype, torch.device, type(None))


# ------------------------------------------------------------ stock helpers


class OverrideEqMode(TorchDispatchMode):
    """Make ``torch.eq`` on two tensors an identity check returning a 0-d bool tensor.

    Lets tensors be looked up in lists and sets by identity (``x in values``) without
    the "truth value of a tensor with more than one element is ambiguous" error.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if func is torch.ops.aten.eq.Tensor:
            return torch.tensor(args[0] is args[1])
        return func(*args, **kwargs)


def offload_value(
    value: Any,
    offload_device: torch.device | str | None,
    onload_device: torch.device | str | None,
    shared: WeakKeyDictionary,
) -> IntermediateValue:
    """``value`` as the stock cache stores it: an IntermediateValue tree whose tensors
    are moved to ``offload_device`` and record where to onload them (``onload_device``,
    else the device they are on). ``shared`` maps a tensor to its offloaded copy, so a
    tensor offloaded twice is copied once."""
    if isinstance(value, torch.Tensor):
        # Tensor keys compare with torch.eq: identity under OverrideEqMode.
        with OverrideEqMode():
            offloaded = shared.get(value)
            if offloaded is None:
                offloaded = value.to(device=offload_device)
                if offloaded is not value:  # a map from a tensor to itself never frees it
                    shared[value] = offloaded
        return IntermediateValue(offloaded, onload_device if onload_device else value.device)

    def again(item: Any) -> IntermediateValue:
        return offload_value(item, offload_device, onload_device, shared)

    container = _rebuilt(value, again)
    if container is not _LEAF:
        return IntermediateValue(container, None)
    if not isinstance(value, _PLAIN):
        warnings.warn(f"Offloading not implemented for type {type(value)}.", stacklevel=3)
    return IntermediateValue(value, None)


def onload_value(intermediate: Any) -> Any:
    """The value an IntermediateValue tree stands for, each tensor moved to the device
    its IntermediateValue names (what is not an IntermediateValue is returned as is;
    llm-compressor's own IntermediateValues are taken too)."""
    if not is_intermediate_value(intermediate):
        return intermediate
    value, device = intermediate.value, intermediate.device
    if isinstance(value, torch.Tensor):
        to_accelerator = device is not None and torch.device(device).type != "cpu"
        return value.to(device=device, non_blocking=to_accelerator and value.is_pinned())
    container = _rebuilt(value, onload_value)
    return value if container is _LEAF else container


_LEAF = object()  # what _rebuilt gives for a value that is not a container


def _rebuilt(value: Any, function: Any) -> Any:
    """The list, tuple, dict or dataclass ``value`` rebuilt with ``function`` applied to
    each of its items (a namedtuple or dataclass keeps its class; another tuple becomes a
    plain one, as in the stock helpers); ``_LEAF`` for anything else."""
    if isinstance(value, list):
        return [function(item) for item in value]
    if isinstance(value, tuple):
        items = [function(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {key: function(item) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: function(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return build_dataclass(type(value), fields)
    return _LEAF


def pin_intermediate(intermediate: Any) -> None:
    """Pin, in place, every CPU tensor of an IntermediateValue tree (each replaced by
    its pinned copy), so that onloading it can be non-blocking."""
    if not is_intermediate_value(intermediate):
        return
    value = intermediate.value
    if isinstance(value, torch.Tensor):
        if value.device.type == "cpu" and not value.is_pinned():
            intermediate.value = value.pin_memory()
    elif isinstance(value, list | tuple):
        for item in value:
            pin_intermediate(item)
    elif isinstance(value, dict):
        for item in value.values():
            pin_intermediate(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            pin_intermediate(getattr(value, field.name))


# ------------------------------------------------------ batch_intermediates


class BatchIntermediates(Sequence):
    """A cache's batches as the stock class's ``batch_intermediates`` list: live (it
    shows every later update, delete and append), each item a :class:`BatchView`.

    ``append`` and ``extend`` add batches (``cache.append``); ``view[i] = mapping``
    makes batch ``i`` hold exactly ``mapping``. Removing or inserting a batch would
    shift later indices, which a cache does not do: those raise, naming what to call.
    """

    def __init__(self, cache: ViewedCache) -> None:
        self._cache = cache

    def __len__(self) -> int:
        return len(self._cache)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [BatchView(self._cache, i) for i in range(*index.indices(len(self)))]
        count = len(self)
        if not -count <= index < count:
            raise IndexError(f"batch index {index} is out of range: the cache has {count} batches")
        return BatchView(self._cache, index % count)

    def __setitem__(self, index: int, values: Mapping[str, Any]) -> None:
        """Batch ``index`` holds ``values`` and nothing else: stored first, then the
        keys it lacks deleted (a failed store deletes nothing)."""
        if isinstance(index, slice):
            raise TypeError("batch_intermediates[i:j] = ...: assign one batch at a time")
        batch = self[index]
        batch.update(values)
        stale = [key for key in batch if key not in values]
        if stale:
            self._cache.delete(batch._index, stale)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, list | tuple | BatchIntermediates):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __delitem__(self, index: Any) -> None:
        raise TypeError(
            "a cache's batches cannot be removed (later indices would shift); "
            "cache.delete(batch_index) empties a batch"
        )

    def append(self, values: Mapping[str, Any]) -> None:
        self._cache.append(dict(values))

    def extend(self, batches: Iterable[Mapping[str, Any]]) -> None:
        for values in batches:
            self.append(values)

    def __getattr__(self, name: str) -> Any:
        if name in ("insert", "pop", "remove", "clear", "sort", "reverse"):
            raise AttributeError(
                f"batch_intermediates.{name}: a cache's batches keep their indices; use "
                "cache.append(values), cache.update(batch_index, values) or "
                "cache.delete(batch_index, names)"
            )
        raise AttributeError(name)

    def __repr__(self) -> str:
        return f"<batch_intermediates of a spillcache cache: {len(self)} batches>"
