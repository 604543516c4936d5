"""A full disk is one clear error, raised before anything is stored.

Before it accepts a value that must spill (itself, or values evicted for it), the cache
compares each disk's free space (statvfs, read before the pool's lock is taken) less
the writes it has queued and not finished, with what the value needs; ``update`` and
``append`` refuse with ``DiskFullError`` when no disk has room, and the cache is then
exactly as it was before the call. ``os.statvfs`` is faked per directory here
(``free_space``), so that how full a disk is never depends on the machine.
"""

from __future__ import annotations

import errno
import threading

import pytest
import torch

from faults.injection import leftovers, same_bits, unaligned
from spillcache import CacheConfig, CapacityError, DiskFullError, IntermediatesCache, StoreError
from spillcache._internal.engine.placement import Placement
from spillcache._internal.engine.records import Admission
from spillcache._internal.engine.tenants import Tenant
from spillcache._internal.engine.tiers import DiskTier, footprint
from spillcache._internal.engine.transaction import NeedsFirst
from spillcache._internal.store.tensor_store import Store

KIB64 = 64 * 2**10
ROOM = footprint(KIB64)  # what one 64 KiB value may take on disk, files and metadata


def make(disk_path, num_batches: int = 4, **settings) -> IntermediatesCache:
    settings = {"host_bytes": 0, "inline_bytes": 0, "disk_path": disk_path} | settings
    return IntermediatesCache.empty(num_batches, "cpu", config=CacheConfig(**settings))


def state(cache: IntermediatesCache) -> dict:
    """Everything an update could change: stats, and where each record is. Of the pool's
    host memory (its arena), what it holds: its running counts and high-water mark
    (``peak_bytes``) also count the copies a refused update made of its values before
    it was refused, and let go of."""
    core = cache._core
    stats = cache.stats()
    del stats["stall_seconds"]
    arena = stats["pool"]["arena"]
    stats["pool"]["arena"] = {"bytes": arena["bytes"], "slots": arena["slots"]}
    records = [
        (r.label, r.resident, r.write_state, r.on_disk, r.array, r.refs)
        for r in core.placement.records_of(core.tenant)
    ]
    policies = {name: list(policy.victims()) for name, policy in core.tenant.policies.items()}
    return {
        "stats": stats, "records": records, "policies": policies, "batches": len(cache),
        "values held, peak": core.values_held(),
    }  # fmt: skip


def test_an_update_that_must_spill_is_refused_up_front(tmp_path, free_space):
    disk = tmp_path / "spill"
    values = [unaligned(KIB64, seed) for seed in range(2)]
    with make(str(disk)) as cache:
        free_space.set(tmp_path, 2**30)
        cache.update(0, {"h": values[0]})
        cache.flush()
        free_space.set(tmp_path, ROOM - 1)  # just too little for another value
        before = state(cache)
        with pytest.raises(DiskFullError) as raised:
            cache.update(1, {"h": values[1]})
        error = raised.value
        assert isinstance(error, StoreError) and isinstance(error, OSError)
        assert error.errno == errno.ENOSPC
        message = str(error)
        assert f"batch 1, key 'h' ({KIB64} bytes) must go to disk" in message
        assert f"{disk}: " in message and f"{ROOM} bytes" in message  # path, bytes needed
        assert " free for new values " in message  # bytes free
        for fix in ("free space under", "set disk_path", "raise host_bytes", "disk_bytes"):
            assert fix in message
        assert "Nothing was stored by this call" in message
        cache.flush()  # no write was queued for it: nothing to report
        assert state(cache) == before
        assert cache.fetch(1) == {}
        assert same_bits(cache.fetch(0)["h"], values[0])
        free_space.set(tmp_path, 10 * ROOM)  # space freed: the same update goes through
        cache.update(1, {"h": values[1]})
        cache.flush()
        assert same_bits(cache.fetch(1)["h"], values[1])
    assert leftovers(disk) == []


def test_a_disk_directory_not_yet_made_counts_its_parents_free_space(tmp_path, free_space):
    disk = tmp_path / "not" / "made" / "yet"  # made when the first value spills
    free_space.set(tmp_path, ROOM - 1)  # the filesystem it will be made on is full
    with make(str(disk)) as cache:
        with pytest.raises(DiskFullError):
            cache.update(0, {"h": unaligned(KIB64, 0)})
        assert not disk.exists()
        free_space.set(tmp_path, 10 * ROOM)
        value = unaligned(KIB64, 1)
        cache.update(0, {"h": value})
        cache.flush()
        assert disk.exists() and same_bits(cache.fetch(0)["h"], value)
    assert leftovers(disk) == []


def test_writes_in_flight_count_against_the_free_space(tmp_path, free_space, syscalls):
    """Queued writes have not taken their space yet: statvfs cannot show them."""
    gate = threading.Event()
    held = syscalls.hold("pwrite", gate, path="/c.")  # its bytes do not reach the disk
    free_space.set(tmp_path, 2**30)
    with make(str(tmp_path / "spill")) as cache, syscalls.released():
        cache.update(0, {"h": unaligned(KIB64, 0)})
        assert held.arrived.wait(timeout=60)  # its file is made, its bytes are held
        free_space.set(tmp_path, ROOM + ROOM // 2)  # statvfs: room for two values
        with pytest.raises(DiskFullError, match=f"less {ROOM} bytes .* for writes in flight"):
            cache.update(1, {"h": unaligned(KIB64, 1)})
        gate.set()
        cache.flush()
        assert cache.fetch(1) == {}
        # Written since the last reading, which did not show it: it still counts, once.
        assert cache._core.placement.disk.room(0) == ROOM // 2


@pytest.mark.parametrize("limit", ["free-space", "disk_bytes"])
def test_a_refused_update_moves_nothing_not_even_what_it_evicted(tmp_path, free_space, limit):
    """Its first value fits in the host tier by evicting another (whose write is
    queued); its second finds no room: the eviction is undone too, for DiskFullError
    and CapacityError alike."""
    # A host tier of two values; besides it, host_bytes keeps one value's room for the
    # write of what is evicted and one for the values read back or copied in.
    settings = {
        "host_bytes": 4 * KIB64,
        "write_behind_bytes": KIB64,
        "read_buffer_bytes": KIB64,
        "eviction": "lru",
    }
    if limit == "disk_bytes":
        settings["disk_bytes"] = KIB64
    a, b, x, y = (unaligned(KIB64, seed) for seed in range(4))
    with make(str(tmp_path / "spill"), **settings) as cache:
        free_space.set(tmp_path, ROOM + ROOM // 2 if limit == "free-space" else 2**30)
        cache.update(0, {"a": a})
        cache.update(1, {"b": b})
        before = state(cache)
        assert cache.stats()["host"]["bytes"] == cache.stats()["host"]["budget"] == 2 * KIB64
        expected = DiskFullError if limit == "free-space" else CapacityError
        with pytest.raises(expected):
            cache.update(2, {"x": x, "y": y})
        assert state(cache) == before
        # The store made for it (the first spill) is gone too, with the directories it made.
        assert not cache._core.tenant.has_store and leftovers(tmp_path / "spill") == []
        cache.flush()
        assert cache.stats()["disk"]["bytes_written"] == 0  # a was never written
        assert not list((tmp_path / "spill").rglob("c.*"))
        assert same_bits(cache.fetch(0)["a"], a) and same_bits(cache.fetch(1)["b"], b)
        assert cache.fetch(2) == {}
        assert cache.stats()["host"]["hits"] == 2  # both still in the host tier


def test_a_refused_append_adds_no_batch(tmp_path, free_space):
    with make(str(tmp_path / "spill"), num_batches=0) as cache:
        free_space.set(tmp_path, ROOM - 1)
        with pytest.raises(DiskFullError):
            cache.append({"h": unaligned(KIB64, 0)})
        assert len(cache) == 0 and cache.stats()["write_behind"]["bytes"] == 0


def test_a_value_goes_to_a_disk_with_room(tmp_path, free_space):
    disks = [tmp_path / "nvme0", tmp_path / "nvme1"]
    for disk in disks:
        disk.mkdir()
    values = [unaligned(KIB64, seed) for seed in range(5)]
    with make([str(d) for d in disks], num_batches=5) as cache:
        free_space.set(disks[0], ROOM - 1)  # full
        free_space.set(disks[1], 2**30)
        for index in range(4):
            cache.update(index, {"h": values[index]})
        cache.flush()
        assert [entry["bytes"] for entry in cache.stats()["disk"]["disks"]] == [0, 4 * KIB64]
        free_space.set(disks[1], ROOM - 1)
        with pytest.raises(DiskFullError) as raised:  # now neither has room
            cache.update(4, {"h": values[4]})
        assert f"{disks[0]}: " in str(raised.value) and f"{disks[1]}: " in str(raised.value)
        free_space.set(disks[0], 10 * ROOM)
        cache.update(4, {"h": values[4]})
        cache.flush()
        assert [entry["bytes"] for entry in cache.stats()["disk"]["disks"]] == [KIB64, 4 * KIB64]
        for index, value in enumerate(values):
            assert same_bits(cache.fetch(index)["h"], value)
    assert leftovers(disks[0]) == [] and leftovers(disks[1]) == []


class OwnedLock:
    """A Lock that knows which thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        got = self._lock.acquire(blocking, timeout)
        if got:
            self.owner = threading.get_ident()
        return got

    def release(self) -> None:
        self.owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def test_free_space_is_read_outside_the_pools_lock(tmp_path, free_space, syscalls):
    syscalls.fail("pwrite", errno.ENOSPC, path="/c.")  # one write fails for lack of space
    with make(str(tmp_path / "spill"), num_batches=3) as cache:
        pool = cache._core.pool
        lock = OwnedLock()
        pool.lock = cache._core._lock = lock
        pool.write_finished = threading.Condition(lock)
        under_lock = []
        free_space.on_call = lambda path: under_lock.append(lock.owner == threading.get_ident())
        free_space.set(tmp_path, 2**30)
        cache.update(0, {"h": unaligned(KIB64, 0)})
        with pytest.raises(DiskFullError):
            cache.flush()  # the failed write read the free space left, outside the lock
        free_space.set(tmp_path, 2**31)  # room again
        cache.update(1, {"h": torch.zeros(16)})
        assert len(under_lock) >= 3 and not any(under_lock)


def test_a_refused_admission_puts_a_cascade_of_moves_back(tmp_path):
    """Device -> host -> disk: each new value pushes the others one tier down; the
    last finds no room, and every move is undone, last first. (The CPU stands in for
    the accelerator: the tenant's device tier targets it.)"""
    cpu = torch.device("cpu")
    placement = Placement(
        device_budget=KIB64, host_budget=KIB64, disk=DiskTier(KIB64), pin_host=False
    )
    tenant = placement.add_tenant(Tenant(True, "lru", device_target=cpu))
    admissions = [Admission(unaligned(KIB64, 0), cpu), Admission(unaligned(KIB64, 1), cpu)]
    a, b = placement.admit(admissions, tenant=tenant)
    assert (a.resident, b.resident) == ("host", "device")

    def where() -> list:
        records = [
            (r.rid, r.resident, r.write_state, r.on_disk) for r in placement.records_of(tenant)
        ]
        tiers = [
            (t.nbytes, t.peak, list(t)) for t in (placement.device, placement.host, placement.disk)
        ]
        policies = {name: list(policy.victims()) for name, policy in tenant.policies.items()}
        return [records, tiers, policies, placement.counters.copy(), placement.write_behind.nbytes]

    before = where()
    admissions = [Admission(unaligned(KIB64, 2), cpu), Admission(unaligned(KIB64, 3), cpu)]
    with pytest.raises(NeedsFirst):  # a to disk needs the store made first, outside the lock
        placement.admit(admissions, tenant=tenant)
    assert placement.take_needs().stores == {(tenant, 0)}
    assert where() == before
    tenant.attach(Store.create(tmp_path / "stores"))  # as the pool makes it
    with pytest.raises(CapacityError):  # x: a to disk, b to host; y: no room anywhere
        placement.admit(admissions, tenant=tenant)
    assert where() == before
    assert placement.take_writes() == [] and placement.take_deletions() == []
