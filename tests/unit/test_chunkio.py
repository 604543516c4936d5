"""spillcache._internal.io.chunkio: one chunk file, bit for bit, atomic, direct or buffered."""

from __future__ import annotations

import ast
import errno
import fcntl
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch

from spill_testing import bits, random_tensor
from spillcache._internal.io import aio, buffers, chunk_reads, chunkio
from spillcache._internal.io.buffers import PAGE, StagingBuffers, aligned_empty
from spillcache._internal.io.chunk_reads import map_file, read_file
from spillcache._internal.io.chunkio import direct_io_supported, write_file
from spillcache.errors import StoreCorruptError

STAGING_SIZE = 4 * PAGE  # small, so that larger files go through it in several pieces
SIZES = [0, 1, 4095, 4096, 4097, 3 * PAGE + 5, STAGING_SIZE * 3 + 123, (3 << 20) + 7]


def payload(nbytes: int, *, aligned: bool, seed: int = 0) -> torch.Tensor:
    """Random bytes in an aligned tensor, or in one that starts one byte past a page."""
    data = aligned_empty(nbytes) if aligned else aligned_empty(nbytes + 1)[1:]
    data.copy_(random_tensor(torch.uint8, (nbytes,), seed))
    assert (data.data_ptr() % PAGE == 0) == aligned or nbytes == 0
    return data


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial" in p.name)


@pytest.fixture
def staging():
    with StagingBuffers(2, STAGING_SIZE) as buffers:
        yield buffers


@pytest.fixture
def shm_dir():
    if not os.path.isdir("/dev/shm"):
        pytest.skip("/dev/shm is missing")
    directory = Path(tempfile.mkdtemp(prefix="chunkio-test-", dir="/dev/shm"))
    yield directory
    shutil.rmtree(directory)


# ------------------------------------------------------------ aligned_empty


@pytest.mark.parametrize("nbytes", [0, 1, 63, 64, 4095, 4096, 4097, 10_000, 1 << 20, (1 << 20) + 3])
def test_aligned_empty_is_aligned_and_padded(nbytes):
    for _ in range(3):  # several allocations, so a lucky address cannot pass by chance
        tensor = aligned_empty(nbytes)
        assert tensor.dtype == torch.uint8 and tensor.shape == (nbytes,)
        assert tensor.data_ptr() % PAGE == 0
        owned = tensor.untyped_storage().nbytes() - tensor.storage_offset()
        assert owned >= -(-nbytes // PAGE) * PAGE


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_pinning_without_cuda_says_so():
    with pytest.raises(RuntimeError, match="pin=True needs CUDA"):
        aligned_empty(10, pin=True)
    with pytest.raises(RuntimeError, match="pin=True needs CUDA"):
        StagingBuffers(1, PAGE, pin=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_buffers_are_pinned_and_aligned(tmp_path):
    tensor = aligned_empty(PAGE + 3, pin=True)
    assert tensor.is_pinned() and tensor.data_ptr() % PAGE == 0
    with StagingBuffers(2, PAGE, pin=True) as staging, staging.acquire() as buffer:
        assert buffer.is_pinned() and buffer.data_ptr() % PAGE == 0
        data = payload(PAGE + 3, aligned=False)
        write_file(tmp_path / "c", data, direct=True, staging=staging)
    read_file(tmp_path / "c", tensor, direct=True)
    assert bits(tensor) == bits(data)


def test_aligned_empty_rejects_negative_sizes():
    with pytest.raises(ValueError, match=">= 0"):
        aligned_empty(-1)


# ----------------------------------------------------------- round trips


@pytest.mark.parametrize("nbytes", SIZES)
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_round_trip_bit_for_bit(tmp_path, staging, nbytes, aligned, direct):
    data = payload(nbytes, aligned=aligned, seed=nbytes)
    path = tmp_path / "c.0"
    write_file(path, data, direct=direct, staging=staging)
    assert path.stat().st_size == nbytes
    assert path.read_bytes() == bits(data)
    assert leftovers(tmp_path) == []
    assert staging.available == 2  # every buffer was given back
    for read_direct in (True, False):
        out = aligned_empty(nbytes)
        out.fill_(0xEE)
        read_file(path, out, direct=read_direct)
        assert bits(out) == bits(data)


@pytest.mark.parametrize("nbytes", [1, 4097, STAGING_SIZE * 2 + 9])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_direct_write_without_staging_buffers(tmp_path, nbytes, aligned):
    data = payload(nbytes, aligned=aligned, seed=3)
    write_file(tmp_path / "c", data, direct=True, staging=None, durable=True)
    assert (tmp_path / "c").read_bytes() == bits(data)
    assert leftovers(tmp_path) == []


def test_only_unaligned_sources_are_staged(tmp_path, staging, monkeypatch):
    acquired = []
    real_acquire = staging.acquire

    def counting_acquire():
        acquired.append(1)
        return real_acquire()

    monkeypatch.setattr(staging, "acquire", counting_acquire)
    write_file(tmp_path / "a", payload(3 * PAGE + 5, aligned=True), direct=True, staging=staging)
    assert acquired == []  # whole pages written from the tensor's memory, tail buffered
    write_file(tmp_path / "b", payload(PAGE - 1, aligned=False), direct=True, staging=staging)
    assert acquired == []  # no whole page: nothing to stage
    write_file(tmp_path / "c", payload(3 * PAGE + 5, aligned=False), direct=True, staging=staging)
    assert acquired == [1]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_whole_pages_go_direct_and_the_tail_buffered(tmp_path, monkeypatch, aligned):
    monkeypatch.setattr(aio, "available", lambda: False)  # staged pieces: one pwrite each
    writes = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        writes.append((offset, len(data), direct))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    with StagingBuffers(1, 2 * PAGE) as staging:
        write_file(
            tmp_path / "c", payload(3 * PAGE + 5, aligned=aligned), direct=True, staging=staging
        )
    if aligned:
        assert writes == [(0, 3 * PAGE, True), (3 * PAGE, 5, False)]
    else:
        assert writes == [(0, 2 * PAGE, True), (2 * PAGE, PAGE, True), (3 * PAGE, 5, False)]


@pytest.mark.parametrize("durable", [True, False])
def test_durable_syncs_the_file_and_its_directory(tmp_path, monkeypatch, durable):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    write_file(
        tmp_path / "c", payload(10, aligned=True), direct=True, staging=None, durable=durable
    )
    assert synced == ([False, True] if durable else [])  # the file, then the directory


def test_direct_read_leaves_bytes_past_the_end_of_a_view_alone(tmp_path):
    data = payload(PAGE + 10, aligned=True)
    write_file(tmp_path / "c", data, direct=True, staging=None)
    base = aligned_empty(2 * PAGE)
    base.fill_(7)
    read_file(tmp_path / "c", base[: PAGE + 10], direct=True)
    assert bits(base[: PAGE + 10]) == bits(data)
    assert torch.all(base[PAGE + 10 :] == 7)  # the rest of the last page was not clobbered


def test_rewrite_replaces_the_whole_file(tmp_path, staging):
    path = tmp_path / "c"
    write_file(path, payload(3 * PAGE + 5, aligned=True, seed=1), direct=True, staging=staging)
    shorter = payload(PAGE + 1, aligned=False, seed=2)
    write_file(path, shorter, direct=True, staging=staging)
    assert path.read_bytes() == bits(shorter)


def test_write_rejects_tensors_that_are_not_flat_uint8(tmp_path):
    with pytest.raises(ValueError, match="1-D contiguous uint8"):
        write_file(tmp_path / "c", torch.zeros(4, dtype=torch.int32), direct=False, staging=None)
    with pytest.raises(ValueError, match="1-D contiguous uint8"):
        write_file(
            tmp_path / "c", torch.zeros(8, dtype=torch.uint8)[::2], direct=False, staging=None
        )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------- direct I/O probe


def test_direct_io_supported_on_ext4_and_leaves_no_probe(tmp_path):
    assert direct_io_supported(tmp_path) is True
    assert list(tmp_path.iterdir()) == []


def test_direct_io_refused_by_the_filesystem_means_false(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            real_open(path, flags & ~os.O_DIRECT, *args)  # file created, then refused (tmpfs)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    assert direct_io_supported(tmp_path) is False
    with pytest.raises(OSError) as raised:
        write_file(tmp_path / "c", payload(10, aligned=True), direct=True, staging=None)
    assert raised.value.errno == errno.EINVAL
    assert list(tmp_path.iterdir()) == []  # neither probe nor partial file left behind


def test_direct_io_probe_of_a_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        direct_io_supported(tmp_path / "absent")


def test_buffered_fallback_on_tmpfs(shm_dir, staging):
    # tmpfs refused O_DIRECT before Linux 6.6 and accepts it since: either way the probe
    # must agree with what a direct write actually does there, and buffered must work.
    supported = direct_io_supported(shm_dir)
    assert leftovers(shm_dir) == []
    data = payload(3 * PAGE + 5, aligned=False, seed=9)
    path = shm_dir / "c"
    write_file(path, data, direct=False, staging=staging)
    out = aligned_empty(data.numel())
    read_file(path, out, direct=False)
    assert bits(out) == bits(data)
    if supported:
        write_file(path, data, direct=True, staging=staging)
        assert path.read_bytes() == bits(data)
    else:
        with pytest.raises(OSError):
            write_file(path, data, direct=True, staging=staging)
    assert leftovers(shm_dir) == []


# --------------------------------------------------------------- atomicity


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("existing", [False, True], ids=["new", "over_old"])
def test_failed_write_leaves_no_partial_and_the_old_file(
    tmp_path, staging, monkeypatch, direct, existing
):
    path = tmp_path / "c"
    old = b"old contents"
    if existing:
        path.write_bytes(old)
    real_pwrite = os.pwrite
    calls = []

    def pwrite_then_fail(fd, data, offset):
        calls.append(offset)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data[:PAGE], offset)  # a short write first

    monkeypatch.setattr(os, "pwrite", pwrite_then_fail)
    with pytest.raises(OSError) as raised:
        write_file(path, payload(3 * PAGE + 5, aligned=True), direct=direct, staging=staging)
    assert raised.value.errno == errno.ENOSPC
    assert calls == [0, PAGE]  # the short write was resumed where it stopped
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == (["c"] if existing else [])
    if existing:
        assert path.read_bytes() == old
    assert staging.available == 2


def first_pwrite_cut_short(monkeypatch, written: int, reported: int) -> list[int]:
    """``os.pwrite`` whose first call writes ``written`` bytes and reports ``reported``
    (a device that stopped inside the request); the offset of every call."""
    real_pwrite = os.pwrite
    offsets: list[int] = []

    def pwrite(fd, data, offset):
        offsets.append(offset)
        if len(offsets) > 1:
            return real_pwrite(fd, data, offset)
        if written:
            real_pwrite(fd, data[:written], offset)
        return reported

    monkeypatch.setattr(os, "pwrite", pwrite)
    return offsets


def test_short_direct_write_resumes_from_a_page_boundary(tmp_path, monkeypatch):
    # As if the device stopped inside the second page.
    offsets = first_pwrite_cut_short(monkeypatch, written=2 * PAGE, reported=PAGE + 100)
    data = payload(3 * PAGE, aligned=True)
    write_file(tmp_path / "c", data, direct=True, staging=None)
    assert offsets == [0, PAGE]  # not PAGE + 100: O_DIRECT needs aligned offsets
    assert (tmp_path / "c").read_bytes() == bits(data)


def test_a_direct_write_cut_short_inside_its_first_page_is_written_again(tmp_path, monkeypatch):
    # A short O_DIRECT write can end on a logical-block (512 B) boundary inside a page:
    # bytes were written, so it is progress, though rounding down to a page makes it 0;
    # that page is written again (it used to fail with "no progress", EIO).
    offsets = first_pwrite_cut_short(monkeypatch, written=0, reported=512)
    data = payload(3 * PAGE, aligned=True)
    write_file(tmp_path / "c", data, direct=True, staging=None)
    assert offsets == [0, 0]
    assert (tmp_path / "c").read_bytes() == bits(data)


def test_interrupted_write_removes_partial(tmp_path, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "pwrite", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_file(tmp_path / "c", payload(PAGE, aligned=True), direct=True, staging=None)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------- corrupt files


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("on_disk", [PAGE + 4, PAGE + 6, 0, 3 * PAGE], ids=str)
def test_wrong_size_file_is_corrupt(tmp_path, direct, on_disk):
    path = tmp_path / "c.0.0"
    path.write_bytes(b"x" * on_disk)
    with pytest.raises(StoreCorruptError) as raised:
        read_file(path, aligned_empty(PAGE + 5), direct=direct)
    message = str(raised.value)
    assert str(path) in message and str(on_disk) in message and str(PAGE + 5) in message
    with pytest.raises(StoreCorruptError, match=str(on_disk)):
        map_file(path, PAGE + 5)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_missing_file_is_corrupt(tmp_path, direct):
    path = tmp_path / "c.0"
    with pytest.raises(StoreCorruptError, match=re.escape(f"chunk file {path} is missing")):
        read_file(path, aligned_empty(10), direct=direct)
    with pytest.raises(StoreCorruptError, match="is missing"):
        map_file(path, 10)


def test_direct_read_into_unaligned_tensor_is_refused(tmp_path):
    path = tmp_path / "c"
    write_file(path, payload(PAGE + 100, aligned=True), direct=False, staging=None)
    out = aligned_empty(PAGE + 101)[1:]
    with pytest.raises(ValueError, match="aligned"):
        read_file(path, out, direct=True)
    read_file(path, out, direct=False)  # buffered reads take any tensor
    assert bits(out) == path.read_bytes()


@pytest.mark.parametrize("checksum", [False, True])
def test_a_direct_read_of_less_than_a_page_takes_any_tensor(tmp_path, checksum):
    # All of it is the last partial page, read into a page of its own and copied.
    path = tmp_path / "c"
    data = payload(100, aligned=True)
    trailer = chunk_reads.crc32c(data) if checksum else b""
    write_file(path, data, direct=True, staging=None, trailer=trailer)
    out = aligned_empty(101)[1:]
    read_file(path, out, direct=True, checksum=checksum)
    assert bits(out) == bits(data)


def test_file_shrinking_during_a_read_is_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "c"
    write_file(path, payload(3 * PAGE, aligned=True), direct=False, staging=None)
    monkeypatch.setattr(os, "preadv", lambda fd, buffers, offset: 0 if offset else PAGE)
    for direct in (True, False):
        with pytest.raises(StoreCorruptError, match=re.escape(f"{path} ended after {PAGE} bytes")):
            read_file(path, aligned_empty(3 * PAGE), direct=direct)


def test_direct_read_stopping_inside_a_page_is_corrupt(tmp_path, monkeypatch):
    path = tmp_path / "c"
    write_file(path, payload(3 * PAGE, aligned=True), direct=False, staging=None)
    real_preadv = os.preadv
    calls = []

    def short_first(fd, buffers, offset):
        calls.append(offset)
        return PAGE + 100 if len(calls) == 1 else real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", short_first)
    with pytest.raises(StoreCorruptError, match=f"ended after {PAGE + 100} bytes"):
        read_file(path, aligned_empty(3 * PAGE), direct=True)
    assert calls == [0]


# --------------------------------------------------------- staging buffers


def test_staging_buffers_are_aligned_rounded_and_reused():
    with StagingBuffers(3, 5000) as staging:
        assert staging.size == 2 * PAGE
        seen = []
        with staging.acquire() as a, staging.acquire() as b, staging.acquire() as c:
            for buffer in (a, b, c):
                assert buffer.shape == (2 * PAGE,) and buffer.data_ptr() % PAGE == 0
                assert torch.all(buffer == 0)  # written (touched) once at creation
            seen = {a.data_ptr(), b.data_ptr(), c.data_ptr()}
            assert len(seen) == 3
            a[-1] = 1  # buffers do not overlap
            assert b[0] == 0 and c[0] == 0
        assert staging.available == 3
        for _ in range(5):
            with staging.acquire() as again:
                assert again.data_ptr() in seen


class SpyCondition(threading.Condition):
    """A Condition that signals each time a thread is about to wait on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout=None):
        self.waiting.set()  # called with the lock held: set just before it is released
        return super().wait(timeout)


def spied(staging: StagingBuffers) -> SpyCondition:
    staging._condition = spy = SpyCondition()
    return spy


def test_staging_acquire_blocks_until_a_buffer_is_released():
    staging = StagingBuffers(1, PAGE)
    spy = spied(staging)
    acquired = threading.Event()
    got = []

    def second_user():
        with staging.acquire() as buffer:
            got.append(buffer.data_ptr())
            acquired.set()

    with staging.acquire() as first:
        assert not spy.waiting.is_set()  # a free buffer is handed out without waiting
        worker = threading.Thread(target=second_user)
        worker.start()
        assert spy.waiting.wait(5)  # the worker found none free and is waiting
        assert not acquired.is_set() and staging.available == 0
    assert acquired.wait(5)  # released: the worker woke and got the same buffer
    worker.join(5)
    assert got == [first.data_ptr()]
    staging.close()


def test_staging_close_wakes_waiters_and_refuses_new_users():
    staging = StagingBuffers(1, PAGE)
    spy = spied(staging)
    failures = []

    def waiter():
        try:
            with staging.acquire():
                pass
        except RuntimeError as error:
            failures.append(str(error))

    with staging.acquire():
        worker = threading.Thread(target=waiter)
        worker.start()
        assert spy.waiting.wait(5)
        staging.close()
        worker.join(5)
        assert not worker.is_alive()
    assert failures == ["StagingBuffers used after close()"]
    with pytest.raises(RuntimeError, match="after close"):
        with staging.acquire():
            pass
    assert staging.available == 0  # the buffer in use was not put back after close


def test_staging_buffers_shared_by_many_threads(tmp_path):
    staging = StagingBuffers(2, PAGE)
    barrier = threading.Barrier(4)
    errors = []

    def user(index):
        try:
            barrier.wait(5)
            for round_ in range(20):
                data = payload(PAGE + index + 1, aligned=False, seed=index * 100 + round_)
                path = tmp_path / f"c{index}"
                write_file(path, data, direct=True, staging=staging)
                out = aligned_empty(data.numel())
                read_file(path, out, direct=True)
                assert bits(out) == bits(data)
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert staging.available == 2
    staging.close()


def test_staging_rejects_empty_sets():
    with pytest.raises(ValueError):
        StagingBuffers(0, PAGE)
    with pytest.raises(ValueError):
        StagingBuffers(1, 0)


# ------------------------------------------------------------------- mmap


@pytest.mark.parametrize("nbytes", [0, 1, 4097, (1 << 20) + 3])
def test_map_file_round_trip(tmp_path, nbytes):
    data = payload(nbytes, aligned=False, seed=5)
    path = tmp_path / "c"
    write_file(path, data, direct=True, staging=None)
    mapped = map_file(path, nbytes)
    assert mapped.dtype == torch.uint8 and mapped.shape == (nbytes,)
    assert bits(mapped) == bits(data)


def test_map_file_survives_unlink_and_replace_and_never_writes_back(tmp_path):
    path = tmp_path / "c"
    first = payload(PAGE + 3, aligned=True, seed=1)
    write_file(path, first, direct=True, staging=None)
    mapped = map_file(path, first.numel())
    mapped[0] ^= 0xFF  # private copy-on-write: the file keeps its bytes
    assert path.read_bytes() == bits(first)
    mapped[0] ^= 0xFF
    write_file(path, payload(PAGE + 3, aligned=True, seed=2), direct=True, staging=None)
    assert bits(mapped) == bits(first)  # still the old inode after a rename over it
    path.unlink()
    assert bits(mapped) == bits(first)
    assert bits(mapped.clone()) == bits(first)


def test_module_starts_no_threads_and_does_not_import_zarr():
    tree = ast.parse(Path(chunkio.__file__).read_text())
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "os" in imported  # the walk sees imports at all
    assert "threading" not in imported  # the staging buffers' Condition lives in buffers.py
    assert not {name for name in imported if name and name.split(".")[0] == "zarr"}
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert "O_DIRECT" in names  # and sees names
    assert not names & {"Thread", "ThreadPoolExecutor", "Lock", "RLock", "start_new_thread"}


def _smaps_entry(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds ``address``."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                start, end = (int(part, 16) for part in head.split("-"))
                inside = start <= address < end
            elif inside:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
    return fields


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux smaps")
def test_large_buffers_are_huge_page_aligned_and_advised():
    buffer = buffers.aligned_empty(4 * buffers.HUGE_PAGE + 123)
    assert buffer.data_ptr() % buffers.HUGE_PAGE == 0
    fields = _smaps_entry(buffer.data_ptr())
    flags = fields.get("VmFlags", "").split()
    assert "hg" in flags, flags  # MADV_HUGEPAGE
    assert "sh" not in flags, flags  # private: shared anonymous memory is shmem, no THP
    small = buffers.aligned_empty(buffers.HUGE_PAGE - 1)
    assert small.data_ptr() % buffers.PAGE == 0


TURN = chunk_reads.TURN_BYTES  # from this size a direct read waits for its device's turn
CHECKED_SIZES = [0, 1, 4094, 4096, 2 * 4096 - 2, 3 * 4096 + 5, TURN + 4096 + 7, TURN]


def _checksummed_file(path, nbytes: int, direct: bool) -> torch.Tensor:
    data = buffers.aligned_empty(nbytes)
    data.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
    trailer = chunk_reads.crc32c(data)
    chunkio.write_file(path, data, direct=direct, staging=None, trailer=trailer)
    return data


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("nbytes", CHECKED_SIZES)
def test_a_checksum_is_written_after_the_data_and_checked_on_read(tmp_path, direct, nbytes):
    path = tmp_path / "chunk"
    data = _checksummed_file(path, nbytes, direct)
    assert path.stat().st_size == nbytes + 4
    out = buffers.aligned_empty(nbytes)
    chunk_reads.read_file(path, out, direct=direct, checksum=True)
    assert torch.equal(out, data)
    with pytest.raises(StoreCorruptError, match=f"holds {nbytes + 4} bytes, expected {nbytes}"):
        chunk_reads.read_file(path, out, direct=direct)  # read as if it had no checksum


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    "where", ["first page", "a middle page", "last whole page", "partial page", "checksum"]
)
def test_one_changed_byte_anywhere_fails_the_check(tmp_path, direct, where):
    """Wherever the byte is (the whole pages read in the device's turn, the partial
    page and the checksum read with them into a page of their own)."""
    nbytes = TURN + 4096 + 7
    path = tmp_path / "chunk"
    _checksummed_file(path, nbytes, direct)
    position = {
        "first page": 5,
        "a middle page": TURN // 2 + 12345,
        "last whole page": TURN + 100,
        "partial page": nbytes - 1,
        "checksum": nbytes + 2,
    }[where]
    with open(path, "r+b") as handle:
        handle.seek(position)
        byte = handle.read(1)[0]
        handle.seek(position)
        handle.write(bytes([byte ^ 0x40]))
    with pytest.raises(StoreCorruptError, match="fails its CRC32C check"):
        chunk_reads.read_file(path, buffers.aligned_empty(nbytes), direct=direct, checksum=True)


# ------------------------------------------- queued (native AIO) staged writes


def _aio_works() -> bool:
    with aio.context() as ctx:  # a seccomp filter may refuse io_setup itself
        return ctx is not None


needs_aio = pytest.mark.skipif(not _aio_works(), reason="no native AIO here")


class QueueSpy:
    """Records what the AIO contexts did: the most writes queued at once, and each
    submitted write's (offset, bytes)."""

    def __init__(self, monkeypatch) -> None:
        self.most_in_flight = 0
        self.submitted: list[tuple[int, int]] = []
        real_submit = aio.Context.submit_write
        spy = self

        def submit_write(ctx, fd, address, nbytes, offset, tag):
            real_submit(ctx, fd, address, nbytes, offset, tag)
            spy.submitted.append((offset, nbytes))
            spy.most_in_flight = max(spy.most_in_flight, ctx.in_flight)

        monkeypatch.setattr(aio.Context, "submit_write", submit_write)


@needs_aio
@pytest.mark.parametrize("nbytes", [3 * STAGING_SIZE + 123, 8 * PAGE, (3 << 20) + 7])
def test_staged_pieces_are_queued_while_the_next_is_copied(tmp_path, staging, monkeypatch, nbytes):
    spy = QueueSpy(monkeypatch)
    writes = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        writes.append((offset, len(data), bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    data = payload(nbytes, aligned=False, seed=nbytes)
    write_file(tmp_path / "c", data, direct=True, staging=staging)
    whole = nbytes - nbytes % PAGE
    piece = STAGING_SIZE // chunkio.QUEUED_PIECES
    # Every whole page went through the queue, a piece of the staging buffer at a time,
    # with several pieces in flight at once; only the partial last page was a pwrite.
    assert sorted(spy.submitted) == [(o, min(piece, whole - o)) for o in range(0, whole, piece)]
    assert spy.most_in_flight == chunkio.QUEUED_PIECES
    assert writes == ([(whole, nbytes - whole, False)] if nbytes > whole else [])
    assert (tmp_path / "c").read_bytes() == bits(data)
    assert leftovers(tmp_path) == [] and staging.available == 2


def first_completion_reports(monkeypatch, result: int) -> list[tuple[aio.Context, int]]:
    """The first queued write to complete reports ``result`` (bytes, or -errno) instead
    of what it did; returns the list its context and tag go into."""
    real_wait = aio.Context.wait
    changed: list[tuple[aio.Context, int]] = []

    def wait(ctx, least=1):
        done = real_wait(ctx, least)
        if not changed and done:
            tag, _ = done[0]
            changed.append((ctx, tag))
            done[0] = (tag, result)
        return done

    monkeypatch.setattr(aio.Context, "wait", wait)
    return changed


@needs_aio
def test_a_failed_queued_write_fails_the_file_after_the_rest_are_done(
    tmp_path, staging, monkeypatch
):
    seen = first_completion_reports(monkeypatch, -errno.ENOSPC)
    with pytest.raises(OSError) as raised:
        write_file(tmp_path / "c", payload(9 * PAGE, aligned=False), direct=True, staging=staging)
    assert raised.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []  # no partial file, no chunk
    assert staging.available == 2
    ((ctx, _),) = seen
    assert ctx.in_flight == 0  # waited for before the staging buffer went back
    assert ctx in aio._idle  # and the context was lent out again, empty


@needs_aio
def test_a_short_queued_write_resumes_inside_its_piece(tmp_path, monkeypatch):
    real_wait = aio.Context.wait
    short = []

    def short_wait(ctx, least=1):
        done = real_wait(ctx, least)
        if not short and done:
            tag, result = done[0]
            short.append(result)
            done[0] = (tag, PAGE + 100)
        return done

    rewrites = []
    real_pwrite = os.pwrite

    def recording_pwrite(fd, data, offset):
        rewrites.append((offset % (4 * PAGE), len(data)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(aio.Context, "wait", short_wait)
    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    data = payload(64 * PAGE, aligned=False, seed=6)
    with StagingBuffers(1, 16 * PAGE) as staging:  # pieces of 4 pages
        write_file(tmp_path / "c", data, direct=True, staging=staging)
    assert short == [4 * PAGE]
    # The rest of the short piece was written again from the page the device stopped in.
    assert rewrites == [(PAGE, 3 * PAGE)]
    assert (tmp_path / "c").read_bytes() == bits(data)


def test_without_native_aio_staged_pieces_are_written_one_by_one(tmp_path, staging, monkeypatch):
    monkeypatch.setattr(aio, "available", lambda: False)
    made = []
    monkeypatch.setattr(aio, "Context", lambda: made.append(1))
    data = payload(3 * STAGING_SIZE + 123, aligned=False, seed=8)
    write_file(tmp_path / "c", data, direct=True, staging=staging)
    assert made == []
    assert (tmp_path / "c").read_bytes() == bits(data)


# ------------------------------------------------------------- alongside


@pytest.mark.parametrize(
    "direct, aligned, nbytes",
    [
        (True, False, 3 * STAGING_SIZE + 123),  # staged, queued where AIO is
        (True, False, PAGE + 5),  # staged, one piece
        (True, True, 3 * PAGE + 5),  # zero copy
        (True, False, 100),  # no whole page
        (False, False, 3 * PAGE + 5),  # buffered
    ],
)
def test_alongside_runs_once_before_the_rename(tmp_path, staging, direct, aligned, nbytes):
    path = tmp_path / "c"
    calls = []

    def alongside():
        calls.append((path.exists(), len(leftovers(tmp_path))))

    data = payload(nbytes, aligned=aligned)
    write_file(path, data, direct=direct, staging=staging, alongside=alongside)
    assert calls == [(False, 1)]  # once, while only the partial file existed
    assert path.read_bytes() == bits(data)


@needs_aio
def test_alongside_runs_while_the_last_pieces_are_in_flight(tmp_path, staging, monkeypatch):
    queued = []
    real_wait = aio.Context.wait
    contexts = []

    def remembering_wait(ctx, least=1):
        contexts.append(ctx)
        return real_wait(ctx, least)

    monkeypatch.setattr(aio.Context, "wait", remembering_wait)

    def alongside():
        queued.append(contexts[-1].in_flight if contexts else None)

    write_file(
        tmp_path / "c",
        payload(3 * STAGING_SIZE, aligned=False),
        direct=True,
        staging=staging,
        alongside=alongside,
    )
    assert queued and queued[0] > 0


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "misaligned"])
def test_an_error_alongside_fails_the_write(tmp_path, staging, aligned):
    def alongside():
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_file(
            tmp_path / "c",
            payload(3 * STAGING_SIZE, aligned=aligned),
            direct=True,
            staging=staging,
            alongside=alongside,
        )
    assert list(tmp_path.iterdir()) == []
    assert staging.available == 2


# -------------------------------------------------- write_partial, publish


@pytest.mark.parametrize("durable", [True, False])
def test_write_partial_then_publish(tmp_path, monkeypatch, durable):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "zarr.json"
    partial = chunkio.write_partial(path, b'{"a": 1}', durable=durable)
    assert partial.parent == tmp_path and partial.name.startswith("zarr.json.")
    assert partial.name.endswith(".partial") and partial.read_bytes() == b'{"a": 1}'
    assert not path.exists()
    chunkio.publish(partial, path, durable=durable)
    assert path.read_bytes() == b'{"a": 1}' and leftovers(tmp_path) == []
    assert len(synced) == (2 if durable else 0)  # the file, then its directory


def test_failed_write_partial_and_publish_leave_nothing(tmp_path, monkeypatch):
    def failing(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OSError):
        chunkio.write_partial(tmp_path / "zarr.json", b"{}")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    partial = chunkio.write_partial(tmp_path / "zarr.json", b"{}")
    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError):
        chunkio.publish(partial, tmp_path / "zarr.json")
    assert list(tmp_path.iterdir()) == []


@needs_aio
def test_a_queued_write_allocates_the_whole_file_first(tmp_path, staging, monkeypatch):
    calls = []
    real = chunkio._fallocate

    def spying(fd, mode, offset, length):
        calls.append((mode, offset, length, os.fstat(fd).st_size))
        return real(fd, mode, offset, length)

    monkeypatch.setattr(chunkio, "_fallocate", spying)
    data = payload(3 * STAGING_SIZE + 123, aligned=False, seed=11)
    write_file(tmp_path / "c", data, direct=True, staging=staging)
    whole = data.numel() - data.numel() % PAGE
    assert calls == [(0, 0, whole, 0)]  # once, on the empty file, before any piece
    assert (tmp_path / "c").read_bytes() == bits(data)


@needs_aio
@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSPC])
def test_allocation_refused_or_out_of_space(tmp_path, staging, monkeypatch, code):
    import ctypes

    def refusing(fd, mode, offset, length):
        ctypes.set_errno(code)
        return -1

    monkeypatch.setattr(chunkio, "_fallocate", refusing)
    data = payload(3 * STAGING_SIZE + 123, aligned=False, seed=12)
    if code == errno.EOPNOTSUPP:  # a filesystem without fallocate: a sparse file instead
        write_file(tmp_path / "c", data, direct=True, staging=staging)
        assert (tmp_path / "c").read_bytes() == bits(data)
    else:
        with pytest.raises(OSError) as raised:
            write_file(tmp_path / "c", data, direct=True, staging=staging)
        assert raised.value.errno == errno.ENOSPC
        assert list(tmp_path.iterdir()) == []
    assert staging.available == 2


@needs_aio
@pytest.mark.parametrize("nbytes", [3 * chunkio.IN_PLACE_PIECE + 5 * PAGE + 123, 40 << 20])
def test_an_aligned_source_is_queued_in_place_and_its_checksum_made_meanwhile(
    tmp_path, monkeypatch, nbytes
):
    spy = QueueSpy(monkeypatch)
    data = payload(nbytes, aligned=True, seed=nbytes)
    in_flight_at_checksum = []

    def checksum() -> bytes:
        in_flight_at_checksum.append(spy.most_in_flight)
        return chunk_reads.crc32c(data)

    write_file(tmp_path / "c", data, direct=True, staging=None, trailer=checksum)
    whole = nbytes - nbytes % PAGE
    piece = chunkio.IN_PLACE_PIECE
    # Straight from the source's memory, every whole page through the queue, a piece at
    # a time; the checksum asked for once, with writes already queued.
    assert sorted(spy.submitted) == [(o, min(piece, whole - o)) for o in range(0, whole, piece)]
    assert in_flight_at_checksum == [min(aio.DEPTH, -(-whole // piece))]
    assert (tmp_path / "c").read_bytes() == bits(data) + chunk_reads.crc32c(data)
    assert leftovers(tmp_path) == []


@needs_aio
@pytest.mark.parametrize("result", ["short", "failed"])
def test_a_short_or_failed_in_place_write_is_finished_or_fails_the_file(
    tmp_path, monkeypatch, result
):
    changed = first_completion_reports(
        monkeypatch, 3 * PAGE + 17 if result == "short" else -errno.EIO
    )
    data = payload(3 * chunkio.IN_PLACE_PIECE, aligned=True, seed=5)
    if result == "failed":
        with pytest.raises(OSError) as raised:
            write_file(tmp_path / "c", data, direct=True, staging=None)
        assert raised.value.errno == errno.EIO
        assert list(tmp_path.iterdir()) == []
        return
    rewritten = []
    real_pwrite = os.pwrite

    def pwrite(fd, view, offset):
        rewritten.append((offset, len(view)))
        return real_pwrite(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    write_file(tmp_path / "c", data, direct=True, staging=None)
    # The rest of the short piece written again from its last whole page.
    ((_, tag),) = changed
    assert rewritten == [(tag + 3 * PAGE, chunkio.IN_PLACE_PIECE - 3 * PAGE)]
    assert (tmp_path / "c").read_bytes() == bits(data)
