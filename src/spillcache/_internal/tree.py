"""Nested values <-> (spec, tensor leaves, opaque leaves). Pure: no I/O, no state.

A *spec* describes a value's shape with tensors and unknown objects replaced by leaf
indices. Specs are plain tuples in RAM (classes kept as objects, so dataclasses come
back as their own type) and convert to JSON for the store (classes named by module and
qualified name). A store is data, never a program: reading one looks classes up only
among modules already imported (never through a module's ``__getattr__``), checks every
node against the grammar ``spec_to_json`` writes (``StructureError`` otherwise), and
rebuilds a stored dataclass or namedtuple field by field (``StoredClass``) without
calling its ``__new__``, ``__init__`` or ``__post_init__``.

Spec nodes::

    ("tensor", i)                    i indexes the tensor leaves
    ("value", v)                     v is None, bool, int, float or str
    ("dtype", torch.dtype) | ("device", torch.device)
    ("tuple", cls | None, [node])    cls set for namedtuples
    ("list", [node])
    ("dict", cls | None, [(key_node, node)])
    ("dataclass", cls, [(field_name, node)])
    ("opaque", i)                    i indexes the opaque leaves (kept as they are, in RAM)

A class read from JSON is a ``StoredClass(cls)`` in place of ``cls``.

``IntermediateValue`` is the stock cache's wrapper of a value and the device to onload
it to (accepted wherever the stock cache accepts it: a ``batch_intermediates`` list
passed to the constructor); ``flatten`` unwraps it, spillcache's or llm-compressor's
own (``is_intermediate_value``), its device becoming the onload device of the tensors
inside.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = [
    "Flat",
    "IntermediateValue",
    "StoredClass",
    "StructureError",
    "TensorLeaf",
    "build_dataclass",
    "flatten",
    "is_intermediate_value",
    "spec_from_json",
    "spec_to_json",
    "unflatten",
]

_PRIMITIVES = (type(None), bool, int, float, str)


@dataclasses.dataclass
class IntermediateValue:
    """An offloaded value and the device to onload it to.

    :param value: an offloaded tensor, a primitive, or a nested value (possibly made
        of further IntermediateValues)
    :param device: for a tensor, the device to onload it to; otherwise None
    """

    value: torch.Tensor | IntermediateValue | Any
    device: torch.device | None


def is_intermediate_value(node: Any) -> bool:
    """Whether ``node`` is an IntermediateValue: spillcache's, or llm-compressor's own
    (a dataclass of that name with the same two fields), as the stock class's
    ``_offload_value`` makes them."""
    if isinstance(node, IntermediateValue):
        return True
    cls = type(node)
    return (
        cls.__name__ == "IntermediateValue"
        and dataclasses.is_dataclass(cls)
        and [f.name for f in dataclasses.fields(cls)] == ["value", "device"]
    )


class TensorLeaf(NamedTuple):
    tensor: torch.Tensor
    onload_device: torch.device


class Flat(NamedTuple):
    spec: tuple
    tensors: list[TensorLeaf]
    opaques: list[Any]


class StoredClass(NamedTuple):
    """A dataclass or namedtuple named by a stored structure. Its values are rebuilt
    field by field: calling a class a store names, with values from the store, would
    run its code (a side effect in ``__post_init__``, say) on data from disk."""

    cls: type


class StructureError(ValueError):
    """A stored structure is not what ``spec_to_json`` writes."""


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
    if is_intermediate_value(node):
        device = onload if node.device is None else _onload_device(node.device)
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
        _refuse_unbuildable(type(node))
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


def _onload_device(device: Any) -> torch.device:
    # The stock class takes IntermediateValue(t, "cpu") (it only calls t.to(device));
    # the cache reads the onload device's .type, so a str becomes a device here.
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"IntermediateValue: device {device!r} is not a torch device; give one such as "
            "'cpu' or 'cuda:0', or None (the cache's onload device)"
        ) from None


def _refuse_unbuildable(cls: type) -> None:
    problem = _unbuildable_because(cls)
    if problem is not None:  # stored, it would fail every fetch of its batch instead
        name = cls.__qualname__
        raise TypeError(
            f"cannot store a {name}: a fetch rebuilds it as {name}(**its init fields), "
            f"which fails ({problem}); the stock cache refuses it too"
        )


@functools.lru_cache(maxsize=1024)  # once per class: update calls this for every instance
def _unbuildable_because(cls: type) -> str | None:
    """Why ``build_dataclass`` cannot call ``cls`` with its init fields (an InitVar
    without a default, an ``__init__`` of its own), or None."""
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    try:
        inspect.signature(cls).bind(**dict.fromkeys(names))
    except TypeError as error:
        return str(error)
    except ValueError:  # no signature to read: the call itself will say
        return None
    return None


def unflatten(
    spec: tuple, tensors: list[Any], opaques: list[Any], wrap: Callable[[Any], Any] | None = None
) -> Any:
    """Rebuild a value from its spec and leaves (the inverse of ``flatten``).

    With ``wrap``, every node but a tensor leaf (the caller wraps those) and a dict key
    is passed through it once built: how ``batch_intermediates`` shows a stored value as
    the stock cache's tree of IntermediateValues."""
    kind = spec[0]
    if kind == "tensor":
        return tensors[spec[1]]
    node = _node(spec, tensors, opaques, wrap)
    return node if wrap is None else wrap(node)


def _node(spec: tuple, tensors: list[Any], opaques: list[Any], wrap) -> Any:
    kind = spec[0]
    if kind in ("value", "dtype", "device"):
        return spec[1]
    if kind == "opaque":
        return opaques[spec[1]]
    if kind == "list":
        return [unflatten(child, tensors, opaques, wrap) for child in spec[1]]
    if kind == "tuple":
        items = [unflatten(child, tensors, opaques, wrap) for child in spec[2]]
        if spec[1] is None:
            return tuple(items)
        if isinstance(spec[1], StoredClass):
            return tuple.__new__(spec[1].cls, items)
        return spec[1](*items)
    if kind == "dict":
        pairs = [
            (unflatten(k, tensors, opaques), unflatten(v, tensors, opaques, wrap))
            for k, v in spec[2]
        ]
        return dict(pairs) if spec[1] is None else spec[1](pairs)
    if kind == "dataclass":
        values = {name: unflatten(child, tensors, opaques, wrap) for name, child in spec[2]}
        if isinstance(spec[1], StoredClass):
            return _rebuild_dataclass(spec[1].cls, values)
        return build_dataclass(spec[1], values)
    raise ValueError(f"unknown spec node {kind!r}")


def build_dataclass(cls: type, values: dict[str, Any]) -> Any:
    # Build through __init__ so __post_init__ runs (transformers' ModelOutput fills its
    # dict view there); fields outside __init__ are set afterwards, frozen or not.
    init_names = {f.name for f in dataclasses.fields(cls) if f.init}
    instance = cls(**{k: v for k, v in values.items() if k in init_names})
    for name, value in values.items():
        if name not in init_names:
            object.__setattr__(instance, name, value)
    return instance


def _rebuild_dataclass(cls: type, values: dict[str, Any]) -> Any:
    """An instance of ``cls`` with ``values`` as its fields, none of its code run:
    made by the first built-in ``__new__`` of its bases, fields set as
    ``object.__setattr__`` sets them (frozen or slotted classes too)."""
    instance = _bare_new(cls)(cls)
    for name, value in values.items():
        object.__setattr__(instance, name, value)
    if isinstance(instance, dict):  # a ModelOutput: its __post_init__ fills this view
        setitem = OrderedDict.__setitem__ if isinstance(instance, OrderedDict) else dict.__setitem__
        for field in dataclasses.fields(cls):
            if values.get(field.name) is not None:
                setitem(instance, field.name, values[field.name])
    return instance


def _bare_new(cls: type) -> Callable[[type], Any]:
    # A __new__ written in Python is the class's code: skip to the built-in one below it.
    for base in cls.__mro__:
        new = vars(base).get("__new__")
        if isinstance(new, types.BuiltinFunctionType):
            return new
    return object.__new__  # pragma: no cover - every class has object in its MRO


def _class_name(cls: type | StoredClass) -> str:
    if isinstance(cls, StoredClass):
        cls = cls.cls
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(name: str) -> type | None:
    """Find an already-imported class by 'module:qualname'; never import anything.

    ``getattr_static``: a module's ``__getattr__`` (lazy modules, as transformers has)
    may import or run anything, so it is never called.
    """
    module_name, _, qualname = name.partition(":")
    target: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        if target is None:
            return None
        target = inspect.getattr_static(target, part, None)
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
            # Decimal for people; hex past Python's 4300-digit str() limit. int's own
            # repr: an (int, Enum) member's str() is "Kind.A", which no reader takes.
            text = int.__repr__(value) if value.bit_length() < 13_000 else hex(value)
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


def spec_from_json(node: Any, tensor_leaf: Callable[[dict], int | None]) -> tuple:
    """The inverse of ``spec_to_json``; ``tensor_leaf(node)`` returns the leaf index
    (None: a tensor the store does not hold, which comes back as None).

    Every node is checked against the grammar ``spec_to_json`` writes:
    ``StructureError`` says what is wrong where. Classes that are not already imported
    (or do not match the stored fields) come back as the plain container (a dataclass
    as a dict of its fields, a namedtuple as a tuple), with a warning; those that are
    come back as ``StoredClass``, rebuilt without running their code.
    """
    kind = _field(node, "type", str, "a node")
    if kind == "tensor":
        index = tensor_leaf(node)
        return ("value", None) if index is None else ("tensor", index)
    if kind in ("none", "opaque"):
        return ("value", None)
    if kind == "bool":
        return ("value", _field(node, "value", bool, kind))
    if kind == "int":
        return ("value", _parsed(node, int, kind, "an integer", base=0))
    if kind == "float":
        return ("value", _parsed(node, float.fromhex, kind, "a float.hex() string"))
    if kind == "str":
        return ("value", _field(node, "value", str, kind))
    if kind == "dtype":
        name = _field(node, "value", str, kind)
        dtype = inspect.getattr_static(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise StructureError(f"a 'dtype' node names {_shown(name)}, not a torch dtype")
        return ("dtype", dtype)
    if kind == "device":
        return ("device", _parsed(node, torch.device, kind, "a torch device"))
    if kind == "list":
        return ("list", [spec_from_json(c, tensor_leaf) for c in _field(node, "items", list, kind)])
    if kind == "tuple":
        items = [spec_from_json(c, tensor_leaf) for c in _field(node, "items", list, kind)]
        cls = _class_or_none(node, _is_namedtuple, lambda cls: len(cls._fields) == len(items))
        return ("tuple", cls if cls is None else StoredClass(cls), items)
    if kind == "dict":
        items = [
            (spec_from_json(k, tensor_leaf), spec_from_json(v, tensor_leaf))
            for k, v in _pairs(node, "items", kind, lambda key: key)
        ]
        if not all(_hashable(key) for key, _ in items):  # building the dict would fail
            raise StructureError("a 'dict' node has a key no dict can have (a list, a dict)")
        return ("dict", _class_or_none(node, lambda cls: cls is OrderedDict), items)
    if kind == "dataclass":
        fields = [
            (name, spec_from_json(c, tensor_leaf))
            for name, c in _pairs(node, "fields", kind, _field_name)
        ]
        names = [name for name, _ in fields]
        if len(set(names)) != len(names):
            raise StructureError(f"a 'dataclass' node names a field twice: {names}")
        cls = _class_or_none(
            node,
            dataclasses.is_dataclass,
            lambda cls: {f.name for f in dataclasses.fields(cls)} == set(names),
        )
        if cls is None:
            return ("dict", None, [(("value", name), child) for name, child in fields])
        return ("dataclass", StoredClass(cls), fields)
    raise StructureError(f"unknown node type {_shown(kind)} in stored structure")


def _shown(value: Any, limit: int = 60) -> str:
    """A stored value in a message: its repr, cut short (a store may hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _field(node: Any, name: str, kind: type, what: str) -> Any:
    if not isinstance(node, dict):
        raise StructureError(f"{what} is {type(node).__name__} {_shown(node)}, not an object")
    value = node.get(name)
    # bool is an int subclass, and an int is no bool: the type must be exact.
    if type(value) is not kind:
        raise StructureError(
            f"a {_shown(what)} node's {name!r} is {_shown(value)}, not a {kind.__name__}"
        )
    return value


def _parsed(node: dict, parse: Callable[..., Any], kind: str, meaning: str, **options) -> Any:
    text = _field(node, "value", str, kind)
    try:
        return parse(text, **options)
    except (ValueError, TypeError, RuntimeError, OverflowError):
        raise StructureError(f"a {kind!r} node's value {_shown(text)} is not {meaning}") from None


def _hashable(spec: tuple) -> bool:
    """Whether what ``spec`` builds hashes, as a dict key must: a tuple (or namedtuple)
    or frozen dataclass of such does, a list, a dict or another dataclass does not."""
    kind = spec[0]
    if kind == "tuple" or (kind == "dataclass" and spec[1].cls.__hash__ is not None):
        return all(_hashable(child if kind == "tuple" else child[1]) for child in spec[2])
    return kind in ("value", "dtype", "device", "tensor")


def _pairs(node: dict, name: str, kind: str, first: Callable[[Any], Any]) -> list[tuple]:
    pairs = _field(node, name, list, kind)
    if not all(type(pair) is list and len(pair) == 2 for pair in pairs):
        raise StructureError(f"a {kind!r} node's {name!r} are not all [key, value] pairs")
    return [(first(a), b) for a, b in pairs]


def _field_name(name: Any) -> str:
    if type(name) is not str or not name.isidentifier():
        raise StructureError(f"a 'dataclass' node names a field {_shown(name)}")
    return name


def _is_namedtuple(cls: type) -> bool:
    fields = inspect.getattr_static(cls, "_fields", None)
    return issubclass(cls, tuple) and isinstance(fields, tuple)


def _class_or_none(
    node: dict,
    allowed: Callable[[type], bool],
    fits: Callable[[type], bool] = lambda cls: True,
) -> type | None:
    """The node's class if it is imported, of the kind the node allows and fits the
    stored items (a namedtuple's length, a dataclass's field names), else None.

    ``allowed`` matters for safety: a store must never name an arbitrary class (say
    ``subprocess:Popen``) and have it built from stored data.
    """
    if "class" not in node:
        return None
    name = node["class"]
    if type(name) is not str:
        raise StructureError(f"a {node['type']!r} node's 'class' is {_shown(name)}, not a str")
    cls = _resolve_class(name)
    shown = name if name.isprintable() and len(name) <= 100 else _shown(name)  # in a warning
    if cls is None or not allowed(cls):
        warnings.warn(
            f"class {shown} is not imported or not a {node['type']} class; returning "
            "a plain container instead (import its module first to get the class back)",
            stacklevel=3,
        )
        return None
    if not fits(cls):
        warnings.warn(
            f"class {shown} does not have the fields the store gives (the class "
            "changed since the store was written?); returning a plain container instead",
            stacklevel=3,
        )
        return None
    return cls
