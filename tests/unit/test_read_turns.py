"""Large direct reads take turns on their device (chunk_reads.turn, chunk_reads.read_file).

Each test holds a device's turn itself and watches, through a lock that reports who
waits for it, what a reader in another thread does meanwhile: never timed.
"""

from __future__ import annotations

import os
import threading

import pytest
import torch

from spillcache._internal.io import buffers, chunk_reads, chunkio

TURN = chunk_reads.TURN_BYTES


class WatchedLock:
    """A device's turn whose waiters are seen: ``waiting`` is set when a thread starts to
    wait for it (another thread holding it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiting = threading.Event()

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            self.waiting.set()
            self._lock.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@pytest.fixture
def watched_turn(tmp_path, monkeypatch):
    """The turn of tmp_path's device, replaced by a WatchedLock."""
    lock = WatchedLock()
    monkeypatch.setitem(chunk_reads._turns, os.stat(tmp_path).st_dev, lock)
    return lock


def checked_file(path, nbytes: int) -> torch.Tensor:
    data = buffers.aligned_empty(nbytes)
    data.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    trailer = chunk_reads.crc32c(data)
    chunkio.write_file(path, data, direct=True, staging=None, trailer=trailer)
    return data


def read_in_thread(path, nbytes: int, **kw) -> tuple[threading.Thread, torch.Tensor, list]:
    out = buffers.aligned_empty(nbytes)
    out.zero_()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            chunk_reads.read_file(path, out, **kw)
        except BaseException as error:  # the test thread reports it
            errors.append(error)

    thread = threading.Thread(target=read)
    thread.start()
    return thread, out, errors


def test_a_large_direct_read_waits_for_the_devices_turn(tmp_path, watched_turn):
    data = checked_file(tmp_path / "c", TURN + 4096 + 7)
    with watched_turn:  # another read has the device
        thread, out, errors = read_in_thread(
            tmp_path / "c", data.numel(), direct=True, checksum=True
        )
        assert watched_turn.waiting.wait(timeout=60)
        assert not out.any()  # it waits before reading a byte
    thread.join(timeout=60)
    assert not thread.is_alive() and not errors
    assert torch.equal(out, data)


def test_the_checksum_is_computed_after_the_turn_is_handed_on(tmp_path, watched_turn, monkeypatch):
    """The next reader has the device while this one checks what it read."""
    data = checked_file(tmp_path / "c", TURN)
    held_at_checksum: list[bool] = []
    real = chunk_reads.crc32c_extend

    def extend(crc, piece):
        held_at_checksum.append(watched_turn.locked())
        return real(crc, piece)

    monkeypatch.setattr(chunk_reads, "crc32c_extend", extend)
    out = buffers.aligned_empty(TURN)
    chunk_reads.read_file(tmp_path / "c", out, direct=True, checksum=True)
    assert torch.equal(out, data)
    assert held_at_checksum == [False]


@pytest.mark.parametrize(
    ("nbytes", "direct"), [(TURN - 4096, True), (TURN, False)], ids=["small", "buffered"]
)
def test_small_and_buffered_reads_take_no_turn(tmp_path, watched_turn, nbytes, direct):
    """Several small reads at once are how a device is kept busy with small values; a
    buffered read is served by the page cache as much as by the device."""
    data = checked_file(tmp_path / "c", nbytes)
    with watched_turn:
        thread, out, errors = read_in_thread(tmp_path / "c", nbytes, direct=direct, checksum=True)
        thread.join(timeout=60)  # would wait for the turn held here: hang, then fail
        assert not thread.is_alive() and not errors
        assert not watched_turn.waiting.is_set()
    assert torch.equal(out, data)


def test_devices_have_turns_of_their_own(tmp_path):
    other_has_turn = threading.Event()

    def read_on_other_device() -> None:
        with chunk_reads.turn(-2, TURN, tmp_path):
            other_has_turn.set()

    with chunk_reads.turn(-1, TURN, tmp_path):
        thread = threading.Thread(target=read_on_other_device)
        thread.start()
        assert other_has_turn.wait(timeout=60)
    thread.join()


def test_reads_from_a_network_file_system_take_no_turn(tmp_path, monkeypatch):
    """Its servers serve several requests at once: reads there stay in parallel."""
    monkeypatch.setattr(chunk_reads, "filesystem_type", lambda path: "nfs4")
    monkeypatch.delitem(chunk_reads._turns, -3, raising=False)
    other_read = threading.Event()

    def read_beside() -> None:
        with chunk_reads.turn(-3, TURN, tmp_path):
            other_read.set()

    with chunk_reads.turn(-3, TURN, tmp_path):
        thread = threading.Thread(target=read_beside)
        thread.start()
        assert other_read.wait(timeout=60)  # not waiting for the turn held here
    thread.join()
    assert chunk_reads._turns.pop(-3) is None
