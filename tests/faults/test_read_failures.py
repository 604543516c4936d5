"""Reads that fail at the system call (EIO, short reads, a missing chunk file).

The error names the batch, the key and the chunk file; other entries (of the same batch
and of others) stay readable, and the failing entry is not lost: once the fault is
gone, it reads back bit for bit.
"""

from __future__ import annotations

import errno
import os
import threading

import pytest
import torch

from faults.injection import same_bits, unaligned
from spill_testing import random_tensor
from spillcache import CacheConfig, IntermediatesCache, StoreCorruptError, StoreError
from spillcache._internal.io import chunk_reads
from spillcache._internal.store.store_format import chunk_name

KIB64 = 64 * 2**10

# How a value comes back from disk, and the call that reads its chunk.
READS = {
    "direct": ({"direct_io": True}, "preadv"),
    "buffered": ({"direct_io": False}, "preadv"),
    "mmap": ({"read_mode": "mmap"}, "open"),
}


def filled(tmp_path, **settings):
    """A cache whose values are all on disk: batch 0 {"a", "b"}, batch 1 {"a"}."""
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path / "spill"), **settings
    )
    cache = IntermediatesCache.empty(2, "cpu", config=config)
    values = {(0, "a"): unaligned(KIB64, 0), (0, "b"): unaligned(KIB64, 1)}
    values[(1, "a")] = unaligned(KIB64, 2)
    for (batch, key), value in values.items():
        cache.update(batch, {key: value})
    cache.flush()
    return cache, values


def chunk_of(cache: IntermediatesCache, batch: int, key: str) -> str:
    (record,) = cache._core._batches[batch][key].leaves
    store = cache._core.tenant.store_on(record.disk)
    return str(store.path / "tensors" / record.array / chunk_name(len(record.shape)))


def assert_others_readable(cache, values, batch=0, key="a") -> None:
    others = [k for b, k in values if b == batch and k != key]
    got = cache.fetch(batch, others)
    for other in others:
        assert same_bits(got[other], values[(batch, other)])
    for (b, k), value in values.items():
        if b != batch:
            assert same_bits(cache.fetch(b, [k])[k], value)


@pytest.mark.parametrize("mode", sorted(READS))
def test_an_eio_on_read_names_batch_key_and_file(tmp_path, syscalls, mode):
    settings, call = READS[mode]
    cache, values = filled(tmp_path, **settings)
    with cache:
        chunk = chunk_of(cache, 0, "a")
        rule = syscalls.fail(call, errno.EIO, path=chunk)
        with pytest.raises(StoreError) as raised:
            cache.fetch(0)
        assert rule.hits == [chunk] and raised.value.errno == errno.EIO
        message = str(raised.value)
        assert message.startswith(f"[Errno {errno.EIO}] batch 0, key 'a': ")
        assert chunk in message and "Input/output error" in message
        assert_others_readable(cache, values)
        assert same_bits(cache.fetch(0)["a"], values[(0, "a")])  # not lost: read again


@pytest.mark.parametrize("mode", ["direct", "buffered"])
def test_a_read_that_ends_early_is_a_truncated_chunk_naming_the_entry(tmp_path, syscalls, mode):
    settings, call = READS[mode]
    cache, values = filled(tmp_path, **settings)
    with cache:
        chunk = chunk_of(cache, 0, "a")
        syscalls.read_short(call, 0, path=chunk)  # the end of the file, too soon
        with pytest.raises(StoreCorruptError) as raised:
            cache.fetch(0)
        message = str(raised.value)
        assert message.startswith("batch 0, key 'a': ") and chunk in message
        assert f"ended after 0 bytes, expected {KIB64 + 4}" in message  # and its CRC32C
        assert_others_readable(cache, values)
        assert same_bits(cache.fetch(0)["a"], values[(0, "a")])


@pytest.mark.parametrize(
    ("mode", "short"), [("direct", 2 * 4096), ("buffered", 2 * 4096), ("buffered", 4096 + 100)]
)
def test_a_short_read_goes_on_from_where_it_stopped(tmp_path, syscalls, mode, short):
    """A read may return fewer bytes than asked without the file being short."""
    settings, call = READS[mode]
    cache, values = filled(tmp_path, **settings)  # a 4-byte trailer (CRC32C) too
    with cache:
        chunk = chunk_of(cache, 0, "a")
        rule = syscalls.read_short(call, short, path=chunk, times=2)
        assert same_bits(cache.fetch(0)["a"], values[(0, "a")])
        assert rule.hits == [chunk, chunk]


def test_a_direct_read_ending_inside_a_page_is_a_truncated_chunk(tmp_path, syscalls):
    """O_DIRECT reads whole pages but at the end of the file: one that stops inside a
    page met the end of a file shorter than its size said."""
    cache, values = filled(tmp_path, direct_io=True)
    with cache:
        chunk = chunk_of(cache, 0, "a")
        syscalls.read_short("preadv", 4096 + 100, path=chunk)
        with pytest.raises(StoreCorruptError) as raised:
            cache.fetch(0)
        assert str(raised.value).startswith("batch 0, key 'a': ") and chunk in str(raised.value)
        assert f"ended after {4096 + 100} bytes" in str(raised.value)
        assert_others_readable(cache, values)
        assert same_bits(cache.fetch(0)["a"], values[(0, "a")])


@pytest.mark.parametrize("mode", sorted(READS))
def test_a_missing_chunk_file_names_the_entry_and_spares_the_others(tmp_path, mode):
    settings, _ = READS[mode]
    cache, values = filled(tmp_path, **settings)
    with cache:
        chunk = chunk_of(cache, 0, "a")
        os.remove(chunk)
        with pytest.raises(StoreCorruptError) as raised:
            cache.fetch(0)
        message = str(raised.value)
        assert message.startswith("batch 0, key 'a': ") and f"{chunk} is missing" in message
        assert "other entries stay readable" in message
        assert_others_readable(cache, values)
        with pytest.raises(StoreCorruptError):  # still missing: the same error again
            cache.fetch(0, ["a"])


def test_a_failed_read_ahead_is_raised_for_its_batch_and_loses_nothing(tmp_path, syscalls):
    cache, values = filled(tmp_path, prefetch_depth=2)
    with cache:
        syscalls.fail("preadv", errno.EIO, path=chunk_of(cache, 1, "a"))
        batches = cache.iter_prefetch()
        first = next(batches)
        assert same_bits(first["a"], values[(0, "a")]) and same_bits(first["b"], values[(0, "b")])
        with pytest.raises(StoreError, match=r"^\[Errno 5\] batch 1, key 'a': "):
            next(batches)
        again = list(cache.iter_prefetch())  # the fault is gone: everything comes back
        assert same_bits(again[1]["a"], values[(1, "a")])


BIG = chunk_reads.TURN_BYTES + 4096 + 5  # read in its device's turn, with a partial page


@pytest.mark.parametrize("short", [None, 0, 4096 + 100])  # EIO, EOF, EOF inside a page
def test_a_read_in_the_devices_turn_that_fails_hands_the_turn_on(tmp_path, syscalls, short):
    """A large direct read that fails (EIO, or the file ends too soon) names its entry,
    and the next large read on that device is not left waiting for a turn never given
    back: it happens, and the value failed is read again once the fault is gone."""
    values = {b: random_tensor(torch.float32, (BIG // 4,), b) for b in range(2)}
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), direct_io=True)
    with IntermediatesCache([{"a": values[0]}, {"a": values[1]}], config=config) as cache:
        cache.flush()
        chunk = chunk_of(cache, 0, "a")
        if short is not None:
            syscalls.read_short("preadv", short, path=chunk)
            error, text = StoreCorruptError, f"ended after {short} bytes"
        else:
            syscalls.fail("preadv", errno.EIO, path=chunk)
            error, text = StoreError, "Input/output error"
        with pytest.raises(error) as raised:
            cache.fetch(0)
        assert str(raised.value).count(chunk) == 1 and text in str(raised.value)
        reader = threading.Thread(target=cache.fetch, args=(1,))
        reader.start()
        reader.join(timeout=60)  # a turn kept by the failed read would hang it
        assert not reader.is_alive()
        assert same_bits(cache.fetch(0)["a"], values[0])
        assert same_bits(cache.fetch(1)["a"], values[1])
