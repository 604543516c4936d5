"""engine/placement.py: records in the host and disk tiers, within their budgets."""

from __future__ import annotations

import pytest
import torch

from spillcache._internal.dtypes import RAW_DTYPES
from spillcache._internal.engine.placement import Placement, TensorRecord
from spillcache._internal.engine.records import Admission
from spillcache._internal.engine.tenants import Tenant
from spillcache._internal.engine.tiers import DiskTier, Reading
from spillcache._internal.engine.transaction import NeedsFirst
from spillcache._internal.io import transfers
from spillcache._internal.io.arena import Arena
from spillcache._internal.store.tensor_store import Store
from spillcache.errors import CapacityError, DiskFullError, StoreError

CPU = torch.device("cpu")
SIZE = 64  # bytes of every tensor made by value()
DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.int8,
    torch.float8_e4m3fn,
    torch.complex32,
    torch.uint4,
]


def value(seed: int, nbytes: int = SIZE) -> torch.Tensor:
    """A tensor of ``nbytes`` random bits, of a dtype that varies with ``seed``."""
    dtype = DTYPES[seed % len(DTYPES)]
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0, 256, (nbytes // dtype.itemsize, dtype.itemsize), dtype=torch.uint8, generator=gen
    )
    return raw.view(dtype).reshape(-1)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(RAW_DTYPES[tensor.dtype.itemsize])


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        got.dtype == want.dtype and got.shape == want.shape and torch.equal(bits(got), bits(want))
    )


def make(tmp_path, host: int | None, disk: int | None | bool = None) -> Placement:
    """A CPU-only placement; ``disk=False`` for no disk tier."""
    tier = None if disk is False else DiskTier(disk)
    placement = Placement(
        device_budget=0,
        host_budget=host,
        disk=tier,
        pin_host=False,
    )
    placement.add_tenant(Tenant(disk is not False, "lru"))
    placement.store_dir = tmp_path / "stores"  # where World makes the store it needs
    return placement


class World:
    """A placement plus the tensors it should hold, checked after every step.

    It plays the pool's part synchronously: a store or a copy placement needs is made
    and the admit made again, queued writes run (and are reported back) right after each step,
    and a load reads from disk itself when memory has no copy.
    """

    def __init__(self, placement: Placement) -> None:
        self.p = placement
        self.tenant = placement.tenants[0]
        self.live: dict[int, tuple[TensorRecord, torch.Tensor]] = {}
        self.failed_writes: list[TensorRecord] = []

    def meet_needs(self) -> None:
        """What the pool does outside its lock: the stores made, the host copies made."""
        needs = self.p.take_needs()
        for tenant, disk in needs.stores:
            tenant.attach(Store.create(self.p.store_dir), disk)
        self.p.premade = {rid: transfers.to_host(t) for rid, t in needs.copies.items()}

    def drain(self) -> None:
        self.meet_needs()
        for record, tensor in self.p.take_writes():
            error = None
            try:
                self.tenant.store.write_tensor(record.array, tensor)
            except StoreError as caught:
                error = caught
            if self.p.write_done(record, error):
                self.failed_writes.append(record)
        for tenant, disk, name in self.p.take_deletions():
            tenant.store_on(disk).delete_tensor(name)

    def admit(self, *tensors: torch.Tensor) -> list[TensorRecord]:
        admissions = [Admission(t, CPU) for t in tensors]
        try:
            while True:
                try:
                    records = self.p.admit(admissions, tenant=self.tenant)
                    break
                except NeedsFirst:
                    self.meet_needs()
        finally:
            self.drain()
        for record, tensor in zip(records, tensors, strict=True):
            self.live[record.rid] = (record, bits(tensor).clone().view(tensor.dtype))
        self.check()
        return records

    def load(self, record: TensorRecord, *, budgets: bool = True) -> torch.Tensor:
        got = self.p.begin_load(record)
        if got is None:
            got = self.tenant.store.read_tensor(record.array, record.shape, record.dtype)
            self.p.read_done(record, got, promote=True)
            self.drain()
        got = transfers.onload(got, record.onload_device, record.requires_grad)
        assert same_bits(got, self.live[record.rid][1])
        assert got.device == CPU
        self.check(budgets=budgets)
        return got

    def release(self, *records: TensorRecord) -> None:
        self.p.release(list(records))
        self.drain()
        for record in records:
            if record.refs == 0:
                self.live.pop(record.rid, None)
        self.check()

    def check(self, *, budgets: bool = True) -> None:
        p = self.p
        if budgets:
            # Values whose disk write failed are back in the host tier, over its budget.
            unwritten = p.write_behind.unwritten_bytes
            assert p.host.budget is None or p.host.nbytes <= p.host.budget + unwritten
            assert p.disk is None or p.disk.budget is None or p.disk.nbytes <= p.disk.budget
        assert set(p.host) == {rid for rid, (r, _) in self.live.items() if r.resident == "host"}
        assert p.host.nbytes == sum(r.nbytes for r, _ in self.live.values() if r.resident == "host")
        assert len(p.device) == 0
        on_disk = {rid for rid, (r, _) in self.live.items() if r.on_disk}
        assert (set(p.disk) if p.disk is not None else set()) == on_disk
        if p.disk is not None:
            assert p.disk.nbytes == sum(r.nbytes for r, _ in self.live.values() if r.on_disk)
        for record, _ in self.live.values():
            assert record.resident is not None or record.on_disk or record.rid in p.write_behind
            assert record.refs > 0
        tenants = list(p.tenants)
        assert p.write_behind.nbytes == 0  # drain() ran them all
        assert all(tenant.writes_in_flight == 0 for tenant in tenants)

    def check_all_loadable(self, *, budgets: bool = True) -> None:
        for record, _ in list(self.live.values()):
            self.load(record, budgets=budgets)


@pytest.fixture
def world(tmp_path):
    return World(make(tmp_path, host=3 * SIZE, disk=None))


def array_dirs(placement: Placement) -> set[str]:
    if not placement.tenants[0].has_store:
        return set()
    return {p.name for p in (placement.tenants[0].store.path / "tensors").iterdir() if p.is_dir()}


def test_fills_host_then_spills_least_recently_used(world):
    a, b, c = world.admit(value(0), value(1), value(2))
    assert [r.resident for r in (a, b, c)] == ["host"] * 3
    assert not any(r.on_disk for r in (a, b, c))
    assert not world.tenant.has_store  # all fits in memory: the disk is never touched
    (d,) = world.admit(value(3))
    assert a.resident is None and a.on_disk  # a was least recently used
    assert (b.resident, c.resident, d.resident) == ("host", "host", "host")
    world.load(b)  # now c is the least recently used
    (e,) = world.admit(value(4))
    assert c.resident is None and c.on_disk
    assert b.resident == "host" and not b.on_disk
    assert array_dirs(world.p) == {str(a.rid), str(c.rid)}
    world.check_all_loadable()


def test_record_larger_than_host_goes_straight_to_disk(world):
    small = world.admit(value(0), value(1))
    (big,) = world.admit(value(2, nbytes=4 * SIZE))
    assert big.resident is None and big.on_disk
    assert all(r.resident == "host" and not r.on_disk for r in small)  # nothing was evicted for it
    assert world.p.host.nbytes == 2 * SIZE and world.p.disk.nbytes == 4 * SIZE
    world.load(big)
    assert big.resident is None  # still cannot fit in host
    world.check_all_loadable()


def test_load_from_disk_promotes_to_host_and_keeps_clean_copy(world):
    records = world.admit(*(value(i) for i in range(5)))
    first = records[0]
    assert first.resident is None and first.on_disk
    written = world.p.counters.disk.bytes_written
    world.load(first)
    assert first.resident == "host" and first.on_disk
    # Evicting it again costs no write: its disk copy is clean.
    for i in range(3):
        world.admit(value(10 + i))
    assert first.resident is None and first.on_disk
    assert world.p.counters.disk.bytes_written - written == 3 * SIZE  # the other evictions only
    world.check_all_loadable()


def test_loaded_value_is_bit_identical_from_every_tier(world):
    records = world.admit(*(value(i) for i in range(4)), value(9, nbytes=5 * SIZE))
    tiers = {("host" if r.resident else "disk") for r in records}
    assert tiers == {"host", "disk"}
    for record in records:
        world.load(record)


def test_requires_grad_is_given_back(world):
    tensor = torch.randn(16, requires_grad=True)
    (record,) = world.admit(tensor)
    assert record.requires_grad
    for i in range(4):  # push it to disk and back
        world.admit(value(i))
    assert record.resident is None
    loaded = world.load(record)
    assert loaded.requires_grad and torch.equal(loaded.detach(), tensor.detach())


def test_same_tensor_in_one_call_is_one_record(tmp_path):
    world = World(make(tmp_path, host=SIZE, disk=None))
    tensor = value(0, nbytes=2 * SIZE)  # too big for host: on disk
    first, second = world.admit(tensor, tensor)
    assert first is second and first.refs == 2
    assert len(world.p.disk) == 1 and world.p.disk.nbytes == 2 * SIZE
    world.release(first)
    assert first.on_disk and array_dirs(world.p) == {str(first.rid)}
    world.load(first)
    world.release(first)
    assert not first.on_disk and first.resident is None
    assert len(world.p.disk) == 0 and world.p.disk.nbytes == 0
    assert array_dirs(world.p) == set()


def test_same_tensor_across_calls_is_one_record(world):
    tensor = value(0)
    (first,) = world.admit(tensor)
    (again,) = world.admit(tensor)
    (other,) = world.admit(tensor.clone())  # equal values, another object: another record
    assert again is first and first.refs == 2
    assert other is not first and other.refs == 1
    assert world.p.host.nbytes == 2 * SIZE
    world.release(first)
    assert first.resident == "host"
    world.release(first)
    assert first.resident is None and world.p.host.nbytes == SIZE
    (fresh,) = world.admit(tensor)  # released for good: stored anew
    assert fresh is not first and fresh.refs == 1


def fill_both(world: World) -> list[TensorRecord]:
    """Host (2 slots) and disk (2 slots) full; returns the four records."""
    records = world.admit(value(0), value(1), value(2), value(3))
    assert world.p.host.nbytes == 2 * SIZE and world.p.disk.nbytes == 2 * SIZE
    return records


def test_capacity_error_when_neither_tier_has_room(tmp_path):
    world = World(make(tmp_path, host=2 * SIZE, disk=2 * SIZE))
    records = fill_both(world)
    for attempt in ([value(10)], [value(11, nbytes=3 * SIZE)], [value(12), value(13)]):
        with pytest.raises(CapacityError, match="disk_bytes"):
            world.admit(*attempt)
        world.check()
        assert len(world.p.disk) == 2 and world.p.disk.nbytes == 2 * SIZE
        assert len(world.p.host) == 2 and world.p.host.nbytes == 2 * SIZE
        assert {r.rid for r in records} == set(world.p.host) | set(world.p.disk)
    world.check_all_loadable()
    assert all(r.refs == 1 for r in records)


def test_capacity_error_rolls_back_records_admitted_earlier_in_the_call(tmp_path):
    world = World(make(tmp_path, host=2 * SIZE, disk=2 * SIZE))
    records = fill_both(world)
    world.release(records[3])  # a free host slot: the first new value fits, the second cannot
    assert world.p.host.nbytes == SIZE
    with pytest.raises(CapacityError):
        world.admit(value(20), value(21))
    world.check()
    assert len(world.p.host) + len(world.p.disk) == 3
    assert world.p.host.nbytes + world.p.disk.nbytes == 3 * SIZE
    world.check_all_loadable()


@pytest.mark.parametrize("oversized", [False, True])
def test_without_disk_a_full_host_is_a_capacity_error_naming_disk_path(tmp_path, oversized):
    world = World(make(tmp_path, host=2 * SIZE, disk=False))
    records = world.admit(value(0), value(1))
    nbytes = 3 * SIZE if oversized else SIZE
    with pytest.raises(CapacityError, match="disk_path"):
        world.admit(value(2, nbytes=nbytes))
    world.check()
    assert all(r.resident == "host" for r in records) and world.p.host.nbytes == 2 * SIZE
    world.check_all_loadable()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("oversized", [False, True])
def test_disk_write_failure_keeps_the_value_readable_and_earlier_records(
    tmp_path, monkeypatch, oversized
):
    world = World(make(tmp_path, host=2 * SIZE, disk=None))
    records = world.admit(value(0), value(1))

    def fail(self, name, tensor, *, durable=False):
        raise StoreError(28, f"cannot write tensor {name}: No space left on device")

    monkeypatch.setattr(Store, "write_tensor", fail)
    (spilled,) = world.admit(value(2, nbytes=3 * SIZE if oversized else SIZE))
    monkeypatch.undo()
    # The write failed: the value is back in the host tier (over its budget), unwritten.
    assert world.failed_writes == ([spilled] if oversized else [records[0]])
    failed = world.failed_writes[0]
    assert failed.write_state is None and isinstance(failed.write_error, StoreError)
    assert not failed.on_disk and failed.resident == "host"
    assert failed.rid not in world.p.write_behind
    assert world.p.write_behind.unwritten_bytes == failed.nbytes
    assert world.p.host.nbytes == 2 * SIZE + failed.nbytes
    assert len(world.p.disk) == 0 and world.p.disk.nbytes == 0
    world.check_all_loadable()
    # That disk is full (ENOSPC): nothing more goes there until it shows room again.
    with pytest.raises(DiskFullError, match="ENOSPC"):
        world.admit(value(3, nbytes=4 * SIZE))
    world.p.disk.observe([Reading(free=2**30, mark=world.p.disk.finished[0])])
    world.admit(value(3, nbytes=4 * SIZE))  # the disk works again
    assert records[1].on_disk or records[1].resident == "host"
    world.release(failed)  # a failed value can still be deleted, leaving nothing behind
    assert failed.resident is None and world.p.write_behind.unwritten_bytes == 0


def test_clean_disk_copies_are_dropped_when_disk_is_tight(tmp_path):
    world = World(make(tmp_path, host=2 * SIZE, disk=2 * SIZE))
    a, b, c = world.admit(value(0), value(1), value(2))
    assert a.on_disk and a.resident is None
    world.load(a)  # a promoted (clean copy kept), b evicted: disk holds a and b
    assert a.resident == "host" and a.on_disk and b.on_disk and b.resident is None
    (d,) = world.admit(value(3))  # c must go to disk: only a's clean copy can make room
    assert c.on_disk and c.resident is None
    assert a.resident == "host" and not a.on_disk
    assert b.on_disk and b.resident is None
    assert array_dirs(world.p) == {str(b.rid), str(c.rid)}
    world.check_all_loadable()


def test_to_persist_hands_over_every_record_without_a_disk_copy(tmp_path):
    """What persist does on close, placement's part: every record without a finished
    disk copy handed over with its value and an array name no copy has, for the caller
    to write outside the lock; a write still queued is dropped."""
    world = World(make(tmp_path, host=3 * SIZE, disk=2 * SIZE))
    records = world.admit(*(value(i) for i in range(4)))
    kept = world.p.admit([Admission(value(9), CPU)], tenant=world.tenant)  # a write queued
    world.live[kept[0].rid] = (kept[0], value(9))
    assert world.p.write_behind.nbytes > 0
    on_disk = {r.rid: r.array for r in records if r.on_disk and r.write_state is None}
    taken = world.p.to_persist(world.tenant)
    assert world.p.write_behind.nbytes == 0 and not world.p.take_writes()
    want = {r.rid for r in world.p.records_of(world.tenant)} - set(on_disk)
    assert {record.rid for record, _ in taken} == want
    for record, tensor in taken:
        assert record.array not in on_disk.values() and record.disk == 0
        assert same_bits(tensor, world.live[record.rid][1])
        world.tenant.store.write_tensor(record.array, tensor, durable=True)
    store = Store.open(world.tenant.store.path)
    for rid, (record, value_bits) in world.live.items():
        array = on_disk.get(rid, record.array)
        assert same_bits(store.read_tensor(array, record.shape, record.dtype), value_bits)


def test_load_survives_a_failed_demotion_during_promotion(tmp_path, monkeypatch):
    world = World(make(tmp_path, host=2 * SIZE, disk=None))
    first, *_ = world.admit(value(0), value(1), value(2))
    assert first.resident is None and first.on_disk

    def fail(self, name, tensor, *, durable=False):
        raise StoreError(28, f"cannot write tensor {name}: No space left on device")

    monkeypatch.setattr(Store, "write_tensor", fail)
    world.load(first)  # promoted; the victim's write fails, and the read is unharmed
    assert first.resident == "host"
    assert len(world.failed_writes) == 1


def test_capacity_error_keeps_clean_disk_copies(tmp_path):
    world = World(make(tmp_path, host=2 * SIZE, disk=2 * SIZE))
    a, _, _ = world.admit(value(0), value(1), value(2))
    world.load(a)
    assert a.resident == "host" and a.on_disk
    with pytest.raises(CapacityError):
        world.admit(value(5, nbytes=3 * SIZE))
    world.check()
    assert a.on_disk


def test_a_record_written_again_gets_a_new_array_so_old_deletions_cannot_hit_it(tmp_path):
    world = World(make(tmp_path, host=2 * SIZE, disk=2 * SIZE))
    a, b, c = world.admit(value(0), value(1), value(2))
    world.load(a)  # a promoted, clean copy kept
    first_array = a.array
    world.admit(value(3))  # c's spill drops a's clean copy; its array is deleted
    assert not a.on_disk and first_array not in array_dirs(world.p)
    world.release(b)  # room on disk again
    world.admit(value(4))  # a (least recently used) is spilled again
    assert a.on_disk and a.array != first_array and a.array.startswith(f"{a.rid}.")
    assert a.array in array_dirs(world.p) and first_array not in array_dirs(world.p)
    world.check_all_loadable()


def test_a_device_tier_victims_host_copy_is_asked_for_and_the_admit_taken_back():
    """Evicting a device-tier value to the host tier needs a copy into the arena:
    placement asks for it (``NeedsFirst``, ``needs.copies``) instead of copying under
    the lock, takes the admit back, and uses the copy made meanwhile when asked again.
    (The CPU stands in for the accelerator: the tenant's device tier targets it.)"""
    arena = Arena(2**20)
    placement = Placement(
        device_budget=SIZE, host_budget=4 * SIZE, disk=None, pin_host=False, arena=arena
    )
    tenant = placement.add_tenant(Tenant(False, "lru", device_target=CPU))
    a, b = value(0), value(1)
    (first,) = placement.admit([Admission(a, CPU)], tenant=tenant)
    assert first.resident == "device" and not arena.holds(placement.device.get(first.rid))
    with pytest.raises(NeedsFirst):
        placement.admit([Admission(b, CPU)], tenant=tenant)  # a must move to the host tier
    needs = placement.take_needs()
    on_device = placement.device.get(first.rid)
    assert list(needs.copies) == [("record", first.rid)]  # a stored value's: by its record
    assert needs.copies["record", first.rid] is on_device  # not copied here
    assert first.resident == "device" and len(placement.records_of(tenant)) == 1
    assert placement.host.nbytes == 0 and placement.counters.device.evictions == 0
    made = arena.copy_in(a)  # what the pool's transaction does with the lock released
    placement.premade = {("record", first.rid): made}
    (second,) = placement.admit([Admission(b, CPU)], tenant=tenant)
    assert (first.resident, second.resident) == ("host", "device")
    assert placement.host.get(first.rid) is made and same_bits(made, a)
    assert placement.premade == {} and not placement.take_needs()
    arena.close()
