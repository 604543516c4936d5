"""spillcache._internal.io.arena: one region, page-aligned slots, reused only once nobody
holds them, waits that end when a slot comes back, overflow counted and warned about."""

from __future__ import annotations

import gc
import threading
import warnings

import pytest
import torch

from spill_testing import ALL_DTYPES, HOLDING_FORMS, assert_same, random_tensor
from spillcache._internal.io.arena import Arena
from spillcache._internal.io.buffers import PAGE

MIB = 2**20


def test_slots_of_a_page_or_more_are_page_aligned_and_smaller_ones_packed():
    arena = Arena(8 * MIB)
    small = [arena.take(n) for n in (1, 64, 65, PAGE - 1000)]
    large = [arena.take(n) for n in (PAGE, PAGE + 1, 3 * MIB)]
    low = small[0].data_ptr()
    assert low % PAGE == 0  # the region's start
    # Under a page: 64-byte steps, one after the other from the bottom.
    assert [s.data_ptr() - low for s in small] == [0, 64, 128, 256]
    # A page or more: on the next page boundary (the rest of the first page stays free
    # for small values), each right after the previous one.
    assert [s.data_ptr() - low for s in large] == [PAGE, 2 * PAGE, 4 * PAGE]
    assert all(s.data_ptr() % PAGE == 0 for s in large)
    assert max(s.data_ptr() + s.numel() for s in large) - low <= 8 * MIB
    stats = arena.stats()
    assert stats["bytes"] == 64 + 64 + 128 + (PAGE - 960) + PAGE + 2 * PAGE + 3 * MIB
    assert stats["overflows"] == 0
    tiny = arena.take(10)  # the hole the page alignment left
    assert tiny.data_ptr() - low == 256 + PAGE - 960


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_copy_in_keeps_every_bit_of_every_dtype(dtype):
    arena = Arena(MIB)
    original = random_tensor(dtype, (3, 5, 7))
    copy = arena.copy_in(original)
    assert copy.dtype == dtype and copy.shape == original.shape
    assert copy.data_ptr() != original.data_ptr()
    assert_same(copy, original)
    scalar = random_tensor(dtype, ())
    assert_same(arena.copy_in(scalar), scalar)
    strided = random_tensor(dtype, (6, 4))[::2, 1:]
    assert_same(arena.copy_in(strided), strided)


@pytest.mark.parametrize("keep", list(HOLDING_FORMS.values()), ids=list(HOLDING_FORMS))
def test_a_slot_still_held_in_any_form_is_never_handed_out(keep):
    arena = Arena(2 * MIB)
    taken = arena.take(MIB)
    taken.fill_(7)
    held = keep(taken)
    address = taken.data_ptr()
    del taken
    other = arena.take(MIB)
    assert other.data_ptr() != address
    assert arena.stats()["slots"] == 2
    del held
    assert arena.stats()["slots"] == 1
    again = arena.take(MIB)
    assert again.data_ptr() == address


def test_free_neighbours_coalesce_into_one_hole():
    arena = Arena(4 * MIB)
    slots = [arena.take(MIB) for _ in range(4)]
    low = slots[0].data_ptr()
    del slots[1]  # a hole of 1 MiB
    assert arena.largest_hole() == MIB
    del slots[1]  # the next one: 2 MiB together
    assert arena.largest_hole() == 2 * MIB
    assert arena.fragmentation() == 0
    del slots[0]  # the one before: 3 MiB from the bottom
    assert arena.largest_hole() == 3 * MIB
    big = arena.take(3 * MIB)
    assert big.data_ptr() == low
    assert arena.stats()["overflows"] == 0


def test_fragmentation_is_what_the_largest_hole_misses():
    arena = Arena(4 * MIB)
    slots = [arena.take(MIB) for _ in range(4)]
    del slots[2], slots[0]  # two 1 MiB holes apart
    assert arena.largest_hole() == MIB
    assert arena.fragmentation() == pytest.approx(0.5)


def test_no_room_and_nothing_coming_back_is_an_overflow_counted_and_warned_once():
    arena = Arena(MIB, describe=lambda: "3 values in the host tier")
    held = arena.take(MIB)
    with pytest.warns(UserWarning, match=r"no room for a value of 4\.0 KiB.*3 values in the host"):
        outside = arena.take(PAGE, wait=True)
    assert outside.data_ptr() % PAGE == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per arena
        arena.take(PAGE)
    stats = arena.stats()
    assert (stats["overflows"], stats["overflow_bytes"]) == (2, 2 * PAGE)
    assert stats["bytes"] == MIB and held.numel() == MIB


def test_a_value_larger_than_the_region_overflows():
    arena = Arena(MIB)
    with pytest.warns(UserWarning, match="host_bytes"):
        value = arena.take(2 * MIB)
    assert value.numel() == 2 * MIB and arena.stats()["overflows"] == 1


def test_no_region_hands_out_ordinary_memory_without_counting_it():
    arena = Arena(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = arena.take(MIB)
    assert value.numel() == MIB and value.data_ptr() % PAGE == 0
    assert arena.stats()["overflows"] == 0 and not arena.mapped


def _waiting(arena: Arena, waits: int) -> None:
    """Returns once ``waits`` takes have gone to sleep (take notifies as it does)."""
    with arena._condition:
        while arena.waits < waits:
            arena._condition.wait()


def test_take_waits_for_a_slot_a_write_in_flight_gives_back():
    arena = Arena(MIB)
    writing = [arena.take(MIB)]  # a value on its way to disk
    arena.expect_return()
    got: list[torch.Tensor] = []
    waiter = threading.Thread(target=lambda: got.append(arena.take(MIB, wait=True)))
    waiter.start()
    _waiting(arena, 1)
    assert not got
    address = writing[0].data_ptr()
    writing.clear()  # the write landed: its slot comes back
    arena.returned_expected()
    waiter.join()
    assert got[0].data_ptr() == address
    assert arena.stats()["overflows"] == 0


def test_a_wait_ends_in_an_overflow_once_no_write_will_give_a_slot_back():
    arena = Arena(MIB)
    held_by_caller = arena.take(MIB)
    arena.expect_return()
    got: list[torch.Tensor] = []

    def take() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got.append(arena.take(MIB, wait=True))

    waiter = threading.Thread(target=take)
    waiter.start()
    _waiting(arena, 1)
    arena.returned_expected()  # the write ended, but the caller still holds the value
    waiter.join()
    assert got[0].data_ptr() != held_by_caller.data_ptr()
    assert arena.stats()["overflows"] == 1


def test_a_slot_returned_inside_the_arena_is_taken_back_later():
    # The collector may free a slot on a thread that is inside the arena's lock, in
    # the middle of changing the free list: it is queued, and taken back afterwards.
    arena = Arena(2 * MIB)
    slot = arena.take(MIB)
    with arena._condition:
        arena._busy = True
        del slot
        gc.collect()
        assert arena.slots == 1  # not yet taken back
        arena._busy = False
    assert arena.stats()["slots"] == 0
    assert arena.largest_hole() == 2 * MIB


def test_a_slot_outlives_close_and_the_region_goes_with_the_last_one():
    arena = Arena(MIB)
    value = arena.copy_in(torch.arange(1000, dtype=torch.int64))
    arena.close()
    assert value.sum().item() == sum(range(1000))  # still mapped while held
    with pytest.raises(RuntimeError, match="after the pool closed"):
        arena.take(PAGE)
    del value
    assert arena.stats()["slots"] == 0


def test_an_overflow_buffer_counts_as_a_copy_made_only_while_it_lives():
    arena = Arena(MIB)
    held = arena.take(MIB)
    with pytest.warns(UserWarning, match="no room"):
        outside = arena.copy_in(torch.arange(PAGE, dtype=torch.int32))
    assert arena.made(outside) and arena.made(held) and not arena.holds(outside)
    assert not arena.made(outside[1:]) and not arena.made(torch.arange(PAGE, dtype=torch.int32))
    address = outside.data_ptr()
    del outside
    gc.collect()
    assert address not in arena._outside  # a tensor later at that address is no copy of ours
