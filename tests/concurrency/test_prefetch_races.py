"""Races between prefetch reads on the I/O threads and the caller, forced with Events."""

from __future__ import annotations

import concurrent.futures
import threading
from concurrent.futures import Future
from pathlib import Path

import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.runtime import unlocked
from spillcache._internal.store.tensor_store import Store

SHAPE = (32, 32)


def make(tmp_path, batches: int, **settings) -> IntermediatesCache:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), **settings)
    cache = IntermediatesCache.empty(batches, "cpu", config=config)
    for index in range(batches):
        cache.update(index, {"h": random_tensor(torch.int64, SHAPE, index)})
    cache.flush()  # every value is on disk only
    return cache


class BlockedReads:
    """Makes reads on I/O threads stop until ``release`` is set; ``reading`` says one began."""

    def __init__(self, cache: IntermediatesCache, monkeypatch) -> None:
        self.reading, self.release = threading.Event(), threading.Event()
        original = Store.read_tensor
        pool = cache._core.io

        def read_tensor(store, *args, **kwargs):
            if pool.on_pool_thread():
                self.reading.set()
                assert self.release.wait(timeout=30)
            return original(store, *args, **kwargs)

        monkeypatch.setattr(Store, "read_tensor", read_tensor)


def test_batch_updated_after_its_prefetch_is_fetched_again(tmp_path):
    with make(tmp_path, 3, prefetch_depth=2) as cache:
        replacement = random_tensor(torch.int64, SHAPE, 100)
        iterator = cache.iter_prefetch(["h"])
        first = next(iterator)
        cache._core.io.wait_idle()  # batch 1 is now prefetched: its old value is in hand
        cache.update(1, {"h": replacement})
        assert_same(first["h"], random_tensor(torch.int64, SHAPE, 0))
        assert_same(next(iterator)["h"], replacement)
        assert_same(next(iterator)["h"], random_tensor(torch.int64, SHAPE, 2))


def test_batch_deleted_after_its_prefetch_is_seen_deleted(tmp_path):
    with make(tmp_path, 2, prefetch_depth=1) as cache:
        iterator = cache.iter_prefetch()
        next(iterator)
        cache._core.io.wait_idle()
        cache.delete(1)
        assert next(iterator) == {}


def test_update_does_not_wait_for_a_read_in_flight(tmp_path, monkeypatch):
    """The lock is not held during disk reads: the caller's update of batch 0 completes
    while an I/O thread is stuck reading batch 1, and both see a consistent cache."""
    with make(tmp_path, 2, prefetch_depth=1) as cache:
        blocked = BlockedReads(cache, monkeypatch)
        future = cache._core.submit_fetch(1, None)
        assert blocked.reading.wait(timeout=30)
        cache.update(0, {"h": torch.zeros(SHAPE, dtype=torch.int64)})  # does not block
        assert_same(cache.fetch(0)["h"], torch.zeros(SHAPE, dtype=torch.int64))
        assert not future.done()
        blocked.release.set()
        values = future.result(timeout=30).values
        assert_same(values["h"], random_tensor(torch.int64, SHAPE, 1))


def test_delete_during_a_read_keeps_the_file_until_the_read_is_done(tmp_path, monkeypatch):
    with make(tmp_path, 2, prefetch_depth=1) as cache:
        record = cache._core._batches[1]["h"].leaves[0]
        array = cache._core.tenant.store.path / "tensors" / record.array
        blocked = BlockedReads(cache, monkeypatch)
        future = cache._core.submit_fetch(1, None)
        assert blocked.reading.wait(timeout=30)
        cache.delete(1)
        assert cache.fetch(1) == {}
        assert array.exists(), "the reader holds the record: its file must stay"
        blocked.release.set()
        values = future.result(timeout=30).values
        assert_same(values["h"], random_tensor(torch.int64, SHAPE, 1))
        cache._core.io.wait_idle()  # files are deleted in the background
        assert not array.exists(), "the last holder gone, the file goes too"
        assert cache.stats()["disk"]["bytes"] == 8 * 32 * 32  # batch 0 only


class SpyFuture(Future):
    """A Future that says when somebody starts waiting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waited_on = threading.Event()

    def result(self, timeout=None):
        self.waited_on.set()
        return super().result(timeout)


def test_fetch_waits_for_the_same_record_read_by_a_prefetch(tmp_path, monkeypatch):
    """A fetch of a record that a prefetch is reading waits for that read (one disk read)."""
    with make(tmp_path, 1, prefetch_depth=1) as cache:
        blocked = BlockedReads(cache, monkeypatch)
        future = cache._core.submit_fetch(0, None)
        assert blocked.reading.wait(timeout=30)
        record = cache._core._batches[0]["h"].leaves[0]
        with cache._core._lock:
            assert record.loading is not None  # the prefetch's read, in flight
            record.loading = spy = SpyFuture()
        reads_before = cache.stats()["disk"]["hits"]
        got: dict = {}
        reader = threading.Thread(target=lambda: got.update(cache.fetch(0)))
        reader.start()
        assert spy.waited_on.wait(timeout=30), "the fetch must wait for the read in flight"
        blocked.release.set()
        reader.join(timeout=30)
        assert_same(got["h"], random_tensor(torch.int64, SHAPE, 0))
        future.result(timeout=30)
        assert cache.stats()["disk"]["hits"] == reads_before + 1  # one read served both


def test_abandoned_iteration_and_close_join_the_threads(tmp_path):
    cache = make(tmp_path, 4, prefetch_depth=3)
    iterator = cache.iter_prefetch()
    next(iterator)
    iterator.close()  # queued prefetches are cancelled
    cache.close()
    assert not any(t.name.startswith("spillcache-io") for t in threading.enumerate())


def test_closing_during_a_prefetch_read_deletes_nothing_under_it_and_leaves_nothing(
    tmp_path, monkeypatch
):
    """close() waits for the cache's prefetch still reading; a transaction meanwhile
    (another cache's, of the same pool) must hand the lanes no deletion of the closing
    cache's arrays: close would not wait for it, and it would delete the file under the
    read. The read gives its value, and nothing of the cache is left after close."""
    closing = make(tmp_path, 2, prefetch_depth=1)
    other = IntermediatesCache.empty(1, "cpu", config=closing.config)  # the same pool
    core, store = closing._core, Path(closing.store_path)
    blocked = BlockedReads(closing, monkeypatch)
    waiting, real_end_jobs = threading.Event(), core._end_jobs

    def end_jobs(jobs):
        waiting.set()
        real_end_jobs(jobs)

    handed, real_submit = [], core.io.submit

    def submit(priority, fn, *args, lane=0):
        job = real_submit(priority, fn, *args, lane=lane)
        if getattr(fn, "__name__", "") == "_delete_from_disk" and args[0] is core.tenant:
            handed.append(job)
        return job

    monkeypatch.setattr(core, "_end_jobs", end_jobs)
    monkeypatch.setattr(core.io, "submit", submit)
    future = core.submit_fetch(1, None)
    assert blocked.reading.wait(timeout=30)
    closer = threading.Thread(target=closing.close)
    closer.start()
    assert waiting.wait(timeout=30)  # close waits for the read in flight
    other.update(0, {"h": random_tensor(torch.int64, SHAPE, 9)})
    concurrent.futures.wait(handed, timeout=30)  # what that handed over has run
    blocked.release.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert_same(future.result(timeout=30).values["h"], random_tensor(torch.int64, SHAPE, 1))
    assert handed == [] and not store.exists()
    other.close()


def _tiers_after_a_propagation_pass(tmp_path, monkeypatch, order: str) -> dict:
    """Three batches of one value each, a host tier of one value; a pass that replaces
    each batch's value (update, then delete the old one), as llm-compressor's
    propagation pass does. ``order``: plain ``iter``, or ``iter_prefetch`` with batch 1's
    read forced to finish ``before`` or ``after`` batch 0's delete frees the host tier."""
    value = random_tensor(torch.int64, SHAPE, 0)
    config = CacheConfig(
        host_bytes=value.nbytes, inline_bytes=0, disk_path=str(tmp_path), write_behind_bytes=0
    )
    cache = IntermediatesCache.empty(3, "cpu", config=config)
    for index in range(3):  # batch 0 resident, 1 and 2 on disk
        cache.update(index, {"h": random_tensor(torch.int64, SHAPE, index)})
    original = unlocked._read_record
    read_done, may_read = threading.Event(), threading.Event()

    def gated(record, *args):
        if record.label.startswith("batch 1,") and order == "after":
            assert may_read.wait(timeout=30)
        tensor = original(record, *args)
        if record.label.startswith("batch 1,"):
            read_done.set()
        return tensor

    monkeypatch.setattr(unlocked, "_read_record", gated)
    batches = cache.iter(["h"]) if order == "plain" else cache.iter_prefetch(["h"])
    for index, _ in enumerate(batches):
        if index == 0 and order == "before":
            assert read_done.wait(timeout=30)
        cache.update(index, {"g": random_tensor(torch.int64, SHAPE, 10 + index)})
        cache.delete(index, ["h"])
        may_read.set()
    cache.flush()
    stats = cache.stats()
    placed = {tier: stats[tier]["bytes"] for tier in ("host", "disk")}
    placed["written"], placed["read"] = stats["disk"]["bytes_written"], stats["disk"]["bytes_read"]
    cache.close()
    return placed


def test_regression_a_prefetched_value_is_promoted_when_taken_not_when_read(tmp_path, monkeypatch):
    """Caught by `spillcache plan`'s replays: a prefetch read that finished after the
    caller freed room took that room, one that finished before did not, so the bytes a
    run wrote depended on thread timing. Now both place values as a plain fetch does."""
    plain = _tiers_after_a_propagation_pass(tmp_path / "plain", monkeypatch, "plain")
    for order in ("before", "after"):
        assert _tiers_after_a_propagation_pass(tmp_path / order, monkeypatch, order) == plain
