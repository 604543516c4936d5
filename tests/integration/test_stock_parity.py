"""spillcache's class against the installed llm-compressor's own (issue 11): every public
attribute of the stock class exists here, and every method and classmethod takes the
same parameters (names, order, kinds, defaults), with spillcache's extras only
keyword-only after them. The switch's class (what llm-compressor builds once enabled)
is held to the same."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

stock_module = pytest.importorskip(
    "llmcompressor.pipelines.cache",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

import spillcache  # noqa: E402
from spillcache import IntermediatesCache  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402

pytestmark = pytest.mark.integration

Stock = stock_module.IntermediatesCache
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
