"""A Hypothesis state machine: the cache and a plain Python model always agree.

The model is a list of batches, each a dict of key -> ``Stored`` (the value as it was
given, and a bit-exact snapshot of it taken when it was stored). Every rule does the
same thing to the cache and to the model and checks the cache's answers; the
invariants check the tier budgets and the batch count after every step.

The machine runs under several placements (everything on disk, a little in RAM, all in
RAM, a tight disk budget), each its own ``TestCase`` class: in the default run a few
derandomized sequences each (``SETTINGS``); in the ``slow`` run ``EXPLORE_500``
sequences each, from random seeds. Several caches sharing a pool, and kept stores
closed and opened again, are ``test_pool_machine.py``'s machine.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from spill_testing import assert_same, bits, exploring, machine_settings, random_tensor
from spillcache import CacheConfig, CapacityError, IntermediatesCache
from spillcache._internal.io import transfers

SETTINGS = machine_settings(max_examples=25)
EXPLORE_500 = exploring(SETTINGS, max_examples=500)

# ------------------------------------------------------------------ values

DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn]
# 0-d, empty, tiny, and a few that are bigger than the 4096-byte host tier of "tiny".
SHAPES = [(), (0,), (0, 5), (1,), (7,), (3, 4), (16, 16), (24, 40), (40, 48)]
LAYOUTS = ["contiguous", "transposed", "strided", "offset", "strided-clone"]

# Keys that would be dangerous as paths, non-ASCII, or empty.
KEYS = ["h", "mask", "a/b", "../x", "ключ", "", ".", "zarr.json"]


@st.composite
def tensors(draw) -> torch.Tensor:
    """A tensor of random bits, contiguous or a non-contiguous view of a bigger base."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**16))
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "transposed" and len(shape) >= 2:
        view = random_tensor(dtype, shape[::-1], seed).t()
    elif layout == "strided" and len(shape) >= 1:
        view = random_tensor(dtype, (2 * shape[0], *shape[1:]), seed)[::2]
    elif layout == "strided-clone" and len(shape) >= 1:
        # clone() keeps the strides of a dense view: a compact tensor with odd strides.
        view = random_tensor(dtype, (2 * shape[0], *shape[1:]), seed)[::2].clone()
    elif layout == "offset" and len(shape) >= 1:
        view = random_tensor(dtype, (shape[0] + 1, *shape[1:]), seed)[1:]
    else:
        view = random_tensor(dtype, shape, seed)
    assert tuple(view.shape) == shape
    return view


scalars = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.booleans(),
    st.sampled_from(["", "s", "ключ", "../x"]),
)

values = st.recursive(
    st.one_of(tensors(), tensors(), scalars),
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(
            st.sampled_from(["a", "b", "ключ", ""]) | st.integers(0, 2), children, max_size=3
        ),
    ),
    max_leaves=4,
)

keys = st.sampled_from(KEYS)
batch_values = st.dictionaries(keys, values, max_size=3)
# Not unique: a name given twice must act as given once.
name_lists = st.none() | st.lists(keys, max_size=3)


def describe(value: Any) -> Any:
    """A plain, comparable snapshot of a value: tensors by dtype, shape, device and bits."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.device, bits(value))
    if isinstance(value, tuple):
        return ("tuple", [describe(item) for item in value])
    if isinstance(value, dict):
        return ("dict", [(describe(k), describe(v)) for k, v in value.items()])
    return (type(value), value)


def assert_tree_same(actual: Any, expected: Any) -> None:
    """Same structure, same types; tensors bit for bit (``assert_same``)."""
    assert type(actual) is type(expected), (type(actual), type(expected))
    if isinstance(expected, torch.Tensor):
        assert_same(actual, expected)
    elif isinstance(expected, tuple):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            assert_tree_same(a, e)
    elif isinstance(expected, dict):
        assert list(actual) == list(expected)
        for key in expected:
            assert_tree_same(actual[key], expected[key])
    else:
        assert actual == expected


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, tuple):
        return [t for item in value for t in tensor_leaves(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensor_leaves(item)]
    return []


@dataclass
class Stored:
    value: Any  # the object given to the cache (kept alive: sharing is by identity)
    snapshot: Any  # describe(value) when it was stored

    @classmethod
    def of(cls, value: Any) -> Stored:
        return cls(value, describe(value))


# ----------------------------------------------------------------- machine


class CacheMachine(RuleBasedStateMachine):
    """Drives one cache and the model side by side. Subclasses set CONFIG."""

    CONFIG: dict[str, Any] = {}

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="spillcache-state-")
        settings_ = {"disk_path": self.directory, **self.CONFIG}
        self.config = CacheConfig(**settings_)
        self.cache = IntermediatesCache(None, "cpu", config=self.config)
        self.model: list[dict[str, Stored]] = []

    def teardown(self) -> None:
        try:
            store = self.cache.store_path
            self.cache.close()
            assert store is None or not Path(store).exists(), "close() left the store behind"
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------ helpers

    @property
    def can_fail_for_room(self) -> bool:
        return self.config.disk_bytes is not None

    def draw_index(self, data) -> int:
        count = len(self.model)
        return data.draw(st.integers(-count, count - 1), label="batch_index")

    def expected(self, index: int, names) -> dict[str, Stored]:
        batch = self.model[index]
        return {k: v for k, v in batch.items() if names is None or k in names}

    def check_batch(self, actual: dict[str, Any], expected: dict[str, Stored]) -> None:
        assert list(actual) == list(expected), (list(actual), list(expected))
        for key, stored in expected.items():
            assert describe(stored.value) == stored.snapshot, (
                f"the stored object {key!r} was modified"
            )
            assert_tree_same(actual[key], stored.value)
            assert describe(actual[key]) == stored.snapshot

    def check_index(self, index: int, names=None) -> None:
        self.check_batch(self.cache.fetch(index, names), self.expected(index, names))

    def do_update(self, index: int, new: dict[str, Any]) -> bool:
        """update() on both; a CapacityError (only where a tier is bounded) changes nothing."""
        try:
            self.cache.update(index, new)
        except CapacityError:
            assert self.can_fail_for_room, "CapacityError with room in an unbounded tier"
            self.check_index(index)  # every key keeps its previous value
            return False
        for key, value in new.items():
            self.model[index][key] = Stored.of(value)
        return True

    def do_delete(self, index: int, names) -> None:
        batch = self.model[index]
        try:
            self.cache.delete(index, names)
        except KeyError:
            assert names is not None and any(name not in batch for name in names), (
                f"KeyError deleting {names!r} from a batch holding {list(batch)!r}"
            )
            self.check_index(index)  # nothing was deleted
            return
        assert names is None or all(name in batch for name in names), (
            f"deleting absent names {names!r} from {list(batch)!r} raised no KeyError"
        )
        for name in list(batch) if names is None else names:
            batch.pop(name, None)

    # -------------------------------------------------------------- rules

    @initialize(batches=st.lists(batch_values, min_size=1, max_size=3))
    def start(self, batches: list[dict[str, Any]]) -> None:
        for new in batches:
            self.append(new)

    @rule(new=batch_values)
    def append(self, new: dict[str, Any]) -> None:
        try:
            self.cache.append(new)
        except CapacityError:
            assert self.can_fail_for_room
            return  # the invariant checks that no batch was added
        self.model.append({key: Stored.of(value) for key, value in new.items()})

    @precondition(lambda self: self.model)
    @rule(data=st.data(), new=batch_values)
    def update(self, data, new: dict[str, Any]) -> None:
        self.do_update(self.draw_index(data), new)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), names=name_lists)
    def delete(self, data, names) -> None:
        self.do_delete(self.draw_index(data), names)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), names=name_lists)
    def fetch(self, data, names) -> None:
        self.check_index(self.draw_index(data), names)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), names=name_lists)
    def pin_memory(self, data, names) -> None:
        index = self.draw_index(data)
        self.cache.pin_memory(index, names)
        self.check_index(index, names)

    @rule(names=name_lists, prefetch=st.booleans())
    def iterate(self, names, prefetch: bool) -> None:
        batches = self.cache.iter_prefetch(names) if prefetch else self.cache.iter(names)
        got = list(batches)
        assert len(got) == len(self.model)
        for index, actual in enumerate(got):
            self.check_batch(actual, self.expected(index, names))

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def iterate_prefetch_while_changing(self, data) -> None:
        """Change batches (often one already prefetched) between the batches
        iter_prefetch yields: every batch must come back as it is when it is yielded."""
        count = len(self.model)
        iterator = self.cache.iter_prefetch()
        for index in range(count):
            self.check_batch(next(iterator), self.expected(index, None))
            action = data.draw(st.sampled_from(["none", "update", "delete"]), label="action")
            if action == "none":
                continue
            target = data.draw(st.integers(0, count - 1), label="target")
            if action == "update":
                self.do_update(target, data.draw(batch_values, label="new"))
            else:
                self.do_delete(target, data.draw(name_lists, label="names"))
        with pytest.raises(StopIteration):
            next(iterator)

    @precondition(lambda self: self.model)
    @rule(data=st.data(), tensor=tensors(), first=keys, second=keys, drop_first=st.booleans())
    def share_then_delete_one(
        self, data, tensor, first: str, second: str, drop_first: bool
    ) -> None:
        """The same tensor object under two keys (or batches); deleting one keeps the other."""
        a, b = self.draw_index(data) % len(self.model), self.draw_index(data) % len(self.model)
        if (a, first) == (b, second):
            return
        if a == b and data.draw(st.booleans(), label="one_update"):
            # Both references in one update: a new record shared within the update.
            if not self.do_update(a, {first: tensor, second: (None, {"again": tensor})}):
                return
            self.do_delete(a, [first] if drop_first else [second])
            self.check_index(a)
            return
        if not self.do_update(a, {first: tensor}):
            return
        self.cache.flush()
        written = self.cache.stats()["disk"]["bytes_written"]
        if not self.do_update(b, {second: tensor}):
            return
        if self.config.host_bytes == 0 and self.config.disk_path is not None:
            # Nothing is in RAM to evict, so only a new record could write: the second
            # reference must share the first's record, not write the tensor again.
            self.cache.flush()
            assert self.cache.stats()["disk"]["bytes_written"] == written
        gone, kept = ((a, first), (b, second)) if drop_first else ((b, second), (a, first))
        self.do_delete(gone[0], [gone[1]])
        self.check_index(kept[0], [kept[1]])
        assert_same(self.cache.fetch(kept[0], [kept[1]])[kept[1]], tensor)

    @precondition(lambda self: any(tensor_leaves(s.value) for b in self.model for s in b.values()))
    @rule(data=st.data(), key=keys)
    def store_again(self, data, key: str) -> None:
        """Store a tensor the cache already holds (the same object) somewhere else."""
        leaves = [t for b in self.model for s in b.values() for t in tensor_leaves(s.value)]
        tensor = data.draw(st.sampled_from(leaves), label="tensor")
        twice = data.draw(st.booleans(), label="twice")
        self.do_update(self.draw_index(data), {key: (tensor, tensor) if twice else tensor})

    @rule(data=st.data(), tensor=tensors())
    def out_of_range(self, data, tensor) -> None:
        count = len(self.model)
        index = data.draw(
            st.integers(count, count + 3) | st.integers(-count - 3, -count - 1), label="bad_index"
        )
        self.cache.flush()  # no background write may change the stats meanwhile
        before = self.cache.stats()
        with pytest.raises(IndexError):
            self.cache.fetch(index)
        with pytest.raises(IndexError):
            self.cache.update(index, {"h": tensor})
        with pytest.raises(IndexError):
            self.cache.delete(index, ["h"])
        with pytest.raises(IndexError):
            self.cache.delete(index)
        with pytest.raises(IndexError):
            self.cache.pin_memory(index)
        assert self.cache.stats() == before
        assert len(self.cache) == count

    # --------------------------------------------------------- invariants

    @invariant()
    def within_budgets(self) -> None:
        stats = self.cache.stats()
        host_budget = self.config.host_bytes
        assert stats["host"]["bytes"] <= host_budget, stats["host"]
        if self.config.disk_bytes is not None:
            assert stats["disk"]["bytes"] <= self.config.disk_bytes, stats["disk"]
        if self.config.disk_path is None:
            assert stats["disk"]["bytes"] == 0

    @invariant()
    def same_length(self) -> None:
        assert len(self.cache) == len(self.model)


# ----------------------------------------------------------------- configs


class EverythingOnDisk(CacheMachine):
    CONFIG = dict(host_bytes=0, inline_bytes=0)


class LittleInRam(CacheMachine):
    CONFIG = dict(host_bytes=4096, inline_bytes=0)


class AllInRam(CacheMachine):
    CONFIG = dict(host_bytes="1GiB", disk_path=None, inline_bytes=0)


class TightDisk(CacheMachine):
    """Small host and disk budgets: updates fail for room, all or nothing."""

    CONFIG = dict(host_bytes=4096, disk_bytes=8 * 1024, inline_bytes=256, prefetch_depth=1)


TestEverythingOnDisk = EverythingOnDisk.TestCase
TestLittleInRam = LittleInRam.TestCase
TestAllInRam = AllInRam.TestCase
TestTightDisk = TightDisk.TestCase
for _case in (TestEverythingOnDisk, TestLittleInRam, TestAllInRam, TestTightDisk):
    _case.settings = SETTINGS
del _case


@pytest.mark.slow
@pytest.mark.parametrize(
    "machine", [EverythingOnDisk, LittleInRam, AllInRam, TightDisk], ids=lambda m: m.__name__
)
def test_explore_500_sequences_from_random_seeds(machine):
    run_state_machine_as_test(machine, settings=EXPLORE_500)


# --------------------------------------------------- bugs the machine found
#
# Each is the machine's shrunk failure, reduced to a plain regression test.


def test_compact_one_element_tensor_with_a_stride_other_than_1_spills(tmp_path):
    """A compact 1-element tensor may have stride 2; its bytes must still reach disk."""
    tensor = random_tensor(torch.float32, (2,), 0)[::2].clone()
    assert tensor.stride() == (2,) and transfers.is_compact(tensor)
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache(config=config) as cache:
        cache.append({"h": tensor})
        cache.flush()
        assert cache.stats()["disk"]["bytes_written"] == tensor.nbytes
        assert_same(cache.fetch(0)["h"], tensor)


def test_delete_of_a_name_given_twice_deletes_it_once():
    config = CacheConfig(host_bytes="1GiB", disk_path=None, inline_bytes=0)
    with IntermediatesCache([{"h": random_tensor(torch.float32, (4,), 0)}], config=config) as cache:
        cache.delete(0, ["h", "h"])
        assert cache.fetch(0) == {}
        assert cache.stats()["host"]["bytes"] == 0


def test_delete_of_a_name_given_twice_with_an_absent_one_deletes_nothing():
    config = CacheConfig(host_bytes="1GiB", disk_path=None, inline_bytes=0)
    with IntermediatesCache([{"h": random_tensor(torch.float32, (4,), 0)}], config=config) as cache:
        with pytest.raises(KeyError, match="nothing was deleted"):
            cache.delete(0, ["h", "h", "gone"])
        assert list(cache.fetch(0)) == ["h"]


def test_iter_prefetch_after_a_delete_of_a_name_given_twice_matches_fetch():
    config = CacheConfig(host_bytes="1GiB", disk_path=None, inline_bytes=0, prefetch_depth=2)
    batches = [{"h": random_tensor(torch.float32, (4,), seed)} for seed in range(2)]
    with IntermediatesCache(batches, config=config) as cache:
        iterator = cache.iter_prefetch()
        next(iterator)
        cache._core.io.wait_idle()  # batch 1 is now prefetched
        cache.delete(1, ["h", "h"])
        assert list(next(iterator)) == list(cache.fetch(1)) == []
