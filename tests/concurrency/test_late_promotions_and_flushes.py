"""Work that lands late finds the record as it is now, not as it was.

A prefetch reads a value from disk, and its promotion into the host tier waits until
the caller takes the batch (``mark_read``); a kept store's flush takes a snapshot of
what is on disk under the lock and writes the structures without it. Meanwhile the
record may have been promoted by another read, its disk copy dropped, and its value
evicted and queued for a write again under a new array name. A late promotion then
leaves it alone (it is in memory already, in the write-behind area), and the flush
names the array it found, which it keeps, not the one still being written.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

from concurrency.test_transactions_taken_back import gate, run_in_thread
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.engine.placement import Placement
from spillcache._internal.engine.records import Admission, WriteState
from spillcache._internal.engine.tenants import Tenant
from spillcache._internal.engine.tiers import DiskTier
from spillcache._internal.store.store_format import ARRAY_PREFIX, batch_dir, tensors_dir
from spillcache._internal.store.tensor_store import Store
from spillcache.errors import StoreError

KIB64 = 64 * 2**10


def big(seed):
    return torch.full((KIB64 // 4,), float(seed))


CPU = torch.device("cpu")
SIZE = 64


def value(seed):
    return torch.full((SIZE // 4,), float(seed))


def test_a_deferred_promotion_of_a_record_queued_for_a_write_again(tmp_path):
    p = Placement(device_budget=0, host_budget=2 * SIZE, disk=DiskTier(2 * SIZE), pin_host=False)
    tenant = p.add_tenant(Tenant(True, "lru"))
    tenant.attach(Store.create(tmp_path / "stores"), 0)
    p.copies_under_lock = True  # host copies of the CPU values made at once

    def admit(seed):
        (record,) = p.admit([Admission(value(seed), CPU)], tenant=tenant)
        return record

    def drain(fail=()):
        for record, tensor in p.take_writes():
            error = StoreError("EIO") if record in fail else None
            if error is None:
                tenant.store.write_tensor(record.array, tensor)
            p.write_done(record, error)
        p.take_deletions()

    r, a = admit(0), admit(1)
    admit(2)  # r (least recently used) goes to disk
    drain()
    assert r.resident is None and r.on_disk
    # A prefetch job reads r (hold, read outside the lock, release); its promotion
    # waits for the reader's mark_read.
    p.hold(r)
    assert p.begin_load(r) is None
    prefetched = tenant.store.read_tensor(r.array, r.shape, r.dtype)
    p.read_done(r, prefetched, promote=False)
    p.release([r])
    # Meanwhile a plain fetch reads r too and promotes it (a evicted: the disk is full).
    assert p.begin_load(r) is None
    p.read_done(r, tenant.store.read_tensor(r.array, r.shape, r.dtype), promote=True)
    drain()
    assert r.resident == "host" and r.on_disk
    # c's victim b needs disk room: r's clean copy is dropped.
    c = admit(3)
    drain()
    assert not r.on_disk and r.resident == "host"
    p.release([a, c])  # room on disk for r, and in the host tier
    d = admit(4)
    admit(5)  # r is evicted and queued for a write again
    assert r.resident is None and r.write_state == WriteState.QUEUED
    p.release([d])
    # The reader takes the prefetched batch: mark_read promotes what the job read.
    p.promote(r, prefetched)
    assert not (r.resident == "host" and r.write_state is not None), (
        "r is in the host tier and in the write-behind area at once"
    )
    drain(fail={r})  # its write fails: write_done puts it back in the host tier


def test_the_failed_write_of_a_promoted_record_in_a_cache(tmp_path, monkeypatch):
    config = CacheConfig(
        host_bytes="4MiB", inline_bytes=0, disk_path=str(tmp_path), eviction="lru",
        write_behind_bytes=4 * KIB64,
    )  # fmt: skip
    cache = IntermediatesCache.empty(6, "cpu", config=config)
    core = cache._core
    p = core.placement
    p.host.budget, p.disk.budget = 2 * KIB64, 2 * KIB64
    cache.update(0, {"h": big(0)})
    cache.update(1, {"h": big(1)})
    cache.update(2, {"h": big(2)})  # batch 0's value r goes to disk
    cache.flush()
    (r,) = core._batches[0]["h"].leaves[:1]
    assert r.resident is None and r.on_disk
    fetched = core.submit_fetch(0, None).result(30)  # iter_prefetch's job for batch 0
    assert [record for record, _ in fetched.read] == [r]
    cache.fetch(0)  # a plain fetch reads r and promotes it (batch 1's value to disk)
    cache.flush()
    cache.update(3, {"h": big(3)})  # the disk is full: r's clean copy is dropped
    cache.flush()
    assert r.resident == "host" and not r.on_disk
    cache.delete(1)
    cache.delete(3)
    reached, go = threading.Event(), threading.Event()
    real_write = Store.write_tensor

    def write_tensor(store, array, tensor, **kwargs):
        if array == f"{r.rid}.2":  # r's second write: held up, then it fails
            reached.set()
            assert go.wait(30)
            raise OSError(5, "EIO")
        return real_write(store, array, tensor, **kwargs)

    monkeypatch.setattr(Store, "write_tensor", write_tensor)
    cache.update(4, {"h": big(4)})
    cache.update(5, {"h": big(5)})  # r evicted: written again
    assert reached.wait(30)
    cache.delete(4)
    core.mark_read(0, fetched.read)  # the caller takes the prefetched batch 0
    both = r.resident == "host" and r.write_state is not None
    go.set()
    core.io.wait_idle()
    try:
        with pytest.raises(StoreError):
            cache.flush()  # r's write failed: reported here
        assert core.pool.arena._expected == 0, "the failed write's end never reached the arena"
        assert not both, "r was in the host tier and being written at once"
    finally:
        monkeypatch.undo()
        cache.close()


def named_arrays(path, index):
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("array"), str):
                found.append(node["array"].removeprefix(ARRAY_PREFIX))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads((batch_dir(path, index) / "zarr.json").read_text()))
    return found


def test_a_flush_names_only_arrays_that_are_written(tmp_path, monkeypatch):
    config = CacheConfig(
        host_bytes="4MiB", inline_bytes=0, disk_path=str(tmp_path), eviction="lru",
        write_behind_bytes=4 * KIB64, keep_store=True,
    )  # fmt: skip
    cache = IntermediatesCache.empty(4, "cpu", config=config)
    core = cache._core
    p = core.placement
    p.host.budget, p.disk.budget = 2 * KIB64, 4 * KIB64
    write_go = threading.Event()
    try:
        cache.update(0, {"h": big(0)})
        cache.update(1, {"h": big(1)})
        cache.flush()  # r (batch 0) and batch 1's value: in the host tier, clean copies on disk
        r = core._batches[0]["h"].leaves[0]
        assert r.on_disk and r.resident == "host"
        first = r.array
        # A flush, held up after its writes, before it writes the structures.
        synced, go_on = gate(Store, "sync_written", patch=monkeypatch)
        flusher, errors = run_in_thread(cache.flush)
        assert synced.wait(30)
        write_reached = threading.Event()
        real_write = Store.write_tensor

        def write_tensor(store, array, tensor, **kwargs):
            if array == f"{r.rid}.2" and threading.current_thread() is not flusher:
                write_reached.set()
                assert write_go.wait(30)
            return real_write(store, array, tensor, **kwargs)

        monkeypatch.setattr(Store, "write_tensor", write_tensor)
        # Too big for the host tier: to disk, where r's clean copy makes room for it.
        cache.update(2, {"h": torch.zeros(3 * KIB64 // 4)})
        assert not r.on_disk and r.resident == "host"
        cache.update(3, {"h": big(3)})  # r evicted: written again, as "<rid>.2"
        assert write_reached.wait(30) and r.array != first
        go_on.set()
        flusher.join(30)
        assert errors == []
        path = core.tenant.store.path
        for name in named_arrays(path, 0):
            assert (tensors_dir(path) / name / "zarr.json").exists(), (
                f"the flush committed batch 0 naming array {name}, which is not written "
                f"(the array it found, {first}, exists: {(tensors_dir(path) / first).exists()})"
            )
    finally:
        write_go.set()
        monkeypatch.undo()
        cache.close()
