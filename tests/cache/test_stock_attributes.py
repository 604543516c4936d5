"""What code written for the stock class reaches past the documented methods (issue 11):
``batch_intermediates``, ``offload_values``, ``_offload_value``, ``_onload_value``,
``IntermediateValue`` and ``OverrideEqMode``, and a cache built with no arguments.

Every test of the view runs with values in RAM and fully spilled (host budget 0,
inline 0), where the spilled run checks that its values really are on disk.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle
import warnings
from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, bits, random_tensor
from spillcache import CacheConfig, IntermediatesCache, IntermediateValue, OverrideEqMode

META = torch.device("meta")  # an onload device other than the CPU, on any machine
CPU = torch.device("cpu")


@dataclass
class Output:
    hidden: torch.Tensor
    layer: int


Pair = namedtuple("Pair", "first second")


@pytest.fixture(params=["ram", "spilled"])
def cache(request, tmp_path):
    if request.param == "ram":
        config = CacheConfig(host_bytes="1GiB", disk_path=None, inline_bytes=0)
    else:
        config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache(None, "cpu", config=config) as made:
        made.spilled = request.param == "spilled"
        yield made


def on_disk(cache: IntermediatesCache) -> None:
    """A spilled cache's values are all on disk (nothing in the host tier)."""
    if cache.spilled:
        cache.flush()
        stats = cache.stats()
        assert stats["host"]["bytes"] == 0 and stats["disk"]["bytes"] > 0, stats


def reads(cache: IntermediatesCache) -> int:
    """Values read from disk so far."""
    return cache.stats()["disk"]["hits"]


def value_of(shown: IntermediateValue):
    """The plain value a shown tree stands for (as the stock class would onload it)."""
    return IntermediatesCache._onload_value(shown)


# ------------------------------------------------------------- the view


def test_a_cache_built_with_no_arguments_has_an_empty_view():
    with IntermediatesCache() as cache:
        assert len(cache.batch_intermediates) == 0
        assert cache.batch_intermediates == []
        assert list(cache.batch_intermediates) == []


def test_the_view_is_a_sequence_of_batches(cache):
    for number in range(3):
        cache.append({"h": torch.full((4,), float(number)), "n": number})
    on_disk(cache)
    view = cache.batch_intermediates
    assert len(view) == 3
    assert [batch["n"].value for batch in view] == [0, 1, 2]
    assert view[-1]["n"].value == 2 and view[-3]["n"].value == 0
    assert [batch["n"].value for batch in view[1:]] == [1, 2]
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range"):
            view[bad]


def test_a_batch_is_a_dict_whose_keys_read_nothing(cache):
    cache.append({"hidden_states": torch.ones(8), "mask": torch.zeros(8, dtype=torch.bool)})
    on_disk(cache)
    hits = reads(cache)
    batch = cache.batch_intermediates[0]
    assert isinstance(batch, dict)  # as llm-compressor's own tests check
    match batch:
        case dict():
            pass
        case _:
            pytest.fail("a batch does not match a dict pattern")
    assert list(batch) == list(batch.keys()) == ["hidden_states", "mask"]
    assert list(reversed(batch)) == list(reversed(batch.keys())) == ["mask", "hidden_states"]
    assert batch.keys() == {"hidden_states", "mask"} and batch.keys() & {"mask"} == {"mask"}
    assert "hidden_states" in batch and "absent" not in batch and len(batch) == 2
    with pytest.raises(TypeError, match="unhashable"):
        [] in batch  # noqa: B015 (as in a dict)
    assert batch.get("absent") is None and batch.get("absent", 5) == 5
    assert reads(cache) == hits  # keys, in, len and get of a miss read nothing
    assert_same(batch.get("mask").value, torch.zeros(8, dtype=torch.bool))
    assert all(isinstance(value, IntermediateValue) for value in batch.values())


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_value_is_the_offloaded_tensor_bit_for_bit_in_every_dtype(cache, dtype):
    tensor = random_tensor(dtype, (5, 7), seed=3)
    cache.append({"h": IntermediateValue(tensor, META)})
    on_disk(cache)
    hits = cache.stats()["disk"]["hits"]
    shown = cache.batch_intermediates[0]["h"]
    assert isinstance(shown, IntermediateValue)
    assert shown.device == META  # where fetch() puts it
    assert shown.value.device == CPU  # where it is offloaded to
    assert_same(shown.value, tensor)
    if cache.spilled:  # building it read the tensor from disk
        assert cache.stats()["disk"]["hits"] == hits + 1


def test_nested_values_are_shaped_as_the_stock_class_shapes_them(cache):
    a, b, c, d = (random_tensor(torch.float32, (3,), seed) for seed in range(4))
    cache.append(
        {
            "tuple": (a, 7),
            "list": [b, "s"],
            "dict": {"k": c},
            "dataclass": Output(d, 2),
            "pair": Pair(a, None),
        }
    )
    on_disk(cache)
    batch = cache.batch_intermediates[0]

    shown = batch["tuple"]
    assert shown.device is None and type(shown.value) is tuple
    assert_same(shown.value[0].value, a)
    assert shown.value[0].device == CPU
    assert shown.value[1] == IntermediateValue(7, None)

    shown = batch["list"]
    assert isinstance(shown.value, list) and shown.device is None
    assert_same(shown.value[0].value, b)
    assert shown.value[1] == IntermediateValue("s", None)

    shown = batch["dict"]
    assert isinstance(shown.value, dict) and list(shown.value) == ["k"]
    assert_same(shown.value["k"].value, c)

    shown = batch["dataclass"]
    assert type(shown.value) is Output and shown.device is None
    assert_same(shown.value.hidden.value, d)
    assert shown.value.layer == IntermediateValue(2, None)

    shown = batch["pair"]
    assert type(shown.value) is Pair
    assert_same(shown.value.first.value, a)

    # The stock helper turns a shown tree back into the value fetch() gives.
    fetched = cache.fetch(0)
    for key in batch:
        again, expected = value_of(batch[key]), fetched[key]
        assert type(again) is type(expected), key


def test_the_view_is_live(cache):
    view = cache.batch_intermediates
    cache.append({"a": torch.ones(2)})
    batch = view[0]
    assert "a" in batch and len(view) == 1
    # Each check is the batch's first call since the cache changed.
    cache.update(0, {"b": torch.zeros(3)})
    assert len(batch) == 2
    cache.update(0, {"c": 1})
    assert list(reversed(batch)) == ["c", "b", "a"]
    cache.delete(0, ["c"])
    assert list(batch) == ["a", "b"]
    assert_same(batch["b"].value, torch.zeros(3))
    cache.update(0, {"a": torch.full((2,), 5.0)})
    assert_same(batch["a"].value, torch.full((2,), 5.0))
    cache.delete(0, ["a"])
    assert "a" not in batch and list(batch) == ["b"]
    cache.append({"c": 1})
    assert len(view) == 2 and view[1]["c"].value == 1
    last = view[-1]
    cache.append({"d": 2})
    assert list(last) == ["c"]  # the batch it named, as a list's item stays the same dict
    on_disk(cache)


def test_assigning_through_a_batch_stores_in_the_cache(cache):
    cache.append({"a": torch.ones(2)})
    batch = cache.batch_intermediates[0]
    value = random_tensor(torch.bfloat16, (4, 4), seed=9)
    batch["h"] = value
    batch["w"] = IntermediateValue(value, META)  # as the stock class stores them
    on_disk(cache)
    assert_same(cache.fetch(0, ["h"])["h"], value)
    assert cache.fetch(0, ["w"])["w"].device == META
    batch.update({"x": 1}, y=2)
    assert cache.fetch(0, ["x", "y"]) == {"x": 1, "y": 2}
    del batch["a"]
    assert "a" not in cache.fetch(0)
    with pytest.raises(KeyError):
        del batch["a"]
    batch.clear()
    assert cache.fetch(0) == {}


def test_a_batch_assigned_whole_holds_exactly_that(cache):
    cache.append({"a": torch.ones(2), "b": torch.ones(3)})
    view = cache.batch_intermediates
    view[0] = {"b": torch.zeros(3), "c": 4}
    on_disk(cache)
    fetched = cache.fetch(0)
    assert list(fetched) == ["b", "c"]
    assert_same(fetched["b"], torch.zeros(3))


def test_appending_through_the_view_adds_batches(cache):
    view = cache.batch_intermediates
    view.append({"a": IntermediateValue(torch.ones(2), META)})
    view.extend([{"b": 1}, {}])
    on_disk(cache)
    assert len(cache) == 3
    assert cache.fetch(0)["a"].device == META
    assert cache.fetch(1) == {"b": 1} and cache.fetch(2) == {}


def test_what_the_view_cannot_mean_names_the_call_to_make(cache):
    cache.append({"t": (torch.ones(2), [torch.ones(1)]), "d": {"k": 1}})
    on_disk(cache)
    view = cache.batch_intermediates
    with pytest.raises(TypeError, match=r"cache\.delete\(batch_index\)"):
        del view[0]
    for name in ("insert", "pop", "remove", "clear", "sort", "reverse"):
        with pytest.raises(AttributeError, match=r"cache\.update"):
            getattr(view, name)
    with pytest.raises(AttributeError, match=r"update/delete/append"):
        cache.batch_intermediates = []
    shown = view[0]["t"]
    with pytest.raises(AttributeError, match=r"cache\.update\(batch_index"):
        shown.value = None
    with pytest.raises(AttributeError, match=r"cache\.update\(batch_index"):
        shown.value[0].device = CPU
    with pytest.raises(AttributeError, match=r"cache\.update\(batch_index"):
        shown.value[1].value.append(IntermediateValue(1, None))
    with pytest.raises(AttributeError, match=r"cache\.update\(batch_index"):
        view[0]["d"].value["k"] = IntermediateValue(2, None)
    assert cache.fetch(0)["d"] == {"k": 1}  # nothing changed


def test_a_closed_cache_view_says_so(tmp_path):
    cache = IntermediatesCache(None, "cpu", config=CacheConfig(disk_path=None))
    cache.append({"a": 1})
    view = cache.batch_intermediates
    cache.close()
    from spillcache import CacheClosedError

    with pytest.raises(CacheClosedError):
        list(view[0])


# ------------------------------------------------------- a batch is a dict


def stored(cache: IntermediatesCache) -> dict:
    """Batch 0: three tensors (one in a nested tuple), a dict node and a number; on
    disk in the spilled run. Returns them as the stock class would hold them."""
    values = {
        "hidden": random_tensor(torch.bfloat16, (4, 8), seed=1),
        "nested": {"k": (random_tensor(torch.float16, (3,), seed=2), 3)},
        "ids": random_tensor(torch.int64, (2, 5), seed=3),
        "n": 7,
    }
    cache.append(values)
    on_disk(cache)
    return {key: IntermediatesCache._offload_value(value, "cpu") for key, value in values.items()}


def plain(node):
    """A json-like walk, as code written for the stock class does: dicts by
    ``isinstance``, tensors as their bits."""
    if isinstance(node, IntermediateValue):
        return {"value": plain(node.value), "device": str(node.device)}
    if isinstance(node, dict):
        return {key: plain(value) for key, value in node.items()}
    if isinstance(node, list | tuple):
        return [plain(item) for item in node]
    if isinstance(node, torch.Tensor):
        return {"dtype": str(node.dtype), "shape": list(node.shape), "bits": bits(node).hex()}
    return node


TENSORS = 3  # in stored()

COPIES = {
    "dict(b)": dict,
    "{**b}": lambda batch: {**batch},
    "b.copy()": lambda batch: batch.copy(),
    "d.update(b)": lambda batch: (lambda copied: copied.update(batch) or copied)({}),
    "f(**b)": lambda batch: (lambda **kwargs: kwargs)(**batch),
    "dict(b.items())": lambda batch: dict(batch.items()),
    "comprehension": lambda batch: {key: batch[key] for key in batch},
    "b | {}": lambda batch: batch | {},
    "{} | b": lambda batch: {} | batch,
    "copy.copy": copy.copy,
    "copy.deepcopy": copy.deepcopy,
    "pickle": lambda batch: pickle.loads(pickle.dumps(batch)),
}


@pytest.mark.parametrize("how", COPIES)
def test_every_copy_of_a_batch_is_a_plain_dict_of_its_values(cache, how):
    expected = stored(cache)
    hits = reads(cache)
    copied = COPIES[how](cache.batch_intermediates[0])
    assert type(copied) is dict
    assert list(copied) == list(expected)
    assert plain(copied) == plain(expected)  # bit for bit
    if cache.spilled:  # each tensor read from disk, once
        assert reads(cache) == hits + TENSORS
    if how in ("copy.deepcopy", "pickle"):  # plain trees, which may change, as the stock's
        assert type(copied["nested"]) is IntermediateValue
        assert type(copied["nested"].value) is dict
        copied["nested"].value["k"] = copied["hidden"].value = None
        assert plain(cache.batch_intermediates[0]["nested"]) == plain(expected["nested"])


def test_json_encodes_a_batch_as_the_stock_dict(cache):
    expected = stored(cache)
    view = cache.batch_intermediates

    def encode(node):
        return plain(node) if isinstance(node, IntermediateValue) else repr(node)

    for indent in (None, 1):  # json's C encoder, then its Python one
        text = json.dumps(expected, default=encode, indent=indent)
        assert json.dumps(view[0], default=encode, indent=indent) == text
    assert json.dumps(view[0], default=encode).startswith('{"hidden": ')
    cache.append({})
    empty = view[1]
    assert json.dumps(empty) == "{}"
    empty["x"] = 1  # a write through the batch: the C encoder sees it
    assert json.loads(json.dumps(empty, default=encode)) == {"x": {"value": 1, "device": "None"}}


def test_a_batch_held_while_the_cache_changes_copies_and_encodes_what_it_holds(cache):
    """C code that finds a dict's own storage empty takes it as empty (json's encoder,
    ``b | d``): a batch held since it was empty still gives the keys stored since."""
    cache.append({})
    batch = cache.batch_intermediates[0]
    cache.update(0, {"x": 1})
    assert json.dumps(batch, default=lambda node: node.value) == '{"x": 1}'
    cache.update(0, {"y": random_tensor(torch.float32, (3,), seed=5)})
    on_disk(cache)
    copied = batch | {}
    assert list(copied) == ["x", "y"]
    assert_same(copied["y"].value, random_tensor(torch.float32, (3,), seed=5))
    cache.delete(0)
    assert json.dumps(batch) == "{}" and batch | {} == {}


def test_a_batch_compares_as_the_stock_dict(cache):
    expected = stored(cache)
    batch = cache.batch_intermediates[0]
    copied = dict(batch)  # the same trees, as the stock dict's copy holds the same values
    assert batch == copied and copied == batch and batch == batch.copy()
    assert not batch != copied and not copied != batch
    assert [batch] == [copied] and batch == cache.batch_intermediates[0]
    assert batch.keys() == copied.keys() and not batch.keys() != copied.keys()
    assert batch["hidden"] is batch["hidden"] is cache.batch_intermediates[0]["hidden"]
    assert batch != {} and batch != {**copied, "n": IntermediateValue(8, None)}
    assert batch != expected | {"extra": None} and batch != 5 and not batch == [1]
    # Values compare as IntermediateValues do: tensors other than the cached one are
    # compared element by element, which is ambiguous for more than one element.
    with pytest.raises(RuntimeError, match="ambiguous"):
        batch == expected  # noqa: B015
    assert batch == {key: value for key, value in copied.items()}
    assert repr(batch) == repr(copied)


def test_a_tree_in_use_is_given_again_and_a_changed_one_never(cache):
    stored(cache)
    batch = cache.batch_intermediates[0]
    hits = reads(cache)
    first = batch["hidden"]
    assert batch["hidden"] is first and dict(batch)["hidden"] is first
    if cache.spilled:
        assert reads(cache) == hits + TENSORS  # "hidden" once, the others by dict()
    new = random_tensor(torch.bfloat16, (4, 8), seed=11)
    cache.update(0, {"hidden": new})
    assert batch["hidden"] is not first
    assert_same(batch["hidden"].value, new)
    assert_same(first.value, random_tensor(torch.bfloat16, (4, 8), seed=1))
    on_disk(cache)
    hits = reads(cache)
    del first
    gc.collect()
    assert_same(batch["hidden"].value, new)  # read again: nothing kept it
    if cache.spilled:
        assert reads(cache) == hits + 1


def test_every_dict_write_goes_to_the_cache(cache):
    expected = stored(cache)
    batch = cache.batch_intermediates[0]
    hidden = batch.pop("hidden")  # read (from disk) before it is deleted
    assert plain(hidden) == plain(expected["hidden"]) and "hidden" not in cache.fetch(0)
    assert batch.pop("hidden", None) is None
    with pytest.raises(KeyError):
        batch.pop("hidden")
    key, last = batch.popitem()
    assert key == "n" and last == IntermediateValue(7, None) and list(batch) == ["nested", "ids"]
    assert batch.setdefault("ids", 1) is not None and batch.setdefault("s", 2) == 2
    batch |= {"t": IntermediateValue(torch.ones(2), META)}
    batch["u"] = 3
    del batch["nested"]
    on_disk(cache)
    assert list(batch) == list(cache.fetch(0)) == ["ids", "s", "t", "u"]
    assert len(json.loads(json.dumps(batch, default=repr))) == 4  # the dict's own keys too
    assert cache.fetch(0, ["t"])["t"].device == META
    batch.clear()
    assert cache.fetch(0) == {} and not batch and json.dumps(batch) == "{}"
    with pytest.raises(KeyError, match="empty"):
        batch.popitem()
    assert type(type(batch).fromkeys(["a"])) is dict


# ------------------------------------------------------- stock helpers


def test_offload_value_builds_the_stock_tree():
    tensor = torch.arange(4.0)
    value = {"t": (tensor, 3), "l": [tensor], "o": Output(tensor, 1)}
    shown = IntermediatesCache._offload_value(value, "cpu")
    assert type(shown) is IntermediateValue and shown.device is None
    inner = shown.value["t"].value
    assert type(inner) is tuple and inner[0].value is tensor  # on the CPU already: itself
    assert inner[0].device == CPU and inner[1] == IntermediateValue(3, None)
    assert type(shown.value["o"].value) is Output
    back = IntermediatesCache._onload_value(shown)
    assert_same(back["t"][0], tensor) and back["t"][1] == 3
    assert_same(back["o"].hidden, tensor) and back["o"].layer == 1


def test_offload_value_records_the_onload_device_given():
    tensor = torch.ones(3)
    shown = IntermediatesCache._offload_value(tensor, "cpu", META)
    assert shown.device == META
    assert IntermediatesCache._onload_value(shown).device == META


def test_offload_value_copies_a_tensor_once_through_offload_values():
    tensor = torch.ones(3)
    first = IntermediatesCache._offload_value(tensor, META).value
    second = IntermediatesCache._offload_value([tensor], META).value[0].value
    assert first.device == META and second is first
    assert tensor in IntermediatesCache.offload_values.keys()
    del tensor, first, second
    gc.collect()
    assert all(key.device != CPU or key.numel() != 3 for key in IntermediatesCache.offload_values)


def test_offload_values_is_one_weak_map_for_the_class():
    from weakref import WeakKeyDictionary

    with IntermediatesCache() as one, IntermediatesCache() as two:
        assert isinstance(IntermediatesCache.offload_values, WeakKeyDictionary)
        assert one.offload_values is two.offload_values is IntermediatesCache.offload_values


def test_offload_value_keeps_unknown_types_with_a_warning():
    thing = object()
    with pytest.warns(UserWarning, match="Offloading not implemented"):
        shown = IntermediatesCache._offload_value(thing, "cpu")
    assert shown == IntermediateValue(thing, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for plain in (1, 0.5, "s", True, None, torch.float16, CPU):
            assert IntermediatesCache._offload_value(plain, "cpu").value == plain


def test_an_offloaded_tree_stores_and_fetches_as_its_value(cache):
    tensor = random_tensor(torch.float8_e5m2, (6,), seed=4)
    cache.append({"x": IntermediatesCache._offload_value((tensor, Pair(1, tensor)), "cpu")})
    on_disk(cache)
    fetched = cache.fetch(0)["x"]
    assert_same(fetched[0], tensor)
    assert type(fetched[1]) is Pair and fetched[1].first == 1


def test_pin_intermediate_pins_cpu_tensors_in_place(monkeypatch):
    """Pinning needs an accelerator: here Tensor.pin_memory is replaced by a copy that
    records it was called, which is all the helper relies on."""
    pinned: list[torch.Tensor] = []

    def pin_memory(self):
        copy = self.clone()
        pinned.append(copy)
        return copy

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: any(self is p for p in pinned))
    a, b = torch.ones(2), torch.zeros(3)
    tree = IntermediatesCache._offload_value({"x": (a, [b]), "o": Output(a, 1)}, "cpu")
    IntermediatesCache._pin_intermediate(tree)
    leaves = [tree.value["x"].value[0], tree.value["x"].value[1].value[0]]
    leaves.append(tree.value["o"].value.hidden)
    assert all(leaf.value.is_pinned() for leaf in leaves)
    assert_same(leaves[1].value, b)
    IntermediatesCache._pin_intermediate(tree)  # pinned already: left as it is
    assert len(pinned) == 3


def test_pin_intermediate_of_a_shown_value_names_pin_memory(cache, monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", torch.Tensor.clone)
    cache.append({"h": torch.ones(2)})
    with pytest.raises(AttributeError, match=r"cache\.pin_memory\(batch_index\)"):
        IntermediatesCache._pin_intermediate(cache.batch_intermediates[0]["h"])


def test_override_eq_mode_compares_identity():
    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])
    assert (a == b).all()
    with OverrideEqMode():
        assert (a == b).item() is False and (a == a).item() is True
        assert b in [a, b] and torch.tensor([1, 2, 3]) not in [a, b]
