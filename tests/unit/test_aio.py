"""spillcache._internal.io.aio: queued O_DIRECT writes, contexts lent and taken back."""

from __future__ import annotations

import errno
import multiprocessing
import os

import pytest
import torch

from spillcache._internal.io import aio
from spillcache._internal.io.chunkio import PAGE, aligned_empty


def _works() -> bool:
    with aio.context() as ctx:  # a seccomp filter may refuse io_setup itself
        return ctx is not None


pytestmark = pytest.mark.skipif(not _works(), reason="no native AIO here")


def direct_file(tmp_path):
    return os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)


def test_queued_writes_land_and_come_back_with_their_tags(tmp_path):
    data = aligned_empty(4 * PAGE)
    data.copy_(torch.randint(0, 256, (4 * PAGE,), dtype=torch.uint8))
    fd = direct_file(tmp_path)
    try:
        os.ftruncate(fd, 4 * PAGE)
        with aio.context() as ctx:
            for tag, offset in enumerate(range(0, 4 * PAGE, PAGE)):
                ctx.submit_write(fd, data.data_ptr() + offset, PAGE, offset, tag)
            assert ctx.in_flight == 4
            done = []
            while ctx.in_flight:
                done += ctx.wait(1)
            assert sorted(done) == [(tag, PAGE) for tag in range(4)]
            assert ctx.wait(1) == []  # nothing queued: nothing to wait for
    finally:
        os.close(fd)
    assert (tmp_path / "f").read_bytes() == bytes(data.numpy())


def test_an_error_comes_back_as_a_negative_errno(tmp_path):
    data = aligned_empty(PAGE)
    fd = direct_file(tmp_path)
    try:
        with aio.context() as ctx:
            ctx.submit_write(fd, data.data_ptr() + 1, PAGE, 0, 7)  # misaligned for O_DIRECT
            assert ctx.wait(1) == [(7, -errno.EINVAL)]
    finally:
        os.close(fd)


def test_a_context_holds_at_most_depth_writes(tmp_path):
    data = aligned_empty(PAGE)
    fd = direct_file(tmp_path)
    try:
        os.ftruncate(fd, aio.DEPTH * PAGE + PAGE)
        with aio.context() as ctx:
            for index in range(aio.DEPTH):
                ctx.submit_write(fd, data.data_ptr(), PAGE, index * PAGE, index)
            with pytest.raises(RuntimeError, match="at most"):
                ctx.submit_write(fd, data.data_ptr(), PAGE, aio.DEPTH * PAGE, aio.DEPTH)
            ctx.drain()
            assert ctx.in_flight == 0
    finally:
        os.close(fd)


def test_contexts_are_lent_again_not_made_per_use(monkeypatch):
    # io_destroy waits for an RCU grace period: one context per write would cost more
    # than the write.
    made = []
    real_init = aio.Context.__init__

    def counting_init(self):
        made.append(1)
        real_init(self)

    monkeypatch.setattr(aio.Context, "__init__", counting_init)
    monkeypatch.setattr(aio, "_idle", [])
    for _ in range(5):
        with aio.context() as ctx:
            assert ctx is not None
    assert len(made) == 1 and len(aio._idle) == 1
    with aio.context() as first, aio.context() as second:  # two writers at once: two
        assert first is not second
    assert len(made) == 2 and len(aio._idle) == 2


def test_a_context_given_back_after_an_error_has_nothing_queued(tmp_path, monkeypatch):
    monkeypatch.setattr(aio, "_idle", [])
    data = aligned_empty(PAGE)
    fd = direct_file(tmp_path)
    try:
        os.ftruncate(fd, 4 * PAGE)
        with pytest.raises(KeyError):
            with aio.context() as ctx:
                for index in range(4):
                    ctx.submit_write(fd, data.data_ptr(), PAGE, index * PAGE, index)
                raise KeyError("the caller failed with writes queued")
    finally:
        os.close(fd)
    assert aio._idle == [ctx] and ctx.in_flight == 0


def test_without_native_aio_the_context_is_none(monkeypatch):
    monkeypatch.setattr(aio, "available", lambda: False)
    with aio.context() as ctx:
        assert ctx is None


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM])
def test_a_refusal_is_remembered(monkeypatch, code):
    def refused(self):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(aio, "_idle", [])
    monkeypatch.setattr(aio, "_refused", False)
    monkeypatch.setattr(aio.Context, "__init__", refused)
    with aio.context() as ctx:
        assert ctx is None
    assert not aio.available()


def test_running_out_of_contexts_is_not_remembered(monkeypatch):
    def exhausted(self):
        raise OSError(errno.EAGAIN, "aio-max-nr reached")

    monkeypatch.setattr(aio, "_idle", [])
    monkeypatch.setattr(aio, "_refused", False)
    monkeypatch.setattr(aio.Context, "__init__", exhausted)
    with aio.context() as ctx:
        assert ctx is None  # this write goes without; a later one may get a context
    assert aio.available()


def _child_sees_no_contexts(queue) -> None:
    queue.put(len(aio._idle))


def test_a_forked_child_forgets_the_parents_contexts():
    with aio.context():
        pass
    assert aio._idle
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_child_sees_no_contexts, args=(queue,))
    child.start()
    try:
        assert queue.get(timeout=30) == 0
    finally:
        child.join(30)
