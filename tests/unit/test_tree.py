"""flatten/unflatten and the JSON form of specs: exact round trips, leaves, safety."""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import sys
from collections import OrderedDict, namedtuple
from dataclasses import dataclass, field

import pytest
import torch

from spillcache._internal.tree import (
    IntermediateValue,
    StoredClass,
    TensorLeaf,
    flatten,
    spec_from_json,
    spec_to_json,
    unflatten,
)

Point = namedtuple("Point", ["x", "y"])


@dataclass
class Plain:
    a: object
    b: object = None


@dataclass(frozen=True)
class Frozen:
    a: object
    b: object = 1


@dataclass
class Derived:
    """A field outside __init__, normally computed by __post_init__."""

    a: int
    doubled: int = field(init=False)

    def __post_init__(self):
        self.doubled = self.a * 2


@dataclass(frozen=True)
class FrozenDerived:
    a: int
    doubled: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "doubled", self.a * 2)


class Unknown:
    pass


CALLS: list = []


class Boom:  # neither a namedtuple nor a dict: a stored spec must never get it called
    def __init__(self, *args):
        CALLS.append(args)


@dataclass
class Mapped(OrderedDict):
    """As transformers' ModelOutput: a dataclass and an OrderedDict, whose
    __post_init__ makes each field that is set a key too."""

    a: object = None
    b: object = None
    c: object = None

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is not None:
                self[f.name] = getattr(self, f.name)


@dataclass
class WithInitVar:
    x: object
    scale: dataclasses.InitVar[float]


@dataclass
class OwnInit:
    x: object

    def __init__(self, value):
        self.x = value


class Kind(int, enum.Enum):  # an int mixin, not an IntEnum: str(Kind.A) is "Kind.A"
    A = 1


def assert_same(actual, expected):
    """Same types all the way down; tensors identical objects; floats bit-exact."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, torch.Tensor):
        assert actual is expected
    elif isinstance(expected, float):
        assert actual.hex() == expected.hex()
        assert math.copysign(1.0, actual) == math.copysign(1.0, expected)
    elif dataclasses.is_dataclass(expected):
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name))
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_same(a, e)
    elif isinstance(expected, dict):
        assert len(actual) == len(expected)
        for (ak, av), (ek, ev) in zip(actual.items(), expected.items(), strict=True):
            assert_same(ak, ek)
            assert_same(av, ev)
    else:
        assert actual == expected


def roundtrip(value, **kwargs):
    flat = flatten(value, **kwargs)
    return unflatten(flat.spec, [leaf.tensor for leaf in flat.tensors], flat.opaques)


def json_roundtrip(value):
    """flatten -> spec_to_json -> JSON text -> spec_from_json -> unflatten."""
    flat = flatten(value)
    text = json.dumps(spec_to_json(flat.spec, lambda i: {"leaf": i}))
    spec = spec_from_json(json.loads(text), lambda node: node["leaf"])
    return unflatten(spec, [leaf.tensor for leaf in flat.tensors], flat.opaques)


T1, T2, T3 = torch.arange(4.0), torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor(7)

VALUES = {
    "tensor": T1,
    "none": None,
    "true": True,
    "false": False,
    "int": -42,
    "big_int": 2**64 + 12345,
    "neg_big_int": -(3**90),
    "float": 0.1,
    "nan": float("nan"),
    "inf": float("inf"),
    "neg_inf": float("-inf"),
    "neg_zero": -0.0,
    "subnormal": 5e-324,
    "max_float": sys.float_info.max,
    "str": 'héllo ✓ 𝔘 \x00 "q" \\',
    "empty_str": "",
    "dtype": torch.bfloat16,
    "device_cpu": torch.device("cpu"),
    "device_cuda1": torch.device("cuda", 1),
    "device_meta": torch.device("meta"),
    "tuple": (T1, 1, "a"),
    "empty_tuple": (),
    "list": [T1, T2, [T3, None]],
    "dict": {"a": T1, 1: 2.5, (1, 2): [T2], None: False, 1.5: "x"},
    "ordered_dict": OrderedDict([("z", T1), ("a", T2)]),
    "namedtuple": Point(T1, Point(1, -0.0)),
    "dataclass": Plain(T1, {"k": [T2]}),
    "frozen_dataclass": Frozen(Plain(T1), (T2, T3)),
    "derived": Derived(3),
    "frozen_derived": FrozenDerived(4),
    "nested": {"out": [Plain(Point(T1, {"h": (T2,)}), Frozen(T3))], "meta": (torch.int8, None)},
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_roundtrip_in_ram(name):
    assert_same(roundtrip(VALUES[name]), VALUES[name])


@pytest.mark.parametrize("name", sorted(VALUES))
def test_roundtrip_through_json(name):
    assert_same(json_roundtrip(VALUES[name]), VALUES[name])


@pytest.mark.parametrize("cls", [Derived, FrozenDerived])
def test_init_false_field_keeps_stored_value(cls):
    """A field outside __init__ comes back as stored, not as __post_init__ recomputes it."""
    value = cls(5)
    object.__setattr__(value, "doubled", 99)
    assert roundtrip(value).doubled == 99
    assert json_roundtrip(value).doubled == 99


@pytest.mark.parametrize("source", ["like_model_output", "transformers"])
def test_a_dataclass_that_is_a_mapping_comes_back_from_json_with_its_keys(source):
    """A ModelOutput is read back without running its __post_init__, which fills its
    mapping view: the view is rebuilt as it fills it (each field that is not None, in
    field order), so out["name"], out[0] and out.keys() work as on the original."""
    if source == "transformers":
        outputs = pytest.importorskip("transformers.modeling_outputs")
        value = outputs.BaseModelOutputWithPast(last_hidden_state=T1, hidden_states=(T2,))
    else:
        value = Mapped(c=T2, a=T1)
    back = json_roundtrip(value)
    assert type(back) is type(value)
    assert list(back.keys()) == list(value.keys())
    for name in value:
        assert_same(back[name], value[name])
    if source == "transformers":  # its int index reads the mapping view too
        assert_same(back[0], T1)
        assert_same(back.to_tuple()[1][0], T2)


def test_all_torch_dtypes_survive_json():
    dtypes = sorted({d for d in vars(torch).values() if isinstance(d, torch.dtype)}, key=str)
    assert len(dtypes) > 10
    assert json_roundtrip(dtypes) == dtypes


def test_shared_tensor_gives_one_leaf_per_occurrence():
    flat = flatten([T1, {"again": T1}])
    assert len(flat.tensors) == 2 and all(leaf.tensor is T1 for leaf in flat.tensors)
    rebuilt = unflatten(flat.spec, [T1, T1], [])
    assert rebuilt[0] is T1 and rebuilt[1]["again"] is T1


# ------------------------------------------------------------- IntermediateValue

META, CPU = torch.device("meta"), torch.device("cpu")


def test_intermediate_value_sets_onload_device_and_is_unwrapped():
    flat = flatten(IntermediateValue(T1, META))
    assert flat.spec == ("tensor", 0)
    assert flat.tensors == [TensorLeaf(T1, META)]
    assert flat.tensors[0].tensor is T1
    assert roundtrip(IntermediateValue(T1, META)) is T1


def test_nested_intermediate_values_innermost_device_wins():
    flat = flatten(IntermediateValue(IntermediateValue(T1, CPU), META))
    assert flat.tensors[0].onload_device == CPU
    flat = flatten(IntermediateValue(IntermediateValue(T1, None), META))
    assert flat.tensors[0].onload_device == META, "a None device inherits the outer one"
    assert roundtrip(IntermediateValue(IntermediateValue(T1, None), META)) is T1


def test_intermediate_value_device_applies_to_nested_tensors():
    value = IntermediateValue({"a": [T1, T2], "n": IntermediateValue(3, None)}, META)
    flat = flatten(value)
    assert [leaf.onload_device for leaf in flat.tensors] == [META, META]
    assert_same(roundtrip(value), {"a": [T1, T2], "n": 3})


def test_onload_device_argument():
    """flatten(onload_device=X) applies to bare tensors; wrapped ones keep their own."""
    flat = flatten([T1, IntermediateValue(T2, CPU)], onload_device=META)
    assert [leaf.onload_device for leaf in flat.tensors] == [META, CPU]
    assert flatten(T1).tensors[0].onload_device == T1.device
    meta_tensor = torch.empty(2, device="meta")
    assert flatten(meta_tensor).tensors[0].onload_device == META


def test_intermediate_values_in_a_list():
    value = [IntermediateValue(T1, META), IntermediateValue(None, None), IntermediateValue(T2, CPU)]
    flat = flatten(value)
    assert [leaf.onload_device for leaf in flat.tensors] == [META, CPU]
    assert_same(roundtrip(value), [T1, None, T2])


def test_an_intermediate_value_device_given_as_text_becomes_a_torch_device():
    """The stock class takes IntermediateValue(t, "cpu"); the onload device is read as
    a torch.device (its .type) at every fetch, so text is made one, and text that names
    no device is refused when flattened, before anything is stored."""
    flat = flatten([IntermediateValue(T1, "cpu"), IntermediateValue(T2, "meta")])
    assert [leaf.onload_device for leaf in flat.tensors] == [CPU, META]
    assert all(type(leaf.onload_device) is torch.device for leaf in flat.tensors)
    with pytest.raises(ValueError, match="IntermediateValue: device 'gpu0' is not a torch"):
        flatten({"x": IntermediateValue(T1, "gpu0")})


# ------------------------------------------------------------- opaque leaves


def test_unknown_object_becomes_opaque_leaf_with_warning():
    obj = Unknown()
    with pytest.warns(UserWarning, match="cannot offload values of type Unknown"):
        flat = flatten({"x": obj, "t": T1})
    assert flat.opaques == [obj] and flat.opaques[0] is obj
    assert flat.spec[2][0][1] == ("opaque", 0)
    rebuilt = unflatten(flat.spec, [T1], flat.opaques)
    assert rebuilt["x"] is obj and rebuilt["t"] is T1


def test_containers_subclasses_are_opaque():
    """Only exact list/dict/OrderedDict/tuple/namedtuple are traversed."""
    size = torch.Size([2, 3])
    with pytest.warns(UserWarning, match="Size"):
        flat = flatten(size)
    assert flat.spec == ("opaque", 0) and flat.opaques[0] is size


def test_opaque_leaf_is_not_stored_in_json():
    with pytest.warns(UserWarning):
        flat = flatten([Unknown(), 1])
    node = json.loads(json.dumps(spec_to_json(flat.spec, lambda i: {"leaf": i})))
    assert node["items"][0]["type"] == "opaque"
    assert unflatten(spec_from_json(node, lambda n: n["leaf"]), [], []) == [None, 1]


# ------------------------------------------------------------- tensor indices


def test_tensor_leaves_are_numbered_in_visiting_order():
    value = [T1, {"k": T2, T3: "tensor key"}, Plain(None, Point(3, T1)), "s", Unknown()]
    with pytest.warns(UserWarning):
        flat = flatten(value)
    assert [id(leaf.tensor) for leaf in flat.tensors] == [id(T1), id(T2), id(T3), id(T1)]
    assert flatten({"no": ("tensors", 1.0)}).tensors == []


def test_a_spec_from_json_takes_the_tensor_indices_it_is_given():
    node = spec_to_json(flatten([T1, (T2,)]).spec, lambda i: {"leaf": i + 10})
    assert unflatten(spec_from_json(node, lambda n: n["leaf"]), {10: "a", 11: "b"}, []) == [
        "a",
        ("b",),
    ]


# ------------------------------------------------------------- JSON details


def test_json_ints_and_floats_are_exact():
    values = [2**64 + 1, -(2**200) - 1, 0.1, 1 / 3, -0.0, float("nan"), 5e-324, True, 1]
    node = json.loads(json.dumps(spec_to_json(flatten(values).spec, lambda i: {})))
    assert [item["type"] for item in node["items"]] == ["int"] * 2 + ["float"] * 5 + ["bool", "int"]
    back = unflatten(spec_from_json(node, lambda n: 0), [], [])
    assert back[:2] == [2**64 + 1, -(2**200) - 1]
    assert [x.hex() for x in back[2:7]] == [x.hex() for x in values[2:7]]
    assert math.copysign(1.0, back[4]) == -1.0
    assert back[7] is True and type(back[8]) is int


def test_an_int_enum_member_is_stored_as_its_number():
    """An (int, Enum) member's str() is "Kind.A": written as that, no reader (nor a
    kept store's open) would take it back. Its number is written instead."""
    node = spec_to_json(flatten([Kind.A]).spec, lambda i: {})
    assert node["items"] == [{"type": "int", "value": "1"}]
    back = json_roundtrip({"kind": Kind.A})
    assert back == {"kind": 1} and type(back["kind"]) is int


def test_json_huge_int():
    assert json_roundtrip([10**5000]) == [10**5000]


def _dataclass_json(class_name):
    node = spec_to_json(flatten(Plain(T1, 2)).spec, lambda i: {"leaf": i})
    assert node["class"].endswith(":Plain")
    return json.loads(json.dumps({**node, "class": class_name}))


@pytest.mark.parametrize("module", ["nosuchmodule", "this"])
def test_unimported_dataclass_comes_back_as_dict_without_importing(module):
    """'this' is a real stdlib module: importing it would show, so nothing may import."""
    if module in sys.modules:
        pytest.skip(f"{module} already imported")
    node = _dataclass_json(f"{module}:Thing")
    with pytest.warns(UserWarning, match=f"{module}:Thing is not imported"):
        spec = spec_from_json(node, lambda n: n["leaf"])
    assert module not in sys.modules
    assert_same(unflatten(spec, [T1], []), {"a": T1, "b": 2})


def test_unimported_namedtuple_comes_back_as_tuple():
    node = spec_to_json(flatten(Point(1, T1)).spec, lambda i: {"leaf": i})
    node = {**node, "class": "nosuchmodule:Point"}
    with pytest.warns(UserWarning, match="nosuchmodule:Point"):
        spec = spec_from_json(node, lambda n: n["leaf"])
    assert_same(unflatten(spec, [T1], []), (1, T1))
    assert "nosuchmodule" not in sys.modules


def test_imported_classes_resolve_from_json():
    node = json.loads(json.dumps(_dataclass_json(f"{Plain.__module__}:Plain")))
    assert spec_from_json(node, lambda n: n["leaf"])[1] == StoredClass(Plain)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_json_class_must_be_a_namedtuple_or_dict(kind):
    CALLS.clear()
    items = [{"type": "str", "value": "echo hi"}]
    node = {
        "type": kind,
        "class": f"{Boom.__module__}:Boom",
        "items": items if kind == "tuple" else [[items[0], items[0]]],
    }
    with pytest.warns(UserWarning, match="not a"):
        spec = spec_from_json(node, lambda n: 0)
    unflatten(spec, [], [])
    assert CALLS == [], "a class named in stored JSON was called"
    assert spec[1] is None


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (WithInitVar(T1, 2.0), "missing a required argument: 'scale'"),
        (OwnInit(T1), "missing a required argument: 'value'"),
    ],
)
def test_a_dataclass_its_fields_cannot_rebuild_is_refused_when_flattened(value, why):
    """A fetch rebuilds a dataclass by calling it with its init fields: a class that
    call fails for (an InitVar without a default, an __init__ of its own) is refused
    when flattened, as the stock class refuses it at update, not stored to fail every
    fetch of its batch."""
    name = type(value).__qualname__
    with pytest.raises(TypeError, match=f"cannot store a {name}: .*{re.escape(why)}"):
        flatten({"fine": T1, "extra": [value]})


def test_unknown_nodes_raise():
    with pytest.raises(ValueError, match="unknown spec node 'bogus'"):
        unflatten(("bogus", 1), [], [])
    with pytest.raises(ValueError, match="unknown node type 'bogus'"):
        spec_from_json({"type": "bogus"}, lambda n: 0)
