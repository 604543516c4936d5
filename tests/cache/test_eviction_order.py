"""Which value leaves the host tier, through the paths a running cache takes.

Each test fills a tiny host tier so that two or more resident values both outrank the
newcomer (a new value, or one read back from disk) and only the policy's order decides
which one goes: ``scan`` evicts the value needed furthest into a pass (after the
reader's position, cyclically; across caches as a fraction of each cache's pass) and
only one needed later than the newcomer; ``lru`` the least recently used, on one clock
for every cache of the pool. After the moves, the values still in RAM are checked from
the placement's records and then, through ``stats()``, by which fetch is a host hit.
"""

from __future__ import annotations

import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheConfig, IntermediatesCache

ROWS, COLS = 32, 32
NBYTES = ROWS * COLS * 4  # one slot: 4 KiB of float32


# The parts of host_bytes for values waiting for their disk write and for values read
# back or copied in, two values each: the victims below wait for their writes, and the
# values read back or updated, without the region overflowing. The host tier holds the
# rest of host_bytes: exactly the ``slots`` a test asks for.
TRANSIT = 2 * NBYTES


def config_for(tmp_path, slots: int, eviction: str) -> CacheConfig:
    """A host tier of ``slots`` values (host_bytes less the transit parts); every tensor
    tiered, the rest on disk."""
    return CacheConfig(
        **tier_sizes(slots * NBYTES, TRANSIT),
        inline_bytes=0,
        disk_path=str(tmp_path),
        eviction=eviction,
    )


def value(seed: int, slots: int = 1) -> torch.Tensor:
    """A float32 tensor of ``slots`` slots with random bits (NaN payloads included)."""
    return random_tensor(torch.float32, (ROWS * slots, COLS), seed)


def in_host_tier(cache: IntermediatesCache) -> set[tuple[int, str]]:
    """(batch, key) of the cache's values whose copy is in the host tier. Read from the
    pool's placement, internal state: no public call names which values are in RAM."""
    core = cache._core
    with core.pool.lock:
        records = core.placement.records_of(core.tenant)
        return {(record.batch, record.key) for record in records if record.resident == "host"}


def assert_served(cache: IntermediatesCache, batch: int, want: torch.Tensor, *, from_host: bool):
    """Fetch ``batch``: a host-tier hit if ``from_host``, else a miss; bits as stored.
    Check the values expected in RAM first: a hit moves nothing, a miss may promote."""
    before = cache.stats()["host"]
    got = cache.fetch(batch)["h"]
    after = cache.stats()["host"]
    counted = (after["hits"] - before["hits"], after["misses"] - before["misses"])
    assert counted == ((1, 0) if from_host else (0, 1)), (batch, counted)
    assert_same(got, want)


def assert_both_served(caches: dict, values: dict, *, host: tuple, disk: tuple) -> None:
    """``assert_served`` over two caches by name ("a", "b"): the (name, batch) pairs in
    ``host`` as host-tier hits, then those in ``disk`` as misses."""
    for pairs, from_host in ((host, True), (disk, False)):
        for name, batch in pairs:
            assert_served(caches[name], batch, values[name, batch], from_host=from_host)


# ------------------------------------------------------------------ scan


def test_scan_update_evicts_the_value_needed_furthest_after_the_reader(tmp_path):
    values = {batch: value(batch) for batch in range(6)}
    with IntermediatesCache.empty(6, "cpu", config=config_for(tmp_path, 3, "scan")) as cache:
        for batch in (1, 3, 5):
            cache.update(batch, {"h": values[batch]})
        cache.fetch(2)  # the reader takes batch 2: next come 3, 4, 5, 0, 1, 2
        assert in_host_tier(cache) == {(1, "h"), (3, "h"), (5, "h")}

        # Batch 4 is needed second: batch 1 (fifth) and batch 5 (third) are both
        # needed later. Batch 1 goes: furthest, though its index is the lowest.
        cache.update(4, {"h": values[4]})
        assert in_host_tier(cache) == {(3, "h"), (4, "h"), (5, "h")}
        assert cache.stats()["host"]["evictions"] == 1

        # Batch 0 is needed fourth, after every resident value: it evicts none.
        cache.update(0, {"h": values[0]})
        assert in_host_tier(cache) == {(3, "h"), (4, "h"), (5, "h")}
        assert cache.stats()["host"]["evictions"] == 1

        for batch in (3, 4, 5):
            assert_served(cache, batch, values[batch], from_host=True)
        for batch in (0, 1):
            assert_served(cache, batch, values[batch], from_host=False)


def test_scan_pin_memory_evicts_the_value_needed_furthest_for_a_value_read_back(tmp_path):
    values = {batch: value(batch) for batch in range(6)}
    with IntermediatesCache.empty(6, "cpu", config=config_for(tmp_path, 3, "scan")) as cache:
        for batch in (1, 2, 4):
            cache.update(batch, {"h": values[batch]})
        # Before any read batch 5 is needed last: it bypasses the full tier to disk.
        cache.update(5, {"h": values[5]})
        assert in_host_tier(cache) == {(1, "h"), (2, "h"), (4, "h")}
        cache.flush()
        cache.fetch(3)  # next come 4, 5, 0, 1, 2, 3

        # pin_memory brings batch 5 (needed second) up as a new value would come: batch
        # 2 (fifth) and batch 1 (fourth) are both needed later, batch 2 goes.
        cache.pin_memory(5)
        assert in_host_tier(cache) == {(1, "h"), (4, "h"), (5, "h")}
        assert cache.stats()["host"]["evictions"] == 1
        for batch in (1, 4, 5):
            assert_served(cache, batch, values[batch], from_host=True)
        assert_served(cache, 2, values[2], from_host=False)


def test_scan_value_read_back_takes_free_room_and_evicts_no_active_cache(tmp_path):
    config = config_for(tmp_path, 3, "scan")
    values = {("a", batch): value(batch) for batch in range(8)}
    values |= {("b", batch): value(100 + batch) for batch in range(8)}
    with (
        IntermediatesCache.empty(8, "cpu", config=config) as a,
        IntermediatesCache.empty(8, "cpu", config=config) as b,
    ):
        a.update(1, {"h": values["a", 1]})
        b.update(1, {"h": values["b", 1]})
        b.update(2, {"h": values["b", 2]})
        a.update(7, {"h": values["a", 7]})  # needed last of all: bypasses the full tier
        a.flush()
        assert (in_host_tier(a), in_host_tier(b)) == ({(1, "h")}, {(1, "h"), (2, "h")})

        # A value the reader takes from disk is not promoted over b's, both caches
        # being worked on ...
        assert_served(a, 7, values["a", 7], from_host=False)
        assert (in_host_tier(a), in_host_tier(b)) == ({(1, "h")}, {(1, "h"), (2, "h")})
        assert a.stats()["host"]["evictions"] == b.stats()["host"]["evictions"] == 0

        # ... but takes free room.
        b.delete(2, ["h"])
        assert_served(a, 7, values["a", 7], from_host=False)
        assert (in_host_tier(a), in_host_tier(b)) == ({(1, "h"), (7, "h")}, {(1, "h")})
        assert_served(a, 7, values["a", 7], from_host=True)


def test_scan_across_two_caches_evicts_the_furthest_fraction_of_a_pass(tmp_path):
    config = config_for(tmp_path, 4, "scan")
    values = {("a", batch): value(batch) for batch in range(8)}
    values |= {("b", batch): value(100 + batch) for batch in range(4)}
    with (
        IntermediatesCache.empty(8, "cpu", config=config) as a,
        IntermediatesCache.empty(4, "cpu", config=config) as b,
    ):
        assert b.stats()["pool"]["caches"] == 2  # one pool, one host budget
        for cache, batch in (("a", 4), ("a", 6), ("b", 1), ("b", 3)):
            (a if cache == "a" else b).update(batch, {"h": values[cache, batch]})
        b.fetch(2)
        # Next uses, as fractions of each cache's pass: a's reader has read nothing (a4:
        # 5/8, a6: 7/8); b's took batch 2 of 4 (b3: 1/4, b1: 3/4).
        assert (in_host_tier(a), in_host_tier(b)) == ({(4, "h"), (6, "h")}, {(1, "h"), (3, "h")})

        # a0 (1/8) outranks all four: a6 goes, the furthest wherever it lives.
        a.update(0, {"h": values["a", 0]})
        assert (in_host_tier(a), in_host_tier(b)) == ({(0, "h"), (4, "h")}, {(1, "h"), (3, "h")})

        # a1 (2/8) outranks a4 (5/8, 5 reads away) and b1 (3/4, only 3 reads away):
        # b1 goes, further into its own pass.
        a.update(1, {"h": values["a", 1]})
        assert (in_host_tier(a), in_host_tier(b)) == (
            {(0, "h"), (1, "h"), (4, "h")},
            {(3, "h")},
        )

        # a7 (8/8) is needed after every resident value, in either cache: it evicts none.
        a.update(7, {"h": values["a", 7]})
        assert (in_host_tier(a), in_host_tier(b)) == (
            {(0, "h"), (1, "h"), (4, "h")},
            {(3, "h")},
        )
        assert (a.stats()["host"]["evictions"], b.stats()["host"]["evictions"]) == (1, 1)

        assert_both_served(
            {"a": a, "b": b},
            values,
            host=(("a", 0), ("a", 1), ("a", 4), ("b", 3)),
            disk=(("a", 6), ("a", 7), ("b", 1)),
        )


# ------------------------------------------------------------------- lru


def test_lru_update_evicts_the_least_recently_used(tmp_path):
    values = {batch: value(batch) for batch in range(3)}
    big = value(3, slots=2)
    with IntermediatesCache.empty(4, "cpu", config=config_for(tmp_path, 3, "lru")) as cache:
        for batch in range(3):
            cache.update(batch, {"h": values[batch]})
        cache.fetch(0)
        cache.fetch(1)  # least recently used first: 2, 0, 1

        # A value of two slots: the two least recently used go, batch 1 stays.
        cache.update(3, {"h": big})
        assert in_host_tier(cache) == {(1, "h"), (3, "h")}
        assert cache.stats()["host"]["evictions"] == 2

        assert_served(cache, 1, values[1], from_host=True)
        assert_served(cache, 3, big, from_host=True)
        for batch in (0, 2):
            assert_served(cache, batch, values[batch], from_host=False)


def test_lru_read_promotes_by_evicting_the_least_recently_used(tmp_path):
    values = {batch: value(batch) for batch in range(4)}
    with IntermediatesCache.empty(4, "cpu", config=config_for(tmp_path, 3, "lru")) as cache:
        cache.update(0, {"h": values[0]})
        cache.update(3, {"h": value(99, slots=3)})  # fills the tier: batch 0 to disk
        cache.delete(3, ["h"])
        for batch in (1, 2, 3):
            cache.update(batch, {"h": values[batch]})
        cache.flush()  # batch 0 written: a fetch reads it from disk and promotes it
        cache.fetch(2)
        cache.fetch(1)  # least recently used first: 3, 2, 1
        assert in_host_tier(cache) == {(1, "h"), (2, "h"), (3, "h")}
        evictions = cache.stats()["host"]["evictions"]

        assert_served(cache, 0, values[0], from_host=False)
        assert in_host_tier(cache) == {(0, "h"), (1, "h"), (2, "h")}
        assert cache.stats()["host"]["evictions"] == evictions + 1

        for batch in (0, 1, 2):
            assert_served(cache, batch, values[batch], from_host=True)
        assert_served(cache, 3, values[3], from_host=False)


def test_lru_across_two_caches_evicts_the_oldest_wherever_it_lives(tmp_path):
    config = config_for(tmp_path, 4, "lru")
    values = {(name, batch): value(seed + batch) for name, seed in (("a", 0), ("b", 100))
              for batch in range(3)}  # fmt: skip
    with (
        IntermediatesCache.empty(8, "cpu", config=config) as a,
        IntermediatesCache.empty(8, "cpu", config=config) as b,
    ):
        for batch in (0, 1):
            a.update(batch, {"h": values["a", batch]})
            b.update(batch, {"h": values["b", batch]})
        a.fetch(0)  # least recently used first: b0, a1, b1, a0

        a.update(2, {"h": values["a", 2]})  # b0 goes: the oldest is b's
        assert (in_host_tier(a), in_host_tier(b)) == ({(0, "h"), (1, "h"), (2, "h")}, {(1, "h")})
        b.update(2, {"h": values["b", 2]})  # now a1 goes: a's is the oldest
        assert (in_host_tier(a), in_host_tier(b)) == ({(0, "h"), (2, "h")}, {(1, "h"), (2, "h")})
        assert (a.stats()["host"]["evictions"], b.stats()["host"]["evictions"]) == (1, 1)

        assert_both_served(
            {"a": a, "b": b},
            values,
            host=(("a", 0), ("a", 2), ("b", 1), ("b", 2)),
            disk=(("a", 1), ("b", 0)),
        )


def test_lru_read_across_two_caches_evicts_the_oldest_wherever_it_lives(tmp_path):
    config = config_for(tmp_path, 4, "lru")
    values = {(name, batch): value(seed + batch) for name, seed in (("a", 0), ("b", 100))
              for batch in range(3)}  # fmt: skip
    with (
        IntermediatesCache.empty(8, "cpu", config=config) as a,
        IntermediatesCache.empty(8, "cpu", config=config) as b,
    ):
        a.update(0, {"h": values["a", 0]})
        a.update(3, {"h": value(99, slots=4)})  # fills the tier: a0 to disk
        a.delete(3, ["h"])
        for batch in (0, 1):
            b.update(batch, {"h": values["b", batch]})
            a.update(batch + 1, {"h": values["a", batch + 1]})
        a.flush()  # a0 written: a fetch reads it from disk and promotes it
        b.fetch(0)
        a.fetch(1)  # least recently used first: b1, a2, b0, a1
        assert (in_host_tier(a), in_host_tier(b)) == ({(1, "h"), (2, "h")}, {(0, "h"), (1, "h")})

        assert_served(a, 0, values["a", 0], from_host=False)  # b1 goes: the oldest is b's
        assert (in_host_tier(a), in_host_tier(b)) == (
            {(0, "h"), (1, "h"), (2, "h")},
            {(0, "h")},
        )
        assert (a.stats()["host"]["evictions"], b.stats()["host"]["evictions"]) == (1, 1)

        assert_both_served(
            {"a": a, "b": b},
            values,
            host=(("a", 0), ("a", 1), ("a", 2), ("b", 0)),
            disk=(("b", 1),),
        )
