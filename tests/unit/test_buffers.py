"""spillcache._internal.io.buffers: read buffers are reused only once nobody holds them."""

from __future__ import annotations

import pytest
import torch

from spill_testing import HOLDING_FORMS
from spillcache._internal.io import buffers
from spillcache._internal.io.buffers import BufferPool

MIB = 2**20


def test_a_released_block_is_handed_out_again():
    pool = BufferPool(8 * MIB)
    first = pool.take(MIB)
    address = first.data_ptr()
    assert address % buffers.PAGE == 0 and first.numel() == MIB
    del first
    second = pool.take(MIB)
    assert second.data_ptr() == address
    assert (pool.made, pool.reused) == (1, 1)


@pytest.mark.parametrize("keep", list(HOLDING_FORMS.values()), ids=list(HOLDING_FORMS))
def test_a_block_still_held_in_any_form_is_never_handed_out(keep):
    pool = BufferPool(8 * MIB)
    taken = pool.take(MIB)
    taken.fill_(7)
    held = keep(taken)
    del taken
    other = pool.take(MIB)
    other.fill_(9)  # would overwrite the held bytes if the block were shared
    if isinstance(held, memoryview):
        held = torch.frombuffer(held, dtype=torch.uint8)
    assert bool((torch.as_tensor(held).view(torch.uint8) == 7).all())
    assert pool.made == 2 and pool.reused == 0


def test_sizes_are_pooled_separately_and_rounded_to_pages():
    pool = BufferPool(8 * MIB)
    small = pool.take(100)
    address = small.data_ptr()
    del small
    assert pool.take(MIB).data_ptr() != address  # another size: another block
    assert pool.take(4000).data_ptr() == address  # the same page-rounded size


def test_the_pool_keeps_at_most_max_bytes():
    pool = BufferPool(2 * MIB)
    held = [pool.take(MIB) for _ in range(3)]  # the third is beyond the bound
    assert pool.nbytes == 2 * MIB
    addresses = [t.data_ptr() for t in held]
    del held
    again = [pool.take(MIB) for _ in range(2)]
    assert sorted(t.data_ptr() for t in again) == sorted(addresses[:2])
    assert pool.reused == 2


def test_zero_max_bytes_recycles_nothing():
    pool = BufferPool(0)
    first = pool.take(MIB)
    address = first.data_ptr()
    del first
    pool.take(MIB)
    assert pool.reused == 0 and pool.nbytes == 0
    assert address % buffers.PAGE == 0


def test_clear_forgets_blocks_but_leaves_held_ones_valid():
    pool = BufferPool(8 * MIB)
    held = pool.take(MIB)
    held.fill_(3)
    pool.clear()
    assert pool.nbytes == 0
    fresh = pool.take(MIB)
    fresh.fill_(4)
    assert bool((held == 3).all())
