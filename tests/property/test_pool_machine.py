"""A Hypothesis state machine over several caches at once: caches built with one config
share one pool (one host budget), kept stores are closed and opened again, and values
reach the disk, and a kept store copied as a crash leaves it opens with its last flush.

The model is plain Python: per cache, a list of batches, each a dict of key -> a copy
of the value made when it was stored (tensors cloned bit for bit). Every rule does the
same thing to a cache and to its model and compares raw bytes (NaN payloads included).
The invariants check each pool's host tier against its budget, that the caches' shares
add up to the pool's figures, and every cache's length.

The default run replays a few derandomized sequences (seconds). The ``slow`` run
explores with random seeds: ``EXPLORE_2000`` sequences (``python -m pytest -m slow
tests/property``); it prints what it covered.
"""

from __future__ import annotations

import functools
import math
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
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

from spill_testing import (
    ALL_DTYPES,
    assert_same,
    clone_bits,
    exploring,
    machine_settings,
    random_tensor,
)
from spillcache import CacheConfig, IntermediatesCache

sys.path.insert(0, str(Path(__file__).parent))
from crash_images import (  # noqa: E402
    copy_as_a_crash_leaves_it,
    files_in,
    record_owner_dead,
    tear,
)

FAST = machine_settings(max_examples=40)
EXPLORE_2000 = exploring(FAST, max_examples=2000)

MAX_OPEN_CACHES = 4

# ------------------------------------------------------------------ values

# 0-d, empty, and sizes around and well above the host budgets drawn below.
SHAPES = [(), (0,), (0, 3), (5,), (7, 9), (16, 16), (24, 40), (48, 64)]
LAYOUTS = ["contiguous", "transposed", "strided", "offset"]
KEYS = ["h", "mask", "a/b", "../x", "ключ", "", "zarr.json"]


@dataclass(frozen=True)
class RandomTensor:
    """A tensor of random bits in any dtype, contiguous or a view of a bigger base, as
    a recipe: what Hypothesis prints for a failing step (torch cannot print every dtype)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    seed: int
    layout: str

    def make(self) -> torch.Tensor:
        dtype, shape, seed = self.dtype, self.shape, self.seed
        if self.layout == "transposed" and len(shape) == 2:
            return random_tensor(dtype, shape[::-1], seed).t()
        if self.layout == "strided" and shape:
            return random_tensor(dtype, (2 * shape[0], *shape[1:]), seed)[::2]
        if self.layout == "offset" and shape:
            return random_tensor(dtype, (shape[0] + 1, *shape[1:]), seed)[1:]
        return random_tensor(dtype, shape, seed)


tensors = st.builds(
    RandomTensor,
    st.sampled_from(ALL_DTYPES),
    st.sampled_from(SHAPES),
    st.integers(0, 2**16),
    st.sampled_from(LAYOUTS),
)


# What a store's JSON structures must carry through close and reopen.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 7, 2**70]),
    st.sampled_from([0.5, -0.0, math.inf, -math.inf, math.nan]),
    st.sampled_from(["", "s", "ключ", "../x"]),
    st.sampled_from([torch.bfloat16, torch.float8_e4m3fn, torch.device("cpu")]),
)

values = st.recursive(
    st.one_of(tensors, tensors, scalars),
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(
            st.sampled_from(["a", "ключ", ""]) | st.integers(0, 2), children, max_size=3
        ),
    ),
    max_leaves=4,
)
keys = st.sampled_from(KEYS)
batch_values = st.dictionaries(keys, values, min_size=1, max_size=3)
name_lists = st.none() | st.lists(keys, max_size=3)
changes = st.sampled_from(["append", "update", "delete"])
file_fates = st.sampled_from(["whole", "missing", "torn"])  # of a file written after a flush


def map_leaves(value: Any, function) -> Any:
    """The same nesting of tuples, lists and dicts with ``function`` applied to the rest."""
    if isinstance(value, tuple):
        return tuple(map_leaves(item, function) for item in value)
    if isinstance(value, list):
        return [map_leaves(item, function) for item in value]
    if isinstance(value, dict):
        return {key: map_leaves(item, function) for key, item in value.items()}
    return function(value)


def made(value: Any) -> Any:
    """A drawn value with its RandomTensor recipes made into tensors."""
    return map_leaves(value, lambda leaf: leaf.make() if isinstance(leaf, RandomTensor) else leaf)


def copy_of(value: Any) -> Any:
    """The model's copy of a value: the same structure, every tensor cloned bit for bit."""
    return map_leaves(
        value, lambda leaf: clone_bits(leaf) if isinstance(leaf, torch.Tensor) else leaf
    )


def tensors_in(value: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    map_leaves(value, lambda leaf: found.append(leaf) if isinstance(leaf, torch.Tensor) else None)
    return found


def assert_value_same(actual: Any, expected: Any, where: str) -> int:
    """Same structure and types; tensors and floats by their bits. Returns how many
    tensors were compared."""
    assert type(actual) is type(expected), (where, type(actual), type(expected))
    if isinstance(expected, torch.Tensor):
        assert_same(actual, expected)
        return 1
    if isinstance(expected, tuple | list):
        assert len(actual) == len(expected), where
        return sum(assert_value_same(a, e, where) for a, e in zip(actual, expected, strict=True))
    if isinstance(expected, dict):
        assert list(actual) == list(expected), where
        return sum(assert_value_same(actual[k], expected[k], where) for k in expected)
    if isinstance(expected, float):
        assert math.copysign(1, actual) == math.copysign(1, expected), where
        assert actual == expected or (math.isnan(actual) and math.isnan(expected)), where
        return 0
    assert actual == expected, (where, actual, expected)
    return 0


# What the runs covered, over every sequence of a test (reported by the slow test).
COVERED: Counter[str] = Counter()


def counted(function):
    """A rule that counts its runs in COVERED."""

    @functools.wraps(function)
    def run(self, *args, **kwargs):
        COVERED[f"rule {function.__name__}"] += 1
        return function(self, *args, **kwargs)

    return run


@dataclass
class Member:
    """An open cache and its model."""

    cache: IntermediatesCache
    kept: bool
    model: list[dict[str, Any]] = field(default_factory=list)

    def __repr__(self) -> str:  # short: failure messages print it
        return f"Member(kept={self.kept}, batches={len(self.model)})"


# ----------------------------------------------------------------- machine


class PoolMachine(RuleBasedStateMachine):
    """Caches of two configs (a kept-store one and a temporary one: two pools), opened,
    used, closed and reopened in any order."""

    def __init__(self) -> None:
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="spillcache-pool-")
        self.members: list[Member] = []
        # Kept stores closed and not opened again: (path, model).
        self.closed: list[tuple[str, list[dict[str, Any]]]] = []
        # Tensors given to some cache, kept alive: storing one again may share its record.
        self.given: list[torch.Tensor] = []
        self.steps = 0
        COVERED["sequences"] += 1

    def teardown(self) -> None:
        try:
            while self.members:
                self.close_member(self.members[-1])
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
        COVERED["steps"] += self.steps - 1  # the invariants ran once after start() too

    # ------------------------------------------------------------ helpers

    def config(self, kept: bool) -> CacheConfig:
        return self.kept_config if kept else self.temporary_config

    def pick(self, data, *, with_batches: bool = False, kept: bool | None = None) -> Member:
        """An open cache (by its place in ``members``: Hypothesis prints the number)."""
        choices = [
            number
            for number, m in enumerate(self.members)
            if (m.model or not with_batches) and (kept is None or m.kept == kept)
        ]
        return self.members[data.draw(st.sampled_from(choices), label="cache")]

    def draw_index(self, data, member: Member) -> int:
        count = len(member.model)
        return data.draw(st.integers(-count, count - 1), label="batch_index")

    def check_batch(self, member: Member, index: int, names=None) -> None:
        expected = {k: v for k, v in member.model[index].items() if names is None or k in names}
        actual = member.cache.fetch(index, names)
        assert list(actual) == list(expected), (list(actual), list(expected))
        where = f"cache {self.members.index(member)}, batch {index}"
        for key, value in expected.items():
            COVERED["tensors compared"] += assert_value_same(
                actual[key], value, f"{where}, key {key!r}"
            )

    def check_all(self, member: Member) -> None:
        assert len(member.cache) == len(member.model)
        for index in range(len(member.model)):
            self.check_batch(member, index)

    def store(self, member: Member, index: int | None, new: dict[str, Any]) -> None:
        """``update`` (``append`` where ``index`` is None) on a cache and on its model,
        which keeps copies; the tensors themselves are kept too, to be stored again."""
        if index is None:
            member.cache.append(new)
            member.model.append({})
        else:
            member.cache.update(index, new)
        member.model[-1 if index is None else index].update(
            {key: copy_of(value) for key, value in new.items()}
        )
        stored = tensors_in(new)
        self.given.extend(stored)
        COVERED["tensors stored"] += len(stored)

    def close_member(self, member: Member, *, flush_first: bool = True) -> None:
        cache = member.cache
        if flush_first:
            cache.flush()
        disk = cache.stats()["disk"]  # what was written and read back before close()
        COVERED["bytes written to disk"] += disk["bytes_written"]
        COVERED["values read back from disk"] += disk["hits"]
        cache.close()
        self.members.remove(member)
        path = cache.store_path
        if member.kept:
            assert path is not None and Path(path).is_dir(), "a kept store is gone"
            self.closed.append((path, member.model))
        else:
            assert path is None or not Path(path).exists(), "close() left the store behind"

    def open_store(self, path: str, model: list[dict[str, Any]]) -> Member:
        member = Member(IntermediatesCache.open(path, self.kept_config), True, model)
        self.members.append(member)
        self.check_all(member)  # every value back, bit for bit
        COVERED["stores reopened"] += 1
        return member

    # -------------------------------------------------------------- rules

    @initialize(
        host_bytes=st.sampled_from([0, 1024, 8192]),
        eviction=st.sampled_from(["scan", "lru"]),
        read_mode=st.sampled_from(["copy", "mmap"]),
        checksum=st.booleans(),
        write_behind_bytes=st.sampled_from([0, "auto"]),
        kept=st.lists(st.booleans(), min_size=1, max_size=3),
    )
    @counted
    def start(self, host_bytes, eviction, read_mode, checksum, write_behind_bytes, kept) -> None:
        """Two configs equal but for keep_store; every value tiered, most spilled."""
        settings_ = dict(
            host_bytes=host_bytes,
            inline_bytes=0,
            disk_path=self.directory,
            eviction=eviction,
            read_mode=read_mode,
            checksum=checksum,
            write_behind_bytes=write_behind_bytes,
            prefetch_depth=2,
        )
        self.kept_config = CacheConfig(**settings_, keep_store=True)
        self.temporary_config = CacheConfig(**settings_, keep_store=False)
        for flag in kept:
            cache = IntermediatesCache(None, "cpu", config=self.config(flag))
            self.members.append(Member(cache, flag))

    @precondition(lambda self: len(self.members) < MAX_OPEN_CACHES)
    @rule(kept=st.booleans(), batches=st.lists(batch_values, max_size=3))
    @counted
    def open_cache(self, kept: bool, batches: list[dict[str, Any]]) -> None:
        member = Member(IntermediatesCache(None, "cpu", config=self.config(kept)), kept)
        self.members.append(member)
        for new in batches:
            self.store(member, None, made(new))

    @precondition(lambda self: self.members)
    @rule(data=st.data(), new=batch_values)
    @counted
    def append(self, data, new: dict[str, Any]) -> None:
        self.store(self.pick(data), None, made(new))

    @precondition(lambda self: any(m.model for m in self.members))
    @rule(data=st.data(), new=batch_values)
    @counted
    def update(self, data, new: dict[str, Any]) -> None:
        member = self.pick(data, with_batches=True)
        self.store(member, self.draw_index(data, member), made(new))

    @precondition(lambda self: any(m.model for m in self.members))
    @rule(data=st.data(), names=name_lists)
    @counted
    def delete(self, data, names) -> None:
        member = self.pick(data, with_batches=True)
        index = self.draw_index(data, member)
        batch = member.model[index]
        if names is not None and any(name not in batch for name in names):
            with pytest.raises(KeyError):
                member.cache.delete(index, names)
            self.check_batch(member, index)  # nothing was deleted
            return
        member.cache.delete(index, names)
        for name in list(batch) if names is None else names:
            batch.pop(name, None)

    @precondition(lambda self: any(m.model for m in self.members))
    @rule(data=st.data(), names=name_lists, flush_first=st.booleans())
    @counted
    def fetch(self, data, names, flush_first: bool) -> None:
        """A batch's values, from wherever they are; after flush() no write is pending,
        so spilled ones come from disk."""
        member = self.pick(data, with_batches=True)
        if flush_first:
            member.cache.flush()
            assert member.cache.stats()["write_behind"]["bytes"] == 0
        self.check_batch(member, self.draw_index(data, member), names)

    @precondition(lambda self: self.members)
    @rule(data=st.data(), prefetch=st.booleans())
    @counted
    def iterate(self, data, prefetch: bool) -> None:
        member = self.pick(data)
        cache = member.cache
        got = list(cache.iter_prefetch() if prefetch else cache.iter())
        assert len(got) == len(member.model)
        for index, actual in enumerate(got):
            assert list(actual) == list(member.model[index])
            for key, value in member.model[index].items():
                COVERED["tensors compared"] += assert_value_same(
                    actual[key], value, f"batch {index}, key {key!r}"
                )

    @precondition(lambda self: sum(bool(m.model) for m in self.members) >= 2)
    @rule(data=st.data(), tensor=tensors, key=keys, then=st.sampled_from(["delete", "close"]))
    @counted
    def one_tensor_in_two_caches(self, data, tensor: RandomTensor, key: str, then: str) -> None:
        """The same tensor object stored in two caches: each holds its own, so deleting
        it from one cache, or closing that cache, leaves the other's intact."""
        first = self.pick(data, with_batches=True)
        others = [n for n, m in enumerate(self.members) if m.model and m is not first]
        second = self.members[data.draw(st.sampled_from(others), label="other_cache")]
        a, b = self.draw_index(data, first), self.draw_index(data, second)
        value = tensor.make()
        self.store(first, a, {key: value})
        self.store(second, b, {key: value})
        if then == "delete":
            first.cache.delete(a, [key])
            del first.model[a][key]
        else:
            self.close_member(first, flush_first=False)
        self.check_batch(second, b, [key])
        COVERED["tensors shared by two caches"] += 1

    @precondition(lambda self: self.given and any(m.model for m in self.members))
    @rule(data=st.data(), key=keys, twice=st.booleans())
    @counted
    def store_again(self, data, key: str, twice: bool) -> None:
        """A tensor given to some cache before (the same object), stored in any cache."""
        tensor = self.given[data.draw(st.integers(0, len(self.given) - 1), label="given")]
        member = self.pick(data, with_batches=True)
        self.store(
            member, self.draw_index(data, member), {key: (tensor, tensor) if twice else tensor}
        )

    @precondition(lambda self: self.members)
    @rule(data=st.data(), flush_first=st.booleans())
    @counted
    def close(self, data, flush_first: bool) -> None:
        """Close a cache (with writes in flight or not): a temporary store goes, a kept
        one stays, complete, to be opened later."""
        self.close_member(self.pick(data), flush_first=flush_first)

    @precondition(lambda self: self.closed and len(self.members) < MAX_OPEN_CACHES)
    @rule(data=st.data())
    @counted
    def reopen(self, data) -> None:
        """Open a kept store closed earlier, while other caches of its pool work."""
        path, model = self.closed.pop(
            data.draw(st.integers(0, len(self.closed) - 1), label="closed_store")
        )
        self.open_store(path, model)

    @precondition(lambda self: any(m.kept for m in self.members))
    @rule(data=st.data(), flush_first=st.booleans())
    @counted
    def close_and_reopen(self, data, flush_first: bool) -> None:
        """Close a kept cache and open its store at once, in the same pool."""
        member = self.pick(data, kept=True)
        self.close_member(member, flush_first=flush_first)
        path, model = self.closed.pop()
        self.open_store(path, model)

    @precondition(
        lambda self: (
            any(m.kept and m.model for m in self.members) and len(self.members) < MAX_OPEN_CACHES
        )
    )
    @rule(
        data=st.data(),
        after=st.lists(st.tuples(changes, batch_values), max_size=3),
        fates=st.lists(st.tuples(file_fates, st.integers(0, 2**20)), min_size=1, max_size=4),
    )
    @counted
    def crash_and_open(self, data, after: list[tuple[str, dict[str, Any]]], fates) -> None:
        """A kept cache flushes, changes more (writes in flight), and its process "dies":
        the store copied as it is at that instant, its owner recorded as dead, opens with
        every entry of the flush, bit for bit, in this pool, beside the live original."""
        member = self.pick(data, with_batches=True, kept=True)
        member.cache.flush()
        flushed = [dict(batch) for batch in member.model]  # values are never changed in place
        path = member.cache.store_path
        at_flush = files_in(Path(path)) if path is not None else set()
        for change, new in after:
            if change == "append" or not member.model:
                self.store(member, None, made(new))
            elif change == "update":
                self.store(member, self.draw_index(data, member), made(new))
            else:
                index = self.draw_index(data, member)
                member.cache.delete(index)
                member.model[index].clear()
        if member.cache.store_path is None:
            return  # nothing was ever spilled: no store to crash
        store = Path(member.cache.store_path)
        image = store.with_name(f"{store.name}-crashed-{self.steps}")
        copy_as_a_crash_leaves_it(store, image)
        # Which files there are depends on the writer threads' timing: nothing drawn may.
        for number, written in enumerate(sorted(files_in(image) - at_flush)):
            fate, length = fates[number % len(fates)]
            tear(image, written, fate, length % ((image / written).stat().st_size + 1))
            COVERED[f"files written after a flush, {fate}"] += 1
        record_owner_dead(image)
        if any(".partial" in p.name for p in image.rglob("*")):
            COVERED["crash images with a write in flight"] += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what the crash dropped is said in a warning
            self.open_store(str(image), flushed)
        assert not [p for p in image.rglob("*") if ".partial" in p.name], "left in the image"
        COVERED["crash images opened"] += 1

    # --------------------------------------------------------- invariants

    @invariant()
    def pools_within_budget(self) -> None:
        for kept in (True, False):
            members = [m for m in self.members if m.kept == kept]
            if not members:
                continue
            shares = [m.cache.stats() for m in members]
            pool = shares[0]["pool"]
            budgets = members[0].cache._core.pool.budgets
            budget = budgets.host_tier_bytes  # host_bytes less write-behind and reads
            assert pool["caches"] == len(members), "caches of one config share one pool"
            assert pool["host"]["peak_bytes"] <= budget, pool["host"]
            # Everything in host memory is in the arena's slots, within host_bytes.
            arena = pool["arena"]
            assert arena["capacity"] == budgets.host_bytes - budgets.host_bytes % 4096
            assert arena["peak_bytes"] <= arena["capacity"], arena
            # The tier gives way where the region ran short, down to half its budget.
            if arena["overflow_bytes"] == 0:
                assert pool["host"]["budget"] == budget
            assert budget // 2 <= pool["host"]["budget"] <= budget
            assert sum(s["host"]["bytes"] for s in shares) == pool["host"]["bytes"]
            # A value deleted while its write runs holds its disk room until the write
            # ends, and is no cache's any more.
            assert sum(s["disk"]["bytes"] for s in shares) <= pool["disk"]["bytes"]
            paths = [s["disk"]["path"] for s in shares if s["disk"]["path"] is not None]
            assert len(set(paths)) == len(paths), "two caches write into one store"
            COVERED["most caches sharing a pool"] = max(
                COVERED["most caches sharing a pool"], len(members)
            )

    @invariant()
    def same_lengths(self) -> None:
        for member in self.members:
            assert len(member.cache) == len(member.model)

    @invariant()
    def count_steps(self) -> None:
        self.steps += 1


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = FAST


@pytest.mark.slow
def test_explore_2000_sequences_of_caches_sharing_pools(capsys):
    """Random seeds; prints what the sequences covered (machines started, counting
    those Hypothesis abandoned part-way, and steps run after start())."""
    COVERED.clear()
    start = time.perf_counter()
    run_state_machine_as_test(PoolMachine, settings=EXPLORE_2000)
    seconds = time.perf_counter() - start
    with capsys.disabled():
        figures = ", ".join(f"{name}: {count}" for name, count in sorted(COVERED.items()))
        print(f"\nPoolMachine, EXPLORE_2000, {seconds:.0f} s: {figures}")
    assert COVERED["sequences"] >= EXPLORE_2000.max_examples
    # The exploration reached what it is for.
    assert COVERED["stores reopened"] > 0 and COVERED["tensors shared by two caches"] > 0
    assert COVERED["bytes written to disk"] > 0 and COVERED["values read back from disk"] > 0
    assert COVERED["most caches sharing a pool"] >= 3
    assert COVERED["crash images opened"] > 0
