"""The I/O layer at its edges: a direct read the kernel cuts short where the code must
resume exactly where it stopped, a read buffer held only through its storage, an arena
closed while another thread lets go of its last slot, a prefetch's host source held
until its copy ran, a read buffer that could not be made, an error with writes queued,
and slots still held at interpreter exit. (A direct write cut short:
tests/unit/test_chunkio.py.)"""

from __future__ import annotations

import collections
import errno
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from spill_testing import bits, random_tensor
from spillcache._internal.io import chunk_reads
from spillcache._internal.io.arena import Arena
from spillcache._internal.io.buffers import PAGE, aligned_empty
from spillcache._internal.io.chunk_reads import read_file
from spillcache._internal.io.chunkio import write_file


def _capped(real, limit):
    """preadv that stops after ``limit`` bytes on its first call (a short read at a
    page boundary), then reads normally."""
    calls = []

    def preadv(fd, buffers, offset):
        calls.append(offset)
        if len(calls) > 1:
            return real(fd, buffers, offset)
        cut, left = [], limit
        for buffer in buffers:
            if left <= 0:
                break
            cut.append(buffer[:left])
            left -= len(cut[-1])
        return real(fd, cut, offset)

    return preadv, calls


@pytest.mark.parametrize("nbytes", [4093, 4095, 2 * PAGE - 1], ids=str)
def test_a_short_direct_read_ending_inside_the_tail_pages_resumes_there(
    tmp_path, monkeypatch, nbytes
):
    # Data + CRC trailer spill over a page boundary past ``whole``: the tail buffer is
    # two pages. A short read ending on the page boundary inside it is resumed at the
    # right file offset, but into the tail buffer's FIRST byte.
    path = tmp_path / "c"
    data = random_tensor(torch.uint8, (nbytes,), 3)
    write_file(path, data, direct=False, staging=None, trailer=chunk_reads.crc32c(data))
    whole = nbytes - nbytes % PAGE
    preadv, calls = _capped(os.preadv, whole + PAGE)
    monkeypatch.setattr(os, "preadv", preadv)
    out = aligned_empty(nbytes)
    read_file(path, out, direct=True, checksum=True)  # HEAD: StoreCorruptError (CRC)
    assert calls == [0, whole + PAGE]
    assert bits(out) == bits(data)


def test_close_while_another_threads_slot_finalizer_waits_for_the_lock():
    # Thread B drops the last slot: its finalizer queues the return, then waits for
    # the arena's lock, which close() holds (simulated by holding it around close);
    # close() takes the return back, sees slots == 0 and closes the mmap while B's
    # ctypes slot object still exports a buffer over it -> BufferError.
    arena = Arena(1 << 20)
    held = [arena.take(PAGE)]
    appended = threading.Event()

    class Signalling(collections.deque):
        def append(self, item):
            super().append(item)
            appended.set()

    arena._returned = Signalling(arena._returned)
    with arena._condition:
        dropper = threading.Thread(target=held.clear)
        dropper.start()
        assert appended.wait(10)
        arena.close()  # HEAD: BufferError: cannot close exported pointers exist
    dropper.join(10)
    assert not dropper.is_alive()
    assert arena.stats()["slots"] == 0


def test_a_read_buffer_held_through_its_storage_is_not_handed_out_again():
    # A caller who keeps a value's storage (``untyped_storage()``, ``storage()``: pickling,
    # set_ later, a storage-keyed dict) still views its bytes; BufferPool counts holders
    # by the storage's use count, which the storage's Python object -- the same object
    # the pool's own untyped_storage() call gets back -- raises only once.
    from spillcache._internal.io.buffers import BufferPool

    pool = BufferPool(1 << 20)
    value = pool.take(5000)
    value.fill_(1)
    address, offset = value.data_ptr(), value.storage_offset()
    storage = value.untyped_storage()
    del value
    again = pool.take(5000)
    again.fill_(2)
    kept = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (5000,))
    assert again.data_ptr() != address  # HEAD: the same block, handed out again
    assert bool((kept == 1).all())  # HEAD: the kept bytes now read 2


def test_a_prefetch_copys_host_source_is_held_until_the_copy_ran():
    """A prefetch's host-to-device copy reads an arena slot or a read buffer, which
    torch does not keep from reuse as it keeps its own pinned memory: ``Ready`` holds
    the source until the copy's event completed (``let_go``, after ``wait`` or for a
    batch never used). A stand-in event counts the waits (no GPU here)."""
    import weakref

    from spillcache._internal.io.transfers import Ready

    class Event:
        def __init__(self) -> None:
            self.waited = 0

        def synchronize(self) -> None:
            self.waited += 1

    event, source = Event(), torch.ones(16)
    alive = weakref.ref(source)
    ready = Ready()
    ready.add(torch.device("cpu"), event, torch.empty(16), source)
    del source
    assert alive() is not None and event.waited == 0  # still held: the copy may be running
    ready.let_go()
    assert event.waited == 1 and alive() is None and not ready


def test_a_read_buffer_that_could_not_be_made_leaves_the_pools_budget_as_it_was(monkeypatch):
    # take counts a kept block's bytes before it allocates them (so that two threads do
    # not both pass max_bytes); an allocation that fails (no memory, a pinned block
    # refused) must not leave them counted, or the pool stops keeping blocks for good.
    from spillcache._internal.io import buffers

    pool = buffers.BufferPool(PAGE)
    real = buffers.aligned_empty

    def refused(nbytes, *, pin=False):
        monkeypatch.setattr(buffers, "aligned_empty", real)
        raise MemoryError("no memory for a read buffer")

    monkeypatch.setattr(buffers, "aligned_empty", refused)
    with pytest.raises(MemoryError):
        pool.take(PAGE)
    assert pool.nbytes == 0  # HEAD: 4096, counted for a block that was never made
    first = pool.take(PAGE)
    address = first.data_ptr()
    del first
    assert pool.nbytes == PAGE and pool.take(PAGE).data_ptr() == address  # kept, reused


def test_an_error_in_a_block_with_writes_queued_is_not_replaced_by_one_while_draining(
    monkeypatch,
):
    # The block's error names the cause (ENOSPC: a full disk, DiskFullError); one from
    # waiting for the queued writes afterwards must not take its place.
    from spillcache._internal.io import aio

    class FailingDrain:
        destroyed = False

        def drain(self):
            raise OSError(errno.EINVAL, "getevents: Invalid argument")

        def destroy(self):
            self.destroyed = True

    ctx = FailingDrain()
    monkeypatch.setattr(aio, "available", lambda: True)
    monkeypatch.setattr(aio, "_idle", [ctx])
    with pytest.raises(OSError) as raised:
        with aio.context():
            raise OSError(errno.ENOSPC, "write at offset 0: No space left on device")
    assert raised.value.errno == errno.ENOSPC  # HEAD: EINVAL, the drain's
    assert "getevents" in "".join(getattr(raised.value, "__notes__", []))
    assert ctx.destroyed and aio._idle == []  # a context that failed is not lent again


def test_slots_still_held_at_interpreter_exit_are_not_handed_out_again(tmp_path):
    # weakref.finalize runs pending finalizers at exit, newest first: a slot's finalizer
    # (atexit=True) would put a slot still held back in the free list before an older
    # finalizer (a cache's close, made before its slots) runs, which could then be handed
    # that memory over a value it is still writing out.
    script = tmp_path / "exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import weakref
            from spillcache._internal.io.arena import Arena

            arena = Arena(1 << 20)

            def close_at_exit():
                slots = arena.stats()["slots"]
                fresh = arena.take(4096)
                fresh.fill_(2)
                print(slots, fresh.data_ptr() == held.data_ptr(), bool((held == 1).all()))

            weakref.finalize(arena, close_at_exit)
            held = arena.take(4096)
            held.fill_(1)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split() == ["1", "False", "True"]  # HEAD: 0 True False
