"""Writes that fail (ENOSPC, EIO) at the system call, in the background and inline.

A background write that fails is reported once, by the cache's next call, in one error
naming every batch and key whose write failed since the last report; the values stay
readable (from the host tier, counted against host_bytes), and no more values go to that
disk until it can take them. Nothing acknowledged is lost; nothing is left after close.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path

import pytest

from faults.injection import aligned, leftovers, same_bits, unaligned
from spill_testing import tier_sizes
from spillcache import CacheConfig, DiskFullError, IntermediatesCache, StoreError
from spillcache._internal.engine.placement import Placement
from spillcache._internal.io import aio
from spillcache._internal.runtime import pool
from spillcache._internal.store.store_format import read_root_attributes
from spillcache._internal.store.tensor_store import Store

KIB64 = 64 * 2**10
MIB4 = 4 * 2**20  # above a staging buffer's piece (2 MiB): queued with native AIO
CHUNK = "/c."  # a chunk file (its .partial name while written), not a zarr.json


def make(tmp_path, num_batches: int = 4, **settings) -> IntermediatesCache:
    settings = {"host_bytes": 0, "inline_bytes": 0, "disk_path": str(tmp_path / "spill")} | settings
    return IntermediatesCache.empty(num_batches, "cpu", config=CacheConfig(**settings))


def aio_works() -> bool:
    with aio.context() as ctx:
        return ctx is not None


def test_regression_failed_writes_are_reported_once_not_one_per_later_call(
    tmp_path, syscalls, free_space
):
    """What the full loop device showed: each failed write raised by some later,
    unrelated call, one per call. Now: one error, naming all of them, then none."""
    free_space.set(tmp_path, 2**30)
    gate = threading.Event()
    rule = syscalls.fail("pwrite", errno.ENOSPC, path=CHUNK, times=3, gate=gate)
    values = [unaligned(KIB64, seed) for seed in range(4)]
    with make(tmp_path) as cache, syscalls.released():
        for index in range(3):
            cache.update(index, {"h": values[index]})  # returns; its write waits at the gate
        gate.set()
        with pytest.raises(DiskFullError) as raised:
            cache.flush()
        assert len(rule.hits) == 3
        report = raised.value
        assert report.errno == errno.ENOSPC and isinstance(report, OSError)
        assert len(report.failures) == 3
        for index in range(3):
            assert f"batch {index}, key 'h' ({KIB64} bytes) into {tmp_path}" in str(report)
        assert str(report).count("ENOSPC (No space left on device)") == 3
        assert "stay readable" in str(report) and "free space under" in str(report)
        # Reported once: no later call raises it again, and every value comes back.
        for index in range(3):
            assert same_bits(cache.fetch(index)["h"], values[index])
        cache.flush()
        stats = cache.stats()
        assert stats["write_behind"]["unwritten_bytes"] == 3 * KIB64
        assert stats["host"]["bytes"] == 3 * KIB64  # counted against host_bytes (0 here)
        # No more spills until statvfs shows room again; the refusal stores nothing.
        with pytest.raises(DiskFullError, match="failed for lack of space"):
            cache.update(3, {"h": values[3]})
        assert cache.fetch(3) == {} and cache.stats()["host"]["bytes"] == 3 * KIB64
        free_space.set(tmp_path, 2**31)
        cache.update(3, {"h": values[3]})
        cache.flush()
        for index in range(4):
            assert same_bits(cache.fetch(index)["h"], values[index])
    assert leftovers(tmp_path / "spill") == []


# How a value reaches the disk, and the call that fails on its way.
PATHS = {
    "staged-pwrite": (unaligned, KIB64, {}, "pwrite"),
    "zero-copy-pwrite": (aligned, KIB64, {}, "pwrite"),
    "buffered-pwrite": (unaligned, KIB64, {"direct_io": False}, "pwrite"),
    "aio-completion": (unaligned, MIB4, {}, "aio"),
    "in-place-aio": (aligned, MIB4 + KIB64, {}, "aio"),
    "aio-fallocate": (unaligned, MIB4, {}, "fallocate"),
    "rename": (unaligned, KIB64, {}, "replace"),
}


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_a_background_write_failure_is_one_clear_error_and_loses_nothing(
    tmp_path, syscalls, free_space, path, code
):
    make_value, nbytes, settings, call = PATHS[path]
    if call in ("aio", "fallocate") and not aio_works():
        pytest.skip("no native AIO here: staged writes go with pwrite")
    free_space.set(tmp_path, 2**30)
    kept, failing, later = (make_value(nbytes, seed) for seed in range(3))
    with make(tmp_path, **settings) as cache:
        cache.update(0, {"kept": kept})  # written as usual
        cache.flush()
        rule = syscalls.fail(call, code, path=CHUNK)
        cache.update(1, {"h": failing})
        expected = DiskFullError if code == errno.ENOSPC else StoreError
        with pytest.raises(expected) as raised:
            cache.flush()
        assert len(rule.hits) == 1 and syscalls.calls[call] >= 1
        report = raised.value
        assert report.errno == code and type(report) is expected
        name = errno.errorcode[code]
        assert f"batch 1, key 'h' ({nbytes} bytes) into {tmp_path / 'spill'}" in str(report)
        assert f"{name} (" in str(report)
        assert not list((tmp_path / "spill").rglob("*.partial"))  # nothing half-written
        assert same_bits(cache.fetch(0)["kept"], kept)
        assert same_bits(cache.fetch(1)["h"], failing)  # from RAM
        # That disk takes no more values (for space: until it shows room again).
        with pytest.raises(expected, match=str(tmp_path / "spill")) as refused:
            cache.update(2, {"h": later})
        assert refused.value.errno == code
        assert "Nothing was stored by this call" in str(refused.value)
        assert cache.fetch(2) == {}
        cache.flush()  # the refusal was the only error: nothing more to report
        assert cache.stats()["write_behind"]["unwritten_bytes"] == nbytes
    assert leftovers(tmp_path / "spill") == []


def test_a_read_ahead_leaves_the_report_to_the_caller(tmp_path, syscalls):
    """A prefetch job that raised the report would lose it wherever the consumer
    stops iterating before its batch: the caller's own next call raises it."""
    syscalls.fail("pwrite", errno.EIO, path=CHUNK)
    value = unaligned(KIB64, 0)
    with make(tmp_path) as cache:
        cache.update(0, {"h": value})
        cache._core.io.wait_idle()  # its write has failed by now
        values = cache._core._prefetch(0, None).values  # what a prefetch job runs
        assert same_bits(values["h"], value)
        with pytest.raises(StoreError, match=r"(?s)failed since the last report.*batch 0"):
            cache.fetch(0)
        assert same_bits(cache.fetch(0)["h"], value)


def test_a_write_whose_bookkeeping_fails_is_reported_and_its_waiters_wake(tmp_path, monkeypatch):
    """The transaction a lane runs after a write raises: the failure goes to the cache
    as a failed write's does, the write's end reaches the arena, and waiters are woken
    to a write that is over (else a flush or a full write-behind area waits forever)."""
    real_write_done, broken = Placement.write_done, []

    def write_done(placement, record, error, free=None):
        if not broken:
            broken.append(record)
            raise RuntimeError("the bookkeeping broke")
        return real_write_done(placement, record, error, free)

    monkeypatch.setattr(Placement, "write_done", write_done)
    value = unaligned(KIB64, 0)
    with make(tmp_path) as cache:
        core = cache._core
        woken, real_notify = [], core.pool.write_finished.notify_all

        def notify_all():  # waiters woken: how many writes were in flight then
            woken.append(core.tenant.writes_in_flight)
            real_notify()

        monkeypatch.setattr(core.pool.write_finished, "notify_all", notify_all)
        cache.update(0, {"h": value})
        core.io.wait_idle()  # the write and its bookkeeping are over
        assert broken and core.tenant.writes_in_flight == 0, "the write never ended"
        assert woken[-1] == 0 and core.pool.arena._expected == 0  # woken to it over
        with pytest.raises(StoreError, match=r"(?s)batch 0.*RuntimeError: the bookkeeping broke"):
            cache.flush()
        assert same_bits(cache.fetch(0)["h"], value)


def test_a_failed_write_of_a_value_deleted_meanwhile_is_not_reported(tmp_path, syscalls):
    gate = threading.Event()
    rule = syscalls.fail("pwrite", errno.EIO, path=CHUNK, gate=gate)
    with make(tmp_path) as cache, syscalls.released():
        cache.update(0, {"h": unaligned(KIB64, 0)})
        cache.delete(0)  # while its write waits
        gate.set()
        cache.flush()  # nobody holds that value any more: nothing to report
        assert rule.hits and cache.stats()["write_behind"]["unwritten_bytes"] == 0
        assert cache.stats()["host"]["bytes"] == 0
    assert leftovers(tmp_path / "spill") == []


@pytest.mark.parametrize(
    ("call", "code"), [("fsync", errno.EIO), ("pwrite", errno.ENOSPC)], ids=["fsync-EIO", "ENOSPC"]
)
def test_a_kept_store_that_cannot_be_completed_says_so_and_frees_the_cache(
    tmp_path, syscalls, call, code
):
    """keep_store: close() writes what is not on disk yet, inline, durably."""
    value = unaligned(KIB64, 0)
    cache = make(tmp_path, host_bytes="1MiB", keep_store=True)
    config = cache.config
    cache.update(0, {"h": value})  # in the host tier: close() writes it
    rule = syscalls.fail(call, code, path=CHUNK)
    with pytest.raises(StoreError) as raised:
        cache.close()
    assert rule.hits and raised.value.errno == code
    assert isinstance(raised.value, DiskFullError) == (code == errno.ENOSPC)
    assert f"completing the kept store {cache.store_path}" in str(raised.value)
    assert "not marked complete" in str(raised.value)
    assert config not in pool._pools  # its pool was closed all the same (threads joined)
    assert read_root_attributes(cache.store_path)["complete"] is False


def test_a_store_that_cannot_be_made_refuses_the_update_inline(tmp_path, syscalls):
    """The store is made on the caller's thread, at the first value that spills: a
    disk that fails then fails that update, which stores nothing."""
    rule = syscalls.fail("open", errno.ENOSPC, path="/zarr.json")
    # A host tier of one value; host_bytes also keeps one value's room for the write of
    # what it evicts and one for the values read back or copied in.
    one_value = tier_sizes(KIB64, KIB64)
    with make(tmp_path, **one_value) as cache:
        assert cache.stats()["host"]["budget"] == KIB64
        cache.update(0, {"h": unaligned(KIB64, 0)})  # in the host tier: no store yet
        with pytest.raises(StoreError, match=f"cannot create a store under '{tmp_path}") as raised:
            cache.update(1, {"h": unaligned(KIB64, 1)})  # evicts batch 0: a store is needed
        assert rule.hits and raised.value.errno == errno.ENOSPC
        assert "No space left on device" in str(raised.value)
        assert "free space there or set disk_path to a disk with room" in str(raised.value)
        assert cache.fetch(1) == {} and cache.store_path is None
        assert cache.stats()["host"]["bytes"] == KIB64  # batch 0 was put back
        assert same_bits(cache.fetch(0)["h"], unaligned(KIB64, 0))
        cache.update(1, {"h": unaligned(KIB64, 1)})  # the disk works again
        cache.flush()
        assert same_bits(cache.fetch(1)["h"], unaligned(KIB64, 1))
    assert leftovers(tmp_path / "spill") == []


def named_arrays(store_path: str, batches: range) -> set[str]:
    """The arrays the batch structures on disk name (``{"array": "tensors/<name>"}``)."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("array"), str):
                found.add(node["array"].rpartition("/")[2])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    for index in batches:
        walk(json.loads(Path(store_path, "batches", str(index), "zarr.json").read_text()))
    return found


@pytest.mark.parametrize("sync_on_write", [False, True], ids=["fsync-at-flush", "fsync-on-write"])
def test_a_flush_whose_fsync_fails_keeps_the_flush_before_and_the_next_one_syncs_again(
    tmp_path, syscalls, monkeypatch, sync_on_write
):
    """keep_store: an fsync that fails (EIO) in flush(), or in a background write that
    fsyncs as it lands, makes flush() raise before the new structures are written, so
    the store still opens as the flush before; and every array the next flush's
    structures name has been fsync'd after it was written (a failed fsync is not taken
    as done)."""
    monkeypatch.setattr(Store, "sync_on_write", sync_on_write)
    values = [unaligned(KIB64, seed) for seed in range(3)]
    cache = make(tmp_path, keep_store=True)
    cache.update(0, {"h": values[0]})
    cache.flush()
    rule = syscalls.fail("fsync", errno.EIO, path=CHUNK)
    synced: list[str] = []
    failing_fsync = os.fsync  # the injected one: EIO on the first chunk

    def recording(fd: int) -> None:
        failing_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))  # only those that succeeded

    monkeypatch.setattr(os, "fsync", recording)
    cache.update(1, {"h": values[1]})  # background writes
    cache.update(2, {"h": values[2]})
    said = "Input/output error" if sync_on_write else "durable \\(fsync\\): Input/output error"
    with pytest.raises(StoreError, match=said) as raised:
        cache.flush()
    assert rule.hits and raised.value.errno == errno.EIO
    assert read_root_attributes(cache.store_path)["flush"] == 1  # the flush before
    cache.flush()  # the disk works again
    assert read_root_attributes(cache.store_path)["flush"] == 2
    names = named_arrays(cache.store_path, range(1, 3))
    chunks = {Path(path).parent.name for path in synced if Path(path).name.startswith("c.")}
    assert len(names) == 2 and names <= chunks, f"{sorted(names - chunks)} never fsync'd"
    for index, value in enumerate(values):
        assert same_bits(cache.fetch(index)["h"], value)
    cache.close()
