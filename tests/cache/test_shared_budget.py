"""One budget per process: caches built with one config share one pool."""

from __future__ import annotations

import threading

import pytest
import torch

from spill_testing import assert_same, random_tensor, tier_sizes
from spillcache import CacheConfig, IntermediatesCache

SHAPE = (16, 64)  # 4 KiB of float32
NBYTES = 16 * 64 * 4


# The parts of host_bytes for values waiting for their disk write and for values read
# back or copied in, three values each: the victims of the updates below wait for their
# writes (an update waits only while more than write_behind_bytes waits, so its own
# victims may go one value past it) and the values read back or updated meanwhile fit,
# without the region overflowing. The host tier holds the rest of host_bytes.
TRANSIT = 3 * NBYTES


def config_for(tmp_path, slots: int, **settings) -> CacheConfig:
    """A host tier of ``slots`` values (host_bytes less the transit parts, which every
    cache of the pool shares too); every tensor tiered."""
    return CacheConfig(
        **tier_sizes(slots * NBYTES, TRANSIT),
        inline_bytes=0,
        disk_path=str(tmp_path),
        **settings,
    )


def value(seed: int) -> torch.Tensor:
    return random_tensor(torch.float32, SHAPE, seed)


def pool_host_bytes(cache: IntermediatesCache) -> int:
    return cache.stats()["pool"]["host"]["bytes"]


@pytest.mark.parametrize("eviction", ["scan", "lru"])
def test_host_tier_bytes_over_all_caches_never_exceed_the_one_budget(tmp_path, eviction):
    config = config_for(tmp_path, 6, eviction=eviction)
    caches = [IntermediatesCache.empty(4, "cpu", config=config) for _ in range(4)]
    try:
        for batch in range(4):
            for number, cache in enumerate(caches):
                cache.update(batch, {"h": value(10 * number + batch)})
                shares = [other.stats()["host"]["bytes"] for other in caches]
                assert sum(shares) == pool_host_bytes(cache) <= 6 * NBYTES
        # Each cache alone would have held 4 values in RAM: 16 in all, not 6.
        assert caches[0].stats()["pool"]["caches"] == 4
        assert sum(cache.stats()["disk"]["bytes"] for cache in caches) >= 10 * NBYTES
        for number, cache in enumerate(caches):
            for batch in range(4):
                assert_same(cache.fetch(batch)["h"], value(10 * number + batch))
                assert pool_host_bytes(cache) <= 6 * NBYTES
    finally:
        for cache in caches:
            cache.close()


def test_a_cache_nobody_uses_loses_its_values_first(tmp_path):
    config = config_for(tmp_path, 4)
    with (
        IntermediatesCache.empty(2, "cpu", config=config) as idle,
        IntermediatesCache.empty(8, "cpu", config=config) as busy,
    ):
        idle.update(0, {"h": value(0)})
        idle.update(1, {"h": value(1)})
        for batch in range(4):  # longer than a pass over the idle cache's two batches
            busy.update(batch, {"h": value(100 + batch)})
        # The busy cache's four values fill the tier; the idle one's went to disk.
        assert busy.stats()["host"]["bytes"] == 4 * NBYTES
        assert idle.stats()["host"]["bytes"] == 0
        assert idle.stats()["host"]["evictions"] == 2
        assert busy.stats()["host"]["evictions"] == 0
        idle.flush()
        assert idle.stats()["disk"]["bytes"] == 2 * NBYTES
        for batch in range(2):
            assert_same(idle.fetch(batch)["h"], value(batch))


def test_a_cache_being_read_keeps_its_next_batches(tmp_path):
    """Scan: while one cache is read in order, the other cache's values (idle) go to
    make room for what the reader brings back, and the reader's own next batches stay."""
    config = config_for(tmp_path, 4)
    with (
        IntermediatesCache.empty(4, "cpu", config=config) as reader,
        IntermediatesCache.empty(2, "cpu", config=config) as idle,
    ):
        for batch in range(4):
            reader.update(batch, {"h": value(batch)})
        # Needed half a pass from now: the reader's batch 3, needed last, makes room.
        idle.update(0, {"h": value(50)})
        # Needed a whole pass from now, later than any of the reader's: goes to disk.
        idle.update(1, {"h": value(51)})
        assert reader.stats()["host"]["bytes"] == 3 * NBYTES
        assert idle.stats()["host"]["bytes"] == NBYTES
        # Batch 3's write lands first: the passes read it back from disk (a value still
        # waiting for its write is served from RAM, and promoted by no read).
        reader.flush()
        for _ in range(2):  # two passes: the idle cache is untouched all along
            for batch, values in enumerate(reader.iter_prefetch(["h"])):
                assert_same(values["h"], value(batch))
        # The reader's values read back from disk took the idle cache's room.
        assert reader.stats()["host"]["bytes"] == 4 * NBYTES
        assert idle.stats()["host"]["bytes"] == 0
        assert_same(idle.fetch(1)["h"], value(51))


def test_closing_a_cache_gives_its_share_back_at_once(tmp_path):
    config = config_for(tmp_path, 4)
    first = IntermediatesCache.empty(2, "cpu", config=config)
    with IntermediatesCache.empty(4, "cpu", config=config) as second:
        first.update(0, {"h": value(0)})
        first.update(1, {"h": value(1)})
        assert pool_host_bytes(second) == 2 * NBYTES
        first.close()
        assert pool_host_bytes(second) == 0
        assert second.stats()["pool"]["caches"] == 1
        for batch in range(4):  # all four fit again without going to disk
            second.update(batch, {"h": value(10 + batch)})
        assert second.stats()["host"]["bytes"] == 4 * NBYTES
        assert second.stats()["disk"]["bytes_written"] == 0


def test_a_collected_cache_gives_its_share_back(tmp_path):
    config = config_for(tmp_path, 4)
    with IntermediatesCache.empty(1, "cpu", config=config) as kept:
        dropped = IntermediatesCache.empty(1, "cpu", config=config)
        dropped.update(0, {"h": value(0)})
        assert pool_host_bytes(kept) == NBYTES
        del dropped  # llm-compressor never closes its caches
        assert pool_host_bytes(kept) == 0


def test_a_cache_with_another_config_has_a_pool_of_its_own(tmp_path):
    with (
        IntermediatesCache.empty(2, "cpu", config=config_for(tmp_path, 2)) as one,
        IntermediatesCache.empty(2, "cpu", config=config_for(tmp_path, 3)) as other,
    ):
        for batch in range(2):
            one.update(batch, {"h": value(batch)})
            other.update(batch, {"h": value(batch)})
        assert one.stats()["pool"]["caches"] == other.stats()["pool"]["caches"] == 1
        assert pool_host_bytes(one) == pool_host_bytes(other) == 2 * NBYTES


def test_the_last_cache_of_a_pool_joins_its_threads(tmp_path):
    config = config_for(tmp_path, 0)
    first = IntermediatesCache.empty(1, "cpu", config=config)
    second = IntermediatesCache.empty(1, "cpu", config=config)
    first.update(0, {"h": value(0)})
    second.update(0, {"h": value(1)})
    first.close()
    assert_same(second.fetch(0)["h"], value(1))  # the pool still works for the other
    assert any(t.name.startswith("spillcache-io") for t in threading.enumerate())
    second.close()
    assert not any(t.name.startswith("spillcache-io") for t in threading.enumerate())
    assert not list(tmp_path.iterdir())  # both stores removed


def test_regression_a_cache_collected_inside_another_caches_operation_does_not_deadlock(
    tmp_path,
):
    """The garbage collector can run inside any allocation, so a dropped cache's
    finalizer may fire on a thread that holds the pool's lock (another cache of the pool
    in the middle of an update): closing it there waited for that lock forever."""
    config = config_for(tmp_path, 4)
    busy = IntermediatesCache.empty(1, "cpu", config=config)
    held = [IntermediatesCache.empty(1, "cpu", config=config)]
    held[0].update(0, {"h": value(0)})
    finalizer = held[0]._finalizer
    lock = busy._core.pool.lock
    done = threading.Event()

    def collect_while_locked() -> None:
        with lock:  # as inside busy.update, when an allocation starts the collector
            held.clear()  # the last reference: its finalizer runs here and now
        done.set()

    worker = threading.Thread(target=collect_while_locked, daemon=True)
    worker.start()
    # On failure the lock stays held by the stuck thread: busy is left unclosed then,
    # so that the test fails instead of hanging.
    assert done.wait(timeout=30), "the finalizer waited for the lock its thread held"
    with busy:
        assert not finalizer.alive
        busy._core.io.wait_idle()  # it was closed on a pool thread once the lock was free
        assert pool_host_bytes(busy) == 0
        assert busy.stats()["pool"]["caches"] == 1
