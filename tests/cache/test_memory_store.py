"""The cache's machinery needs of a store only the ``TensorStore`` Protocol: run against
an in-memory store (tests/memory_store.py), every value goes to it and comes back bit
for bit, in every dtype, and no file is made."""

from __future__ import annotations

import inspect

import pytest
import torch

from memory_store import MemoryStore
from spill_testing import ALL_DTYPES, assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.dtypes import is_tierable
from spillcache._internal.runtime.pool import SharedPool
from spillcache._internal.store.tensor_store import Store, TensorStore

PROTOCOL_METHODS = sorted(
    name
    for name, value in vars(TensorStore).items()
    if inspect.isfunction(value) and not name.startswith("_")
)


def parameters(function) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]


@pytest.fixture
def memory_stores(tmp_path, monkeypatch) -> list[MemoryStore]:
    """Every store a pool makes from now on is a MemoryStore (listed here)."""
    made: list[MemoryStore] = []

    def create(pool: SharedPool, disk: int) -> MemoryStore:
        made.append(MemoryStore(tmp_path / f"memory-store-{len(made)}"))
        return made[-1]

    monkeypatch.setattr(SharedPool, "_create_store", create)
    return made


def test_both_stores_have_the_protocols_methods_and_signatures(tmp_path):
    assert {"write_tensor", "read_tensor", "delete_tensor", "remove"} <= set(PROTOCOL_METHODS)
    store = Store.create(tmp_path)
    try:
        for implementation in (store, MemoryStore(tmp_path / "memory")):
            assert isinstance(implementation, TensorStore)
            for name in PROTOCOL_METHODS:
                expected = parameters(getattr(TensorStore, name))
                actual = parameters(getattr(type(implementation), name))
                assert actual == expected, f"{type(implementation).__name__}.{name}"
    finally:
        store.remove()


def test_the_core_spills_to_and_reads_back_from_an_in_memory_store(tmp_path, memory_stores):
    disk = tmp_path / "disk"
    # Nothing may stay in RAM: every tensor reaches the store.
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, write_behind_bytes=0, read_buffer_bytes=0, disk_path=str(disk)
    )
    values = {
        str(dtype): random_tensor(dtype, (3, 5), seed) for seed, dtype in enumerate(ALL_DTYPES)
    }
    second = {"hidden": random_tensor(torch.bfloat16, (4, 8), 99), "ids": torch.arange(7)}
    tiered = sum(is_tierable(value) for value in values.values())
    with IntermediatesCache.empty(2, "cpu", config=config) as cache:
        cache.update(0, values)
        cache.update(1, second)
        cache.flush()  # the last update's writes may still be on their way
        (store,) = memory_stores
        assert len(store.written) == tiered + len(second) and tiered >= len(values) - 2
        assert len(store.arrays) == len(store.written)
        fetched = cache.fetch(0)
        for key, value in values.items():
            assert_same(fetched[key], value)
        for index, batch in enumerate(cache.iter_prefetch()):
            expected = values if index == 0 else second
            assert set(batch) == set(expected)
            for key, value in expected.items():
                assert_same(batch[key], value)
    assert store.removed and not store.arrays  # close removed the cache's store
    assert not disk.exists() or list(disk.iterdir()) == []  # and no file was ever made
