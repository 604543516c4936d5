"""A short measurement of how fast a directory's disk writes and reads chunk files, the
way the cache does (``chunkio``: O_DIRECT where the filesystem takes it, from the
cache's own staging buffers, on ``io_threads`` threads at once), for ``spillcache plan``.

It writes files of ``FILE_BYTES`` into a hidden directory under the path until half its
time is spent (or ``MAX_BYTES`` are written), reads them back for the rest, and removes
them whatever happens. A few seconds of one device are a rough figure: a busy or
throttled disk, or one with a large write cache, runs at other speeds over hours.
"""

from __future__ import annotations

import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..io import buffers, chunk_reads, chunkio

__all__ = ["DiskSpeed", "probe"]

FILE_BYTES = 8 << 20  # the size of a large cached tensor's chunk
MAX_BYTES = 2 << 30  # enough for a steady figure on an NVMe drive


@dataclass(frozen=True)
class DiskSpeed:
    path: str
    write_bytes_per_second: float
    read_bytes_per_second: float
    direct_io: bool
    seconds: float


def probe(directory: str | Path, *, seconds: float, threads: int) -> DiskSpeed:
    """Write, then read back, chunk files in ``directory`` for about ``seconds`` in all."""
    directory = Path(directory)
    direct = chunkio.direct_io_supported(directory)
    scratch = directory / f".spillcache-probe-{secrets.token_hex(4)}"
    scratch.mkdir()
    start = time.perf_counter()
    # The cache's own staging buffers: page-aligned, contiguous, touched once in order.
    staging = buffers.StagingBuffers(threads, FILE_BYTES)
    try:
        deadline = start + seconds / 2

        def write(slot: int) -> int:
            written = 0
            with staging.acquire() as buffer:
                while time.perf_counter() < deadline and written * threads < MAX_BYTES:
                    name = scratch / f"{slot}-{written // FILE_BYTES}"
                    chunkio.write_file(name, buffer, direct=direct, staging=None)
                    written += FILE_BYTES
            return written

        write_bps, names = _timed(threads, write), sorted(scratch.iterdir())
        deadline = time.perf_counter() + seconds / 2

        def read(slot: int) -> int:
            done = 0
            with staging.acquire() as buffer:
                for name in names[slot::threads]:
                    if time.perf_counter() >= deadline:
                        break
                    chunk_reads.read_file(name, buffer, direct=direct)
                    done += FILE_BYTES
            return done

        read_bps = _timed(threads, read)
    finally:
        staging.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return DiskSpeed(str(directory), write_bps, read_bps, direct, time.perf_counter() - start)


def _timed(threads: int, job) -> float:
    """Bytes per second of ``job(slot)`` run on ``threads`` threads at once."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        moved = sum(pool.map(job, range(threads)))
    return moved / max(time.perf_counter() - start, 1e-9)
