"""Every dtype, layout and nesting comes back bit for bit from every placement."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, random_tensor, tensor_variants
from spillcache import IntermediateValue


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_dtype_and_layout_round_trips(make_cache, placement, dtype):
    cache = make_cache(num_batches=1)
    originals = tensor_variants(dtype)
    cache.update(0, dict(originals))
    fetched = cache.fetch(0)
    assert list(fetched) == list(originals)
    for name, original in originals.items():
        assert_same(fetched[name], original)
    # Fetched again once every write is done: spilled values now come from disk
    # (the first fetch may have been served from the write-behind area).
    cache.flush()
    reads_before = cache.stats()["disk"]["hits"]
    for name, original in originals.items():
        assert_same(cache.fetch(0, [name])[name], original)
    stats = cache.stats()
    if stats["disk"]["bytes"] > stats["host"]["bytes"]:  # something lives on disk only
        assert stats["disk"]["hits"] > reads_before


def test_spilling_placements_really_use_the_disk(make_cache, placement):
    cache = make_cache(num_batches=2)
    nbytes = 128 * 256 * 4  # above the default inline_bytes
    for index in range(2):
        cache.update(index, {"h": random_tensor(torch.float32, (128, 256), index)})
    stats = cache.stats()
    if placement == "ram":
        assert stats["disk"]["bytes"] == 0 and cache.store_path is None
        assert stats["host"]["bytes"] == 2 * nbytes
    else:
        assert stats["disk"]["bytes"] >= nbytes
        assert stats["host"]["bytes"] <= stats["host"]["budget"]


@dataclasses.dataclass
class Output:
    hidden: torch.Tensor
    extra: tuple
    note: str = "x"


@dataclasses.dataclass(frozen=True)
class Frozen:
    a: torch.Tensor
    b: int
    c: torch.Tensor | None = None
    cached: int = dataclasses.field(default=7, init=False)


Pair = namedtuple("Pair", ["cos", "sin"])


def test_nested_values_round_trip(make_cache):
    cache = make_cache(num_batches=1)
    t = [random_tensor(torch.bfloat16, (8, 16), seed) for seed in range(6)]
    value = {
        "tuple": (t[0], None, 3, 2.5, "s", True, torch.float16, torch.device("cpu")),
        "list": [t[1], [t[2]]],
        "dict": {"a": t[3], 7: "seven", None: None},
        "ordered": OrderedDict(b=t[4]),
        "dataclass": Output(t[5], (t[0], 1)),
        "frozen": Frozen(t[1], 2),
        "named": Pair(t[2], t[3]),
        "float": float("-inf"),
    }
    cache.update(0, value)
    got = cache.fetch(0)
    assert got["tuple"][1:] == (None, 3, 2.5, "s", True, torch.float16, torch.device("cpu"))
    assert_same(got["tuple"][0], t[0])
    assert_same(got["list"][0], t[1])
    assert_same(got["list"][1][0], t[2])
    assert set(got["dict"]) == {"a", 7, None} and got["dict"][7] == "seven"
    assert_same(got["dict"]["a"], t[3])
    assert type(got["ordered"]) is OrderedDict
    assert_same(got["ordered"]["b"], t[4])
    assert type(got["dataclass"]) is Output and got["dataclass"].note == "x"
    assert_same(got["dataclass"].hidden, t[5])
    assert_same(got["dataclass"].extra[0], t[0]) and got["dataclass"].extra[1] == 1
    assert type(got["frozen"]) is Frozen and got["frozen"].b == 2 and got["frozen"].c is None
    assert got["frozen"].cached == 7
    assert type(got["named"]) is Pair
    assert_same(got["named"].sin, t[3])
    assert got["float"] == float("-inf")


def test_intermediate_values_are_unwrapped_with_their_onload_device(make_cache):
    cache = make_cache(num_batches=1)
    x = random_tensor(torch.float32, (4, 32))
    cache.update(0, {"x": IntermediateValue((IntermediateValue(x, torch.device("cpu")), 5), None)})
    got = cache.fetch(0)["x"]
    assert isinstance(got, tuple) and got[1] == 5
    assert_same(got[0], x)


def test_unknown_types_stay_in_ram_with_a_warning(make_cache):
    cache = make_cache(num_batches=1)

    class Opaque:
        pass

    thing = Opaque()
    with pytest.warns(UserWarning, match="Opaque"):
        cache.update(0, {"thing": thing, "also": [thing]})
    got = cache.fetch(0)
    assert got["thing"] is thing and got["also"][0] is thing


def test_requires_grad_is_kept(make_cache):
    cache = make_cache(num_batches=1)
    x = random_tensor(torch.float32, (16, 16)).requires_grad_(True)
    cache.update(0, {"x": x})
    got = cache.fetch(0)["x"]
    assert got.requires_grad
    assert_same(got.detach(), x.detach())
