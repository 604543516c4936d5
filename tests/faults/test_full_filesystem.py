"""A real small ext4 (an image file on a loop device) filled past its end.

Needs root, ``losetup`` and ``mkfs.ext4``; skipped, saying why, elsewhere. The
filesystem is unmounted and its loop device detached whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from faults.injection import TOTALS, FreeSpace, leftovers, same_bits
from spillcache import CacheConfig, DiskFullError, IntermediatesCache

MIB = 2**20
VALUE = 2 * MIB
OFFERED = 240 * MIB  # on a 64 MiB filesystem, at a 4 MiB host budget


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (losetup, mount)"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(command)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def small_ext4(tmp_path: Path, size: int = 64 * MIB) -> Iterator[Path]:
    image, mountpoint = tmp_path / "disk.img", tmp_path / "mnt"
    with open(image, "wb") as file:
        file.truncate(size)
    mountpoint.mkdir()
    device = None
    try:
        try:
            _run("mkfs.ext4", "-q", "-F", str(image))
            device = _run("losetup", "--find", "--show", str(image))
            _run("mount", device, str(mountpoint))
        except OSError as error:
            pytest.skip(f"cannot make a loop-device filesystem here: {error}")
        try:
            yield mountpoint
        finally:
            _run("umount", str(mountpoint))
    finally:
        if device is not None:
            _run("losetup", "--detach", device)


def value(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (VALUE,), dtype=torch.uint8, generator=gen).view(torch.float32)


def make(disk: Path) -> IntermediatesCache:
    config = CacheConfig(host_bytes=4 * MIB, inline_bytes=0, disk_path=str(disk / "spill"))
    return IntermediatesCache.empty(OFFERED // VALUE, "cpu", config=config)


def offer(cache: IntermediatesCache) -> tuple[int, DiskFullError]:
    """Update batches in order until the cache refuses: how many it took, and why."""
    for index in range(len(cache)):
        try:
            cache.update(index, {"h": value(index)})
        except DiskFullError as error:
            return index, error
    raise AssertionError(f"{OFFERED} bytes fitted on a 64 MiB filesystem")


def assert_bounded(cache: IntermediatesCache) -> None:
    pool = cache.stats()["pool"]
    unwritten = pool["write_behind"]["unwritten_bytes"]
    assert pool["host"]["bytes"] <= pool["host"]["budget"] + unwritten
    assert pool["write_behind"]["bytes"] <= pool["write_behind"]["budget"] + VALUE


def test_filling_a_real_filesystem_is_one_clear_error_and_loses_nothing(tmp_path):
    with small_ext4(tmp_path) as disk:
        with make(disk) as cache:
            taken, error = offer(cache)
            assert 10 < taken < len(cache)  # most of 64 MiB was used
            assert f"batch {taken}, key 'h' ({VALUE} bytes) must go to disk" in str(error)
            assert f"{disk / 'spill'}: " in str(error) and "free space under" in str(error)
            cache.flush()  # nothing failed in the background: the refusal came first
            assert_bounded(cache)
            assert cache.stats()["write_behind"]["unwritten_bytes"] == 0
            for index in range(taken):
                assert same_bits(cache.fetch(index)["h"], value(index))
            assert cache.fetch(taken) == {}
        assert leftovers(disk / "spill") == []  # disk_path itself stays, empty


def test_writes_that_find_the_real_filesystem_full_are_reported_once(tmp_path, monkeypatch):
    """statvfs made to claim room (space taken by someone else after the check, say):
    the ext4 itself then says ENOSPC to the background writes."""
    with small_ext4(tmp_path) as disk:
        FreeSpace(monkeypatch).set(disk, 2**40)
        with make(disk) as cache:
            taken, first = offer(cache)  # the report stops the offers
            reports = [first]
            try:
                cache.flush()
            except DiskFullError as late:  # writes still in flight when it was raised
                reports.append(late)
            failed = [f.label for report in reports for f in report.failures]
            assert failed and len(failed) == len(set(failed))  # each named exactly once
            TOTALS["write failed (a full ext4)"] += len(failed)
            assert all("ENOSPC (No space left on device)" in str(r) for r in reports)
            stats = cache.stats()
            assert stats["write_behind"]["unwritten_bytes"] == VALUE * len(failed)
            assert_bounded(cache)
            for index in range(taken):  # acknowledged: written, or in RAM
                assert same_bits(cache.fetch(index)["h"], value(index))
            with pytest.raises(DiskFullError, match="failed for lack of space"):
                cache.update(taken, {"h": value(taken)})  # refused until there is room
            cache.flush()  # no more reports
        assert leftovers(disk / "spill") == []  # disk_path itself stays, empty
