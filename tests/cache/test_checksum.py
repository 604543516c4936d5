"""checksum = true (the default): every chunk carries a CRC32C (zarr's crc32c codec),
checked on read."""

from __future__ import annotations

import pytest
import torch
import zarr

from spill_testing import assert_same, random_tensor, run_console
from spillcache import CacheConfig, IntermediatesCache, StoreCorruptError

SHAPE = (64, 64)


def spilled(tmp_path, **settings) -> tuple[IntermediatesCache, str]:
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), checksum=True, **settings
    )
    cache = IntermediatesCache([{"h": random_tensor(torch.float32, SHAPE, 0)}], config=config)
    cache.flush()
    record = cache._core._batches[0]["h"].leaves[0]
    return cache, f"{cache.store_path}/tensors/{record.array}/c.0.0"


def test_plain_zarr_reads_and_checks_a_checksummed_store(tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), checksum=True)
    value = random_tensor(torch.float32, SHAPE, 0).nan_to_num()
    cache = IntermediatesCache([{"h": value}], config=config, offload_device="cpu")
    cache.flush()
    name = cache._core._batches[0]["h"].leaves[0].array
    group = zarr.open_group(cache.store_path, mode="r")
    assert group[f"tensors/{name}"].metadata.codecs[-1].to_dict() == {"name": "crc32c"}
    assert_same(torch.from_numpy(group[f"tensors/{name}"][...]), value)
    cache.close()


@pytest.mark.parametrize("read_mode", ["copy", "mmap"])
@pytest.mark.parametrize("direct_io", [True, False])
def test_a_flipped_bit_is_an_error_naming_the_entry(tmp_path, read_mode, direct_io):
    cache, chunk = spilled(tmp_path, read_mode=read_mode, direct_io=direct_io)
    with open(chunk, "r+b") as handle:
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(StoreCorruptError, match=r"batch 0, key 'h'.*CRC32C"):
        cache.fetch(0)
    cache.close()


def test_a_truncated_chunk_is_an_error_naming_the_entry(tmp_path):
    cache, chunk = spilled(tmp_path)
    with open(chunk, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(StoreCorruptError, match=r"batch 0, key 'h'.*holds 1000 bytes"):
        cache.fetch(0)
    cache.close()


def test_without_checksum_the_chunk_is_plain_bytes(tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), checksum=False)
    cache = IntermediatesCache([{"h": random_tensor(torch.float32, SHAPE, 0)}], config=config)
    cache.flush()
    record = cache._core._batches[0]["h"].leaves[0]
    chunk = f"{cache.store_path}/tensors/{record.array}/c.0.0"
    assert open(chunk, "rb").read() == random_tensor(torch.float32, SHAPE, 0).numpy().tobytes()
    cache.close()


def test_one_flipped_byte_in_a_kept_store_written_with_the_defaults(tmp_path):
    """The defaults checksum: verify fails naming the array, fetching that batch raises,
    and every other batch comes back bit for bit."""
    config = CacheConfig(disk_path=str(tmp_path), keep_store=True)
    values = [random_tensor(torch.bfloat16, (256, 256), seed) for seed in range(3)]
    cache = IntermediatesCache([{"h": value} for value in values], config=config)
    cache.close()
    name = cache._core._batches[1]["h"].leaves[0].array
    chunk = f"{cache.store_path}/tensors/{name}/c.0.0"
    with open(chunk, "r+b") as handle:  # in place: the size stays the same
        handle.seek(4097)
        byte = handle.read(1)
        handle.seek(4097)
        handle.write(bytes([byte[0] ^ 0x01]))
    done = run_console("verify", cache.store_path)
    assert done.returncode == 1
    assert f"BAD {name} (batch 1, key 'h'):" in done.stdout and "CRC32C" in done.stdout
    reopened = IntermediatesCache.open(cache.store_path)
    with pytest.raises(StoreCorruptError, match=rf"batch 1, key 'h'.*{name}.*CRC32C"):
        reopened.fetch(1)
    for index in (0, 2):
        assert_same(reopened.fetch(index)["h"], values[index])
    assert reopened.stats()["disk"]["hits"] >= 2  # they came from their chunk files
    reopened.close()
