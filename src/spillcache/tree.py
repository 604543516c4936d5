"""Nested values <-> (spec, tensor leaves, opaque leaves). Pure: no I/O, no state.

A *spec* describes a value's shape with tensors and unknown objects replaced by leaf
indices. Specs are plain tuples in RAM (classes kept as objects, so dataclasses come
back as their own type) and convert to JSON for the store (classes named by module and
qualified name, looked up only among modules already imported: opening a store never
imports or runs code named in it).

Spec nodes::

    ("tensor", i)                    i indexes the tensor leaves
    ("value", v)                     v is None, bool, int, float or str
    ("dtype", torch.dtype) | ("device", torch.device)
    ("tuple", cls | None, [node])    cls set for namedtuples
    ("list", [node])
    ("dict", cls | None, [(key_node, node)])
    ("dataclass", cls, [(field_name, node)])
    ("opaque", i)                    i indexes the opaque leaves (kept as they are, in RAM)
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .values import IntermediateValue

__all__ = ["Flat", "TensorLeaf", "flatten", "spec_from_json", "spec_to_json", "unflatten"]

_PRIMITIVES = (type(None), bool, int, float, str)


class TensorLeaf(NamedTuple):
    tensor: torch.Tensor
    onload_device: torch.device


class Flat(NamedTuple):
    spec: tuple
    tensors: list[TensorLeaf]
    opaques: list[Any]


def flatten(value: Any, onload_device: torch.device | None = None) -> Flat:
    """Split ``value`` into a spec and its leaves (IntermediateValue wrappers unwrapped).

    A tensor's onload device is the one named by the innermost IntermediateValue
    around it, else ``onload_device``, else the device it is on.
    """
    tensors: list[TensorLeaf] = []
    opaques: list[Any] = []
    spec = _visit(value, onload_device, tensors, opaques)
    return Flat(spec, tensors, opaques)


def _visit(node: Any, onload: torch.device | None, tensors: list, opaques: list) -> tuple:
    # A module-level function, not a closure: a recursive closure is a reference cycle
    # (function -> cell -> function) that would keep every tensor it saw alive until
    # the cyclic garbage collector happens to run.
    if isinstance(node, IntermediateValue):
        device = node.device if node.device is not None else onload
        return _visit(node.value, device, tensors, opaques)
    if isinstance(node, torch.Tensor):
        tensors.append(TensorLeaf(node, onload if onload is not None else node.device))
        return ("tensor", len(tensors) - 1)
    if isinstance(node, _PRIMITIVES):
        return ("value", node)
    if isinstance(node, torch.dtype):
        return ("dtype", node)
    if isinstance(node, torch.device):
        return ("device", node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        items = [
            (f.name, _visit(getattr(node, f.name), onload, tensors, opaques))
            for f in dataclasses.fields(node)
        ]
        return ("dataclass", type(node), items)
    if isinstance(node, tuple):
        cls = type(node) if type(node) is not tuple and hasattr(node, "_fields") else None
        if type(node) is tuple or cls is not None:
            return ("tuple", cls, [_visit(item, onload, tensors, opaques) for item in node])
    if type(node) is list:
        return ("list", [_visit(item, onload, tensors, opaques) for item in node])
    if type(node) in (dict, OrderedDict):
        cls = None if type(node) is dict else OrderedDict
        items = [
            (_visit(k, onload, tensors, opaques), _visit(v, onload, tensors, opaques))
            for k, v in node.items()
        ]
        return ("dict", cls, items)
    warnings.warn(
        f"spillcache cannot offload values of type {type(node).__qualname__}; "
        "keeping this one as it is, in RAM",
        stacklevel=4,
    )
    opaques.append(node)
    return ("opaque", len(opaques) - 1)


def unflatten(spec: tuple, tensors: list[Any], opaques: list[Any]) -> Any:
    """Rebuild a value from its spec and leaves (the inverse of ``flatten``)."""
    kind = spec[0]
    if kind == "tensor":
        return tensors[spec[1]]
    if kind in ("value", "dtype", "device"):
        return spec[1]
    if kind == "opaque":
        return opaques[spec[1]]
    if kind == "list":
        return [unflatten(child, tensors, opaques) for child in spec[1]]
    if kind == "tuple":
        items = [unflatten(child, tensors, opaques) for child in spec[2]]
        return tuple(items) if spec[1] is None else spec[1](*items)
    if kind == "dict":
        pairs = [
            (unflatten(k, tensors, opaques), unflatten(v, tensors, opaques)) for k, v in spec[2]
        ]
        return dict(pairs) if spec[1] is None else spec[1](pairs)
    if kind == "dataclass":
        values = {name: unflatten(child, tensors, opaques) for name, child in spec[2]}
        return _build_dataclass(spec[1], values)
    raise ValueError(f"unknown spec node {kind!r}")


def _build_dataclass(cls: type, values: dict[str, Any]) -> Any:
    # Build through __init__ so __post_init__ runs (transformers' ModelOutput fills its
    # dict view there); fields outside __init__ are set afterwards, frozen or not.
    init_names = {f.name for f in dataclasses.fields(cls) if f.init}
    instance = cls(**{k: v for k, v in values.items() if k in init_names})
    for name, value in values.items():
        if name not in init_names:
            object.__setattr__(instance, name, value)
    return instance


def iter_tensor_indices(spec: tuple):
    """Yield the tensor leaf indices a spec refers to, in order."""
    kind = spec[0]
    if kind == "tensor":
        yield spec[1]
    elif kind == "list":
        for child in spec[1]:
            yield from iter_tensor_indices(child)
    elif kind == "tuple":
        for child in spec[2]:
            yield from iter_tensor_indices(child)
    elif kind == "dict":
        for key, child in spec[2]:
            yield from iter_tensor_indices(key)
            yield from iter_tensor_indices(child)
    elif kind == "dataclass":
        for _, child in spec[2]:
            yield from iter_tensor_indices(child)


# ---------------------------------------------------------------------- JSON


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type | None:
    """Find an already-imported class by 'module:qualname'; never import anything."""
    module_name, _, qualname = name.partition(":")
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return target if isinstance(target, type) else None


def spec_to_json(spec: tuple, tensor_json: Callable[[int], dict]) -> dict:
    """A JSON-able form of ``spec``; ``tensor_json(i)`` describes tensor leaf i."""
    kind = spec[0]
    if kind == "tensor":
        return {"type": "tensor", **tensor_json(spec[1])}
    if kind == "value":
        value = spec[1]
        if value is None:
            return {"type": "none"}
        if isinstance(value, bool):
            return {"type": "bool", "value": value}
        if isinstance(value, int):
            # Decimal for people; hex past Python's 4300-digit str() limit.
            text = str(value) if value.bit_length() < 13_000 else hex(value)
            return {"type": "int", "value": text}
        if isinstance(value, float):
            return {"type": "float", "value": value.hex()}
        return {"type": "str", "value": value}
    if kind == "dtype":
        return {"type": "dtype", "value": str(spec[1]).removeprefix("torch.")}
    if kind == "device":
        return {"type": "device", "value": str(spec[1])}
    if kind == "opaque":
        return {"type": "opaque", "note": "kept in RAM only; not stored"}
    if kind == "list":
        return {"type": "list", "items": [spec_to_json(c, tensor_json) for c in spec[1]]}
    if kind == "tuple":
        node = {"type": "tuple", "items": [spec_to_json(c, tensor_json) for c in spec[2]]}
        return node if spec[1] is None else {**node, "class": _class_name(spec[1])}
    if kind == "dict":
        items = [[spec_to_json(k, tensor_json), spec_to_json(v, tensor_json)] for k, v in spec[2]]
        node = {"type": "dict", "items": items}
        return node if spec[1] is None else {**node, "class": _class_name(spec[1])}
    if kind == "dataclass":
        return {
            "type": "dataclass",
            "class": _class_name(spec[1]),
            "fields": [[name, spec_to_json(c, tensor_json)] for name, c in spec[2]],
        }
    raise ValueError(f"unknown spec node {kind!r}")


def spec_from_json(node: dict, tensor_leaf: Callable[[dict], int]) -> tuple:
    """The inverse of ``spec_to_json``; ``tensor_leaf(node)`` returns the leaf index.

    Classes that are not already imported come back as the plain container (a
    dataclass as a dict of its fields, a namedtuple as a tuple), with a warning.
    """
    kind = node["type"]
    if kind == "tensor":
        return ("tensor", tensor_leaf(node))
    if kind == "none":
        return ("value", None)
    if kind == "bool":
        return ("value", bool(node["value"]))
    if kind == "int":
        return ("value", int(node["value"], 0))
    if kind == "float":
        return ("value", float.fromhex(node["value"]))
    if kind == "str":
        return ("value", str(node["value"]))
    if kind == "dtype":
        return ("dtype", getattr(torch, node["value"]))
    if kind == "device":
        return ("device", torch.device(node["value"]))
    if kind == "opaque":
        return ("value", None)
    if kind == "list":
        return ("list", [spec_from_json(c, tensor_leaf) for c in node["items"]])
    if kind == "tuple":
        items = [spec_from_json(c, tensor_leaf) for c in node["items"]]
        return ("tuple", _class_or_none(node, _is_namedtuple), items)
    if kind == "dict":
        items = [
            (spec_from_json(k, tensor_leaf), spec_from_json(v, tensor_leaf))
            for k, v in node["items"]
        ]
        return ("dict", _class_or_none(node, lambda cls: cls is OrderedDict), items)
    if kind == "dataclass":
        fields = [(name, spec_from_json(c, tensor_leaf)) for name, c in node["fields"]]
        cls = _class_or_none(node, dataclasses.is_dataclass)
        if cls is None:
            return ("dict", None, [(("value", name), child) for name, child in fields])
        return ("dataclass", cls, fields)
    raise ValueError(f"unknown node type {kind!r} in stored structure")


def _is_namedtuple(cls: type) -> bool:
    return issubclass(cls, tuple) and hasattr(cls, "_fields")


def _class_or_none(node: dict, allowed: Callable[[type], bool]) -> type | None:
    """The node's class if it is imported and of the kind the node allows, else None.

    ``allowed`` matters for safety: unflatten calls the class with stored data, so a
    store must not be able to name an arbitrary callable (say ``subprocess:Popen``).
    """
    name = node.get("class")
    if name is None:
        return None
    cls = _resolve_class(name)
    if cls is None or not allowed(cls):
        warnings.warn(
            f"class {name} is not imported or not a {node['type']} class; returning a "
            "plain container instead (import its module first to get the class back)",
            stacklevel=3,
        )
        return None
    return cls
