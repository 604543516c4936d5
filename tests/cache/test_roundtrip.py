"""Every dtype, layout and nesting comes back bit for bit from every placement."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from spill_testing import (
    ALL_DTYPES,
    QUANTIZED,
    assert_same,
    bits,
    random_tensor,
    spilling_variants,
    tensor_variants,
)
from spillcache import CacheConfig, IntermediateValue
from spillcache._internal import dtypes

CRC32C_BYTES = 4  # checksum = true: each chunk file ends with its CRC-32C (format.md)


# Which of spilling_variants() a placement that spills stores for each dtype: every
# layout in "zero" (where nothing stays in RAM, so the smallest tensors spill: quick to
# write); a compact tensor and a view in "tiny" (above its 4 KiB host tier) and "inline"
# (above inline_bytes, 64 KiB, beside small values kept inline).
SPILLED_LAYOUTS = {
    "zero": ("contiguous", "transposed", "strided", "offset", "scalar"),
    "tiny": ("contiguous", "transposed"),
    "inline": ("contiguous", "strided"),
}


class DtypeCase(NamedTuple):
    """One dtype's tensors for a placement: those that must go to disk, and those that
    must stay in memory."""

    to_disk: dict[str, torch.Tensor]
    in_memory: dict[str, torch.Tensor]

    @classmethod
    def of(cls, dtype: torch.dtype, placement: str, config: CacheConfig) -> DtypeCase:
        if placement == "ram":
            return cls({}, tensor_variants(dtype))
        variants = spilling_variants(dtype, max(config.host_bytes, config.inline_bytes))
        to_disk = {f"big-{n}": variants[n] for n in SPILLED_LAYOUTS[placement] if n in variants}
        if placement == "inline":
            small = {f"small-{n}": t for n, t in tensor_variants(dtype).items()}
            assert all(t.nbytes < config.inline_bytes for t in small.values())
            return cls(to_disk, small)
        if placement == "zero":  # nothing stays in RAM but what has no bytes
            return cls(to_disk, {"empty": tensor_variants(dtype)["empty"]})
        return cls(to_disk, {})


def test_every_dtype_and_layout_round_trips(make_cache, placement):
    """Every dtype torch has comes back bit for bit, each in a batch of its own. Where
    the placement spills, the tensors are too big for its host tier and inline_bytes,
    and each one is shown to be written to a chunk file of its own and read from disk.

    One cache for all dtypes (not one per dtype): making a store costs more than
    writing these tensors. Every wrong dtype and layout is listed, not just the first."""
    cache = make_cache(num_batches=len(ALL_DTYPES))
    config = cache.config
    cases = [DtypeCase.of(dtype, placement, config) for dtype in ALL_DTYPES]
    assert all(len(case.to_disk) >= 2 for case in cases) == (placement != "ram")
    for index, case in enumerate(cases):
        cache.update(index, {**case.to_disk, **case.in_memory})
    cache.flush()

    spilled = [tensor for case in cases for tensor in case.to_disk.values()]
    stats = cache.stats()
    assert (
        stats["disk"]["bytes_written"] == stats["disk"]["bytes"] == sum(t.nbytes for t in spilled)
    )
    trailer = CRC32C_BYTES if config.checksum else 0
    assert sorted(chunk_file_sizes(cache.store_path)) == sorted(t.nbytes + trailer for t in spilled)
    wrong = []
    for index, (dtype, case) in enumerate(zip(ALL_DTYPES, cases, strict=True)):
        originals = {**case.to_disk, **case.in_memory}
        assert list(cache.fetch(index)) == list(originals), dtype
        for name, original in originals.items():
            before = cache.stats()["disk"]
            fetched = cache.fetch(index, [name])[name]
            after = cache.stats()["disk"]
            read = (after["hits"] - before["hits"], after["bytes_read"] - before["bytes_read"])
            if read != ((1, original.nbytes) if name in case.to_disk else (0, 0)):
                wrong.append(f"{dtype} {name}: (disk reads, bytes read) were {read}")
            got, sent = describe(fetched), describe(original)
            if got != sent:
                what = "other bits" if got[:3] == sent[:3] else f"{got[:3]}, not {sent[:3]}"
                wrong.append(f"{dtype} {name}: came back with {what}")
    assert not wrong, "\n".join(wrong)


def describe(tensor: torch.Tensor) -> tuple:
    """dtype, shape, device and raw bytes (NaN payloads compare as bits)."""
    return (tensor.dtype, tuple(tensor.shape), tensor.device, bits(tensor))


def chunk_file_sizes(store_path: str | None) -> list[int]:
    """The size of every tensor's chunk file in a store (format.md, "Layout")."""
    if store_path is None:
        return []
    return [p.stat().st_size for p in Path(store_path).glob("tensors/*/c*") if p.is_file()]


def test_round_trip_cases_cover_every_dtype_torch_has():
    """The dtype list is read from torch: nothing is left out but quantized types, which
    need a scale and stay in RAM (test_quantized_tensors_stay_in_ram_as_they_are)."""
    every = {v for v in vars(torch).values() if isinstance(v, torch.dtype)}
    assert set(ALL_DTYPES) == every - QUANTIZED
    named = (
        "float8_e4m3fn float8_e5m2 float8_e4m3fnuz float8_e5m2fnuz float8_e8m0fnu "
        "float4_e2m1fn_x2 uint16 uint32 uint64 complex32 complex128 bool bfloat16 int4 bits8"
    )
    covered = {str(dtype).removeprefix("torch.") for dtype in ALL_DTYPES}
    assert covered >= {name for name in named.split() if hasattr(torch, name)}
    for dtype in ALL_DTYPES:
        assert dtypes.is_tierable(random_tensor(dtype, (2,))), dtype


@pytest.mark.placements_only("quantized tensors never reach the disk")
@pytest.mark.filterwarnings("ignore:.*quantized tensor creation functions:UserWarning")
def test_quantized_tensors_stay_in_ram_as_they_are(make_cache, placement):
    cache = make_cache(num_batches=1)
    quantized = torch.quantize_per_tensor(torch.linspace(-1, 1, 64), 0.01, 3, torch.qint8)
    with pytest.warns(UserWarning, match="in RAM as they are"):
        cache.update(0, {"q": quantized})
    got = cache.fetch(0)["q"]
    assert got is quantized
    cache.flush()
    assert cache.stats()["disk"]["bytes_written"] == 0


@pytest.mark.placements_only("nested tensors never reach the disk")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_nested_tensors_stay_in_ram_as_they_are(make_cache, placement):
    cache = make_cache(num_batches=1)
    parts = [torch.arange(n, dtype=torch.float32) for n in (20_000, 30_000)]  # past inline
    nested = torch.nested.nested_tensor(parts)
    with pytest.warns(UserWarning, match="layout nested .* in RAM as they are"):
        cache.update(0, {"n": nested})
    got = cache.fetch(0)["n"]
    assert got.is_nested and all(map(torch.equal, got.unbind(), parts))
    cache.flush()
    assert cache.stats()["disk"]["bytes_written"] == 0


@pytest.mark.placements_only("which tier holds a value is placement's; no I/O mode changes it")
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
    # Above the default inline_bytes, so that every spilling placement spills them.
    t = [random_tensor(torch.bfloat16, (128, 300), seed) for seed in range(6)]
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
    cache.flush()
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


@pytest.mark.placements_only("unwrapping happens before a value is tiered")
def test_intermediate_values_are_unwrapped_with_their_onload_device(make_cache):
    cache = make_cache(num_batches=1)
    x = random_tensor(torch.float32, (4, 32))
    cache.update(0, {"x": IntermediateValue((IntermediateValue(x, torch.device("cpu")), 5), None)})
    got = cache.fetch(0)["x"]
    assert isinstance(got, tuple) and got[1] == 5
    assert_same(got[0], x)


@pytest.mark.placements_only("values of unknown types never reach the disk")
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
    # Above the default inline_bytes, so that every spilling placement spills it.
    x = random_tensor(torch.float32, (128, 160)).requires_grad_(True)
    cache.update(0, {"x": x})
    cache.flush()
    got = cache.fetch(0)["x"]
    assert got.requires_grad
    assert_same(got.detach(), x.detach())
