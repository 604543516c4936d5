"""Kept stores reopened into one pool: their records are adopted under the pool's lock,
while other caches of that pool run; they read and write through the pool's shared
buffers; and a reopen that fails half-way leaves the pool as it found it.

Races are forced with Events: one reopen is stopped in the middle of adopting a
record, and the pool's lock says when the other has to wait for it.
"""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest
import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache, StoreCorruptError
from spillcache._internal.engine import records
from spillcache._internal.engine.placement import Placement
from spillcache._internal.engine.records import TensorRecord, records_of
from spillcache._internal.engine.tiers import DiskTier
from spillcache._internal.runtime.pool import SharedPool, pool_for
from spillcache._internal.store.store_format import chunk_name, tensors_dir
from spillcache._internal.store.tensor_store import Store

DTYPES = (torch.float32, torch.bfloat16, torch.int64)
BATCHES = 3
SHAPE = (16, 24)
# How both reopens are configured: equal configs, so one pool (the store's directory
# becomes its disk_path). No host tier: every value stays on disk only.
OPEN = CacheConfig(host_bytes=0, inline_bytes=0, read_buffer_bytes="4MiB")
WAIT = 60  # seconds: only a bound on a wait that an Event ends, never a timing


Values = list[dict[str, torch.Tensor]]


def write_store(parent: Path, seed: int) -> tuple[str, Values]:
    """A kept store, closed, with BATCHES batches of one array per value; its values.

    Each store is written by a pool of its own (made and closed with its one cache),
    so every store's arrays are named from record number 0 on."""
    values = [
        {
            str(dtype): random_tensor(dtype, SHAPE, seed * 100 + batch * 10 + number)
            for number, dtype in enumerate(DTYPES)
        }
        for batch in range(BATCHES)
    ]
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(parent), keep_store=True)
    cache = IntermediatesCache(values, config=config)
    cache.close()
    return cache.store_path, values


def array_names(path: str) -> set[str]:
    """The store's arrays, by name (a record number)."""
    return {entry.name for entry in tensors_dir(Path(path)).iterdir() if entry.is_dir()}


def stored_bytes(*stores: Values) -> int:
    return sum(value.nbytes for values in stores for batch in values for value in batch.values())


def assert_holds(cache: IntermediatesCache, values: Values) -> None:
    """Every value fetched back bit for bit (from disk: there is no host tier)."""
    assert len(cache) == len(values)
    for index, batch in enumerate(values):
        got = cache.fetch(index)
        assert sorted(got) == sorted(batch)
        for key, value in batch.items():
            assert_same(got[key], value)


def assert_uses_shared_buffers(cache: IntermediatesCache) -> None:
    """The cache's store reads into the pool's read buffers and writes through its
    staging buffers (made when an unaligned tensor is first written), not its own."""
    store = cache._core.tenant.store
    shared = cache._core.pool.buffers
    assert store._buffers is shared.reads
    if not store.direct:
        assert store._staging is None and store._shared_staging is None
        return
    assert store._shared_staging[0] is shared
    assert store._staging in (None, shared.staging(1))


def records_held(*caches: IntermediatesCache) -> list[TensorRecord]:
    """The records the caches' entries name, one per array."""
    return [
        record
        for cache in caches
        for batch in cache._core._batches
        for entry in batch.values()
        for record in records_of(entry)
    ]


def pool_state(pool: SharedPool) -> tuple:
    """What a cache's presence in a pool shows: members, caches, records and the bytes
    each tier counts."""
    with pool.lock:
        placement = pool.placement
        return (
            pool.members,
            len(placement.tenants),
            sorted(record.rid for record in placement.records.values()),
            placement.disk.nbytes,
            list(placement.disk.bytes_on),
            placement.host.nbytes,
            placement.write_behind.nbytes,
        )


class WatchedLock:
    """A pool's lock, the same lock underneath, that sets ``waiting`` when the thread
    named ``waiter`` finds it taken and has to wait for it."""

    def __init__(self, lock: threading.Lock, waiter: str, waiting: threading.Event) -> None:
        self._lock = lock
        self._waiter = waiter
        self._waiting = waiting

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._lock.acquire(blocking=False):
            return True
        if not blocking:
            return False
        if threading.current_thread().name == self._waiter:
            self._waiting.set()
        return self._lock.acquire(True, timeout)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> WatchedLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class PausedAdoption:
    """Stops the thread named ``name`` in the middle of adopting its first record:
    inside ``RecordRegistry.add``, after it took the next record number and before it
    counted it (``records.TensorRecord`` is what it builds in between)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.paused, self.resume = threading.Event(), threading.Event()
        gate = self

        class PausingRecord(TensorRecord):
            def __init__(self, *args, **kwargs) -> None:
                if threading.current_thread().name == name and not gate.paused.is_set():
                    gate.paused.set()
                    assert gate.resume.wait(timeout=WAIT)
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(records, "TensorRecord", PausingRecord)


class Opening(threading.Thread):
    """``IntermediatesCache.open`` on a thread of its own; ``ended`` is set once it
    returned or raised."""

    def __init__(self, path: str, name: str, ended: threading.Event) -> None:
        super().__init__(name=name, daemon=True)
        self.path, self.ended = path, ended
        self.cache: IntermediatesCache | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.cache = IntermediatesCache.open(self.path, OPEN)
        except BaseException as error:  # handed to the test's thread by result()
            self.error = error
        finally:
            self.ended.set()

    def result(self) -> IntermediatesCache:
        self.join(timeout=WAIT)
        assert not self.is_alive(), f"{self.name} did not end"
        if self.error is not None:
            raise self.error
        return self.cache


def test_two_stores_reopened_at_once_get_distinct_records_and_exact_byte_counts(
    tmp_path, monkeypatch
):
    """Store A's reopen stops after taking a record number; store B's reopen runs into
    the same pool meanwhile. Adopting under the pool's lock, B waits until A's records
    are in; adopting without it, B takes the same numbers, and A's record then replaces
    one of B's (and its disk bytes are refused as counted already)."""
    parent = tmp_path / "stores"
    path_a, values_a = write_store(parent, seed=1)
    path_b, values_b = write_store(parent, seed=2)
    # Arrays named alike: B skips to the very number A took, so without the lock the
    # two reopens collide on it.
    assert array_names(path_a) == array_names(path_b)
    # The pool both reopens join, made first so that its lock can be watched.
    pool = pool_for(OPEN.replace(disk_path=str(parent), keep_store=True))
    assert pool.members == 1  # a new pool: nothing else uses it
    b_stopped = threading.Event()  # B reopened, or waits for the pool's lock
    pool.lock = WatchedLock(pool.lock, "reopen-b", b_stopped)
    opening_a = Opening(path_a, "reopen-a", threading.Event())
    opening_b = Opening(path_b, "reopen-b", b_stopped)
    caches: list[IntermediatesCache] = []
    gate: PausedAdoption | None = None
    try:
        with monkeypatch.context() as patch:
            gate = PausedAdoption(patch, "reopen-a")
            opening_a.start()
            assert gate.paused.wait(timeout=WAIT)
            opening_b.start()
            assert b_stopped.wait(timeout=WAIT)
            gate.resume.set()
            caches.append(opening_a.result())
            caches.append(opening_b.result())
        cache_a, cache_b = caches
        assert cache_a._core.pool is pool and cache_b._core.pool is pool
        held = records_held(cache_a, cache_b)
        rids = [record.rid for record in held]
        assert len(set(rids)) == len(rids) == 2 * BATCHES * len(DTYPES)
        placement = pool.placement
        with pool.lock:
            assert all(placement.records.get(record.rid) is record for record in held)
            assert sorted(record.rid for record in placement.records.values()) == sorted(rids)
            # Both stores' bytes counted once each, on the one disk; nothing in memory.
            total = stored_bytes(values_a, values_b)
            assert placement.disk.nbytes == total
            assert placement.disk.bytes_on == [total]
            assert placement.host.nbytes == placement.device.nbytes == 0
            assert placement.write_behind.nbytes == 0
            # A value written later gets a number no array of either store has.
            numbers = [int(name) for name in array_names(path_a) | array_names(path_b)]
            assert placement.records.next_rid > max(numbers)
        assert_holds(cache_a, values_a)
        assert_holds(cache_b, values_b)
        assert_uses_shared_buffers(cache_a)
        assert_uses_shared_buffers(cache_b)
    finally:
        if gate is not None:  # never leave A stopped
            gate.resume.set()
        for opening in (opening_a, opening_b):
            opening.join(timeout=WAIT)
            if opening.cache is not None:
                opening.cache.close()
        pool.leave()


def test_a_reopened_store_closes_without_freeing_the_pools_buffers(tmp_path):
    parent = tmp_path / "stores"
    path_a, values_a = write_store(parent, seed=1)
    path_b, values_b = write_store(parent, seed=2)
    cache_a = IntermediatesCache.open(path_a, OPEN)
    with IntermediatesCache.open(path_b, OPEN) as cache_b:
        pool = cache_a._core.pool
        assert cache_b._core.pool is pool
        assert_uses_shared_buffers(cache_a)
        reads = pool.buffers.reads
        assert_holds(cache_a, values_a)
        kept = reads.nbytes
        assert kept > 0  # A's reads left blocks in the pool for reuse
        staging = cache_a._core.tenant.store._staging
        cache_a.close()
        assert reads.nbytes == kept  # A's close left them to the pool
        reused = reads.reused
        assert_holds(cache_b, values_b)
        assert reads.reused > reused  # B read into the blocks A's reads made
        if staging is not None:  # direct I/O: the staging buffers are still the pool's
            assert staging.available == staging.count
        # B still writes (through the staging buffers, with direct I/O) and reads.
        extra = random_tensor(torch.float32, SHAPE, 999)
        cache_b.update(0, {"extra": extra})
        cache_b.flush()
        assert_same(cache_b.fetch(0)["extra"], extra)


def fail_mid_adoption(monkeypatch: pytest.MonkeyPatch, path: str) -> type[BaseException]:
    """The fourth record the reopen holds raises: some records are adopted, some not."""
    hold = Placement.hold
    calls = []

    def failing_hold(placement: Placement, record: TensorRecord) -> None:
        calls.append(record)
        if len(calls) == 4:
            raise MemoryError("injected: no memory for this record")
        hold(placement, record)

    monkeypatch.setattr(Placement, "hold", failing_hold)
    return MemoryError


def fail_counting_disk_bytes(monkeypatch: pytest.MonkeyPatch, path: str) -> type[BaseException]:
    """The fourth record's disk bytes cannot be counted: that record is numbered and
    registered already, its bytes not counted."""
    reserve = DiskTier.reserve
    calls = []

    def failing_reserve(disk: DiskTier, rid: int, nbytes: int, *args, **kwargs) -> None:
        calls.append(rid)
        if len(calls) == 4:
            raise MemoryError("injected: no memory to count these bytes")
        reserve(disk, rid, nbytes, *args, **kwargs)

    monkeypatch.setattr(DiskTier, "reserve", failing_reserve)
    return MemoryError


def fail_writing_the_root(monkeypatch: pytest.MonkeyPatch, path: str) -> type[BaseException]:
    """Every record is adopted; writing the root's attributes after that fails."""

    def failing_write(store: Store, **kwargs) -> None:
        raise OSError(errno.EIO, "injected: the root's attributes were not written")

    monkeypatch.setattr(Store, "write_root_attributes", failing_write)
    return OSError


def damage_a_chunk(monkeypatch: pytest.MonkeyPatch, path: str) -> type[BaseException]:
    """A chunk file one byte short: the store is refused once surveyed (after the
    cache joined its pool)."""
    name = sorted(array_names(path))[0]
    chunk = tensors_dir(Path(path)) / name / chunk_name(len(SHAPE))
    chunk.write_bytes(chunk.read_bytes()[:-1])
    return StoreCorruptError


@pytest.mark.parametrize(
    "fault", [fail_mid_adoption, fail_counting_disk_bytes, fail_writing_the_root, damage_a_chunk]
)
def test_a_reopen_that_fails_leaves_the_pool_as_it_was(tmp_path, monkeypatch, fault):
    """Another cache of the pool stays open, so the pool outlives the failed reopen: its
    members, caches, records and byte counts are as before, and the store (unless
    damaged) is unchanged and opens afterwards."""
    parent = tmp_path / "stores"
    path_a, values_a = write_store(parent, seed=1)
    path_b, values_b = write_store(parent, seed=2)
    with IntermediatesCache.open(path_a, OPEN) as cache_a:
        pool = cache_a._core.pool
        before = pool_state(pool)
        root = (Path(path_b) / "zarr.json").read_bytes()
        with monkeypatch.context() as patch:
            error = fault(patch, path_b)
            with pytest.raises(error):
                IntermediatesCache.open(path_b, OPEN)
        assert pool_state(pool) == before
        assert_holds(cache_a, values_a)
        assert (Path(path_b) / "zarr.json").read_bytes() == root
        if fault is not damage_a_chunk:
            with IntermediatesCache.open(path_b, OPEN) as cache_b:
                assert cache_b._core.pool is pool
                assert_holds(cache_b, values_b)
