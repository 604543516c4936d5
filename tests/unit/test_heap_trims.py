"""buffers.heap_moved: glibc's heap's stranded free bytes are given back once
enough slots have been handed out, and only where there are enough of them."""

from __future__ import annotations

import pytest

from spillcache._internal.io import buffers


class FakeGlibc:
    def __init__(self, stranded: int) -> None:
        self.stranded = stranded
        self.checks = 0
        self.trimmed: list[int] = []

    def mallinfo2(self) -> buffers._MallInfo2:
        self.checks += 1
        info = buffers._MallInfo2()
        info.keepcost = 5 << 20  # free at the top: not stranded
        info.fordblks = info.keepcost + self.stranded
        return info

    def malloc_trim(self, pad: int) -> int:
        self.trimmed.append(pad)
        return 1


@pytest.fixture
def glibc(monkeypatch):
    def install(stranded: int) -> FakeGlibc:
        fake = FakeGlibc(stranded)
        monkeypatch.setattr(buffers, "_glibc", (fake.mallinfo2, fake.malloc_trim))
        monkeypatch.setattr(buffers, "_heap_since_check", 0)
        return fake

    return install


def test_stranded_bytes_past_the_limit_are_given_back_every_check(glibc):
    fake = glibc(buffers.HEAP_STRANDED_LIMIT + 1)
    before = buffers.heap_trims
    buffers.heap_moved(buffers.HEAP_CHECK_EVERY - 1)
    assert fake.checks == 0  # not yet: the heap is read once per HEAP_CHECK_EVERY bytes
    buffers.heap_moved(1)
    assert (fake.checks, fake.trimmed) == (1, [0])
    buffers.heap_moved(buffers.HEAP_CHECK_EVERY)
    assert (fake.checks, len(fake.trimmed)) == (2, 2)
    assert buffers.heap_trims == before + 2


def test_a_heap_within_the_limit_is_left_alone(glibc):
    fake = glibc(buffers.HEAP_STRANDED_LIMIT)
    buffers.heap_moved(3 * buffers.HEAP_CHECK_EVERY)
    assert fake.checks == 1 and fake.trimmed == []


def test_without_glibc_nothing_is_read(monkeypatch):
    monkeypatch.setattr(buffers, "_glibc", None)
    buffers.heap_moved(10 * buffers.HEAP_CHECK_EVERY)  # no error, nothing to do


def test_this_machines_glibc_is_found():
    # Linux with glibc 2.33+ (the CI image): the functions load, and a real call works.
    if buffers._glibc is None:
        pytest.skip("no glibc 2.33+ here: the heap is left to its allocator")
    mallinfo2, _ = buffers._glibc
    assert mallinfo2().arena > 0
