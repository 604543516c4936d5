"""spillcache's class against the installed llm-compressor's own (issue 11): every public
attribute of the stock class exists here, and every method and classmethod takes the
same parameters (names, order, kinds, defaults), with spillcache's extras only
keyword-only after them. The switch's class (what llm-compressor builds once enabled)
is held to the same. A batch of ``batch_intermediates``, used as a dict every way code
written for the stock class uses one, gives what the stock class's batch gives, with
values in RAM and spilled."""

from __future__ import annotations

import collections
import copy
import dataclasses
import inspect
import json
import pickle

import pytest
import torch

stock_module = pytest.importorskip(
    "llmcompressor.pipelines.cache",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

import spillcache  # noqa: E402
from spill_testing import bits, random_tensor  # noqa: E402
from spillcache import IntermediatesCache, IntermediateValue  # noqa: E402
from spillcache._internal.tree import is_intermediate_value  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402

pytestmark = pytest.mark.integration

Stock = stock_module.IntermediatesCache
META = torch.device("meta")  # an onload device other than the CPU, on any machine
# Not public by name, but called by code written for the stock class.
HELPERS = ("_offload_value", "_onload_value", "_pin_intermediate")
DUNDERS = ("__init__", "__len__", "__iter__")


@pytest.fixture(params=["spillcache", "switch"])
def ours(request, tmp_path):
    if request.param == "spillcache":
        yield IntermediatesCache
    else:
        with integration.enable(disk_path=str(tmp_path)) as switch:
            yield switch.cache_class


def stock_public_names() -> set[str]:
    """Class attributes, and what an instance sets (batch_intermediates, offload_device)."""
    names = {name for name in dir(Stock) if not name.startswith("_")}
    return names | {name for name in vars(Stock()) if not name.startswith("_")}


def kind(cls: type, name: str) -> str:
    found = inspect.getattr_static(cls, name, None)  # an instance's attribute: None
    if isinstance(found, classmethod | staticmethod):
        return type(found).__name__
    return "method" if inspect.isfunction(found) else "attribute"


def callables() -> list[str]:
    names = sorted(stock_public_names() | set(HELPERS) | set(DUNDERS))
    return [name for name in names if kind(Stock, name) != "attribute"]


def test_the_stock_class_has_what_this_test_compares():
    assert {"batch_intermediates", "offload_device", "offload_values", "fetch"} <= set(
        stock_public_names()
    )
    assert set(HELPERS) <= set(callables())


def test_every_public_attribute_of_the_stock_class_is_here(ours):
    with ours() as cache:  # no arguments, as the stock class allows
        missing = sorted(name for name in stock_public_names() if not hasattr(cache, name))
    assert missing == []


@pytest.mark.parametrize("name", callables())
def test_same_kind_and_parameters_as_the_stock_class(ours, name):
    assert kind(ours, name) == kind(Stock, name), name
    stock = list(inspect.signature(getattr(Stock, name)).parameters.values())
    here = list(inspect.signature(getattr(ours, name)).parameters.values())
    assert len(here) >= len(stock), (name, here, stock)
    for theirs, mine in zip(stock, here[: len(stock)], strict=True):
        assert (mine.name, mine.kind) == (theirs.name, theirs.kind), name
        assert mine.default == theirs.default, (name, mine.name, mine.default, theirs.default)
    extras = here[len(stock) :]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extras), extras


def test_value_types_are_the_stock_ones_in_shape():
    stock_fields = [(f.name, f.default) for f in dataclasses.fields(stock_module.IntermediateValue)]
    ours = [(f.name, f.default) for f in dataclasses.fields(spillcache.IntermediateValue)]
    assert ours == stock_fields
    assert issubclass(spillcache.OverrideEqMode, type(stock_module.OverrideEqMode()).__mro__[1])


def test_the_helpers_build_what_the_stock_helpers_build():
    """Both classes' _offload_value give the same tree, and each class's _onload_value
    takes the other's tree back to the same value."""
    tensor = torch.arange(6.0)
    value = {"t": (tensor, 2), "l": [tensor, None]}

    def plain(tree):
        if isinstance(tree, stock_module.IntermediateValue | spillcache.IntermediateValue):
            return ("iv", plain(tree.value), tree.device)
        if isinstance(tree, list | tuple):
            return (type(tree).__name__, [plain(item) for item in tree])
        if isinstance(tree, dict):
            return ("dict", {key: plain(item) for key, item in tree.items()})
        if isinstance(tree, torch.Tensor):
            return ("tensor", tree.dtype, tuple(tree.shape), tree.device, tree.tolist())
        return tree

    theirs = Stock._offload_value(value, torch.device("cpu"))
    mine = IntermediatesCache._offload_value(value, torch.device("cpu"))
    assert plain(mine) == plain(theirs)
    assert plain(IntermediatesCache._onload_value(theirs)) == plain(value)
    assert plain(Stock._onload_value(mine)) == plain(value)


def test_a_tree_from_the_stock_helper_is_stored_as_its_value(tmp_path):
    """llm-compressor's own IntermediateValues are unwrapped as spillcache's are."""
    tensor = torch.arange(4.0)
    config = spillcache.CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache(None, "cpu", config=config) as cache:
        cache.append({"x": Stock._offload_value((tensor, 1), torch.device("cpu"))})
        cache.flush()
        assert cache.stats()["disk"]["bytes"] == tensor.nbytes  # it reached the disk
        got = cache.fetch(0)["x"]
    assert type(got) is tuple and got[1] == 1
    assert torch.equal(got[0], tensor) and got[0].dtype == tensor.dtype


# ------------------------------------------------- a batch, used as a dict


def batch_values() -> dict:
    return {
        "hidden": random_tensor(torch.bfloat16, (4, 8), seed=1),
        "nested": {"k": (random_tensor(torch.float16, (3,), seed=2), [3, None])},
        "ids": random_tensor(torch.int64, (2, 5), seed=3),
        "n": 7,
    }


def plain(node):
    """Either class's trees as data: IntermediateValues (spillcache's or llm-compressor's)
    by their fields, containers by isinstance (the view's nodes are read-only
    subclasses), tensors by their bits."""
    if is_intermediate_value(node):
        return ("iv", plain(node.value), node.device)
    if isinstance(node, dict):
        return ("dict", [(key, plain(value)) for key, value in node.items()])
    if isinstance(node, list | tuple):
        kind = "list" if isinstance(node, list) else type(node).__name__
        return (kind, [plain(item) for item in node])
    if isinstance(node, torch.Tensor):
        data = None if node.is_meta else bits(node)  # fetch() onloads to META: no data
        return ("tensor", node.dtype, tuple(node.shape), node.device, data)
    return node


def encode(node):
    return plain(node)[:2] if is_intermediate_value(node) else repr(node)


def copies(b) -> dict:
    """Every copy of batch ``b``: its type, and its contents as data."""
    made = {
        "dict(b)": dict(b),
        "{**b}": {**b},
        "b.copy()": b.copy(),
        "d.update(b)": (lambda d: d.update(b) or d)({}),
        "f(**b)": (lambda **kwargs: kwargs)(**b),
        "b | d": b | {"x": 1},
        "d | b": {"x": 1} | b,
        "dict(b.items())": dict(b.items()),
        "copy.copy": copy.copy(b),
        "copy.deepcopy": copy.deepcopy(b),
        "pickle": pickle.loads(pickle.dumps(b)),
    }
    return {how: (type(copied).__name__, plain(copied)) for how, copied in made.items()}


def use_as_a_dict(cache) -> list[tuple[str, object]]:
    """What code written for the stock class does with a batch, and what it got."""
    view = cache.batch_intermediates
    b = view[0]
    seen = [
        ("isinstance dict", isinstance(b, dict)),
        ("len, list, reversed", (len(view), len(b), list(b), list(reversed(b)))),
        ("in", ("hidden" in b, "absent" in b, "n" in b.keys())),
        ("get", (plain(b.get("n")), b.get("absent"), b.get("absent", 0))),
        ("b[key]", plain(b["nested"])),
        ("values, items", (plain(list(b.values())), plain(dict(b.items())))),
        ("copies", copies(b)),
        ("json", (json.dumps(b, default=encode), json.dumps(b, default=encode, indent=1))),
        ("repr", repr(b)),
    ]
    same = dict(b)
    seen.append(("==", (b == same, same == b, b != same, b == {}, b != {}, [b] == [same])))
    seen.append(("keys ==", (b.keys() == same.keys(), b["hidden"] is b["hidden"])))
    b["w"] = IntermediateValue(random_tensor(torch.float32, (3,), seed=4), META)
    del b["ids"]
    seen.append(("pop", (plain(b.pop("n")), b.pop("absent", None))))
    seen.append(("setdefault", plain(b.setdefault("s", IntermediateValue(2, None)))))
    b.update({"u": IntermediateValue(3, None)})
    b |= {"v": IntermediateValue(4, None)}
    seen.append(("popitem", plain(b.popitem())))
    seen.append(("after writes", (list(b), plain(dict(b)), plain(cache.fetch(0)))))
    b.clear()
    seen.append(("cleared", (len(b), dict(b), cache.fetch(0))))
    return seen


@pytest.mark.parametrize("spilled", [False, True], ids=["ram", "spilled"])
def test_a_batch_used_as_a_dict_gives_what_the_stock_class_gives(spilled, tmp_path):
    stock = Stock()
    stock.append(batch_values())
    expected = use_as_a_dict(stock)
    if spilled:
        config = spillcache.CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    else:
        config = spillcache.CacheConfig(host_bytes="1GiB", inline_bytes=0, disk_path=None)
    with IntermediatesCache(None, "cpu", config=config) as cache:
        cache.append(batch_values())
        cache.flush()
        if spilled:
            assert cache.stats()["host"]["bytes"] == 0 and cache.stats()["disk"]["bytes"] > 0
        got = use_as_a_dict(cache)
        assert (cache.stats()["disk"]["hits"] > 0) == spilled  # values came from disk
    assert [label for label, _ in got] == [label for label, _ in expected]
    for (label, mine), (_, theirs) in zip(got, expected, strict=True):
        assert mine == theirs, label


def test_batches_that_are_mappings_but_not_dicts_are_taken_as_the_stock_class_takes_them(
    tmp_path,
):
    """llm-compressor's ``data_collator="padding"`` (``DataCollatorWithPadding``) yields
    ``BatchEncoding``s, a ``UserDict``: the stock class reads any batch by ``.items()``."""
    from transformers import BatchEncoding

    config = spillcache.CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    batches = [BatchEncoding({"input_ids": random_tensor(torch.int64, (1, 7), seed)})
               for seed in range(2)]  # fmt: skip
    stock = Stock.from_dataloader(batches)
    with IntermediatesCache.from_dataloader(batches, config=config) as cache:
        for ours, theirs in zip(cache, stock, strict=True):
            assert bits(ours["input_ids"]) == bits(theirs["input_ids"])
        cache.update(0, collections.UserDict({"x": torch.ones(2)}))  # update, likewise
        assert bits(cache.fetch(0)["x"]) == bits(torch.ones(2))


@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("view", ["conj", "neg"])
def test_conjugate_and_negative_views_come_back_as_their_values(tmp_path, where, view):
    """A lazy conjugate or negation has no same-width raw view of its bits: it is
    stored resolved, and comes back equal to what the stock class gives back."""
    base = random_tensor(torch.complex64 if view == "conj" else torch.float32, (64,))
    base = torch.nan_to_num(base)  # compared with torch.equal: no NaN
    value = base.conj() if view == "conj" else base._neg_view()
    stock = Stock.empty(1, "cpu")
    stock.update(0, {"a": value})
    host = "64MiB" if where == "host" else 0
    config = spillcache.CacheConfig(host_bytes=host, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, {"a": value})
        cache.flush()
        assert torch.equal(cache.fetch(0)["a"], stock.fetch(0)["a"])


def test_one_small_tensor_stored_twice_comes_back_as_one_object_as_in_the_stock_class(tmp_path):
    t = torch.randn(3, 4)  # small: kept with its entry (inline)
    values = {"a": t, "b": [t, t]}
    stock = Stock.empty(1, "cpu")
    stock.update(0, values)
    theirs = stock.fetch(0)
    config = spillcache.CacheConfig(disk_path=str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, values)
        ours = cache.fetch(0)
    assert (ours["a"] is ours["b"][0], ours["b"][0] is ours["b"][1]) == (
        theirs["a"] is theirs["b"][0],
        theirs["b"][0] is theirs["b"][1],
    )
