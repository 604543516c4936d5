"""Shared benchmark helpers: the raw-disk limit, cold caches, timing, reporting.

Every benchmark reports its figures as a ratio against a limit measured in the same
run on the same machine (raw O_DIRECT bandwidth, or an all-in-RAM baseline).
"""

from __future__ import annotations

import json
import mmap
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ALIGN = 4096
GB = 1e9


def drop_page_cache() -> bool:
    """Write dirty pages and drop the page cache (root only); False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned memory (anonymous mmap), as O_DIRECT requires."""
    return mmap.mmap(-1, (nbytes + ALIGN - 1) // ALIGN * ALIGN)


def raw_direct_write(directory: Path, file_bytes: int, count: int) -> float:
    """Seconds to write ``count`` files of ``file_bytes`` with O_DIRECT, then sync."""
    directory.mkdir(parents=True, exist_ok=True)
    buffer = aligned_buffer(file_bytes)
    buffer.write(os.urandom(min(file_bytes, 1 << 20)) * (file_bytes // min(file_bytes, 1 << 20)))
    view = memoryview(buffer)[:file_bytes]
    start = time.perf_counter()
    for index in range(count):
        fd = os.open(
            directory / f"raw{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600
        )
        try:
            written = 0
            while written < file_bytes:
                written += os.write(fd, view[written:])
        finally:
            os.close(fd)
    os.sync()
    seconds = time.perf_counter() - start
    view.release()
    buffer.close()
    return seconds


def raw_direct_read(directory: Path, file_bytes: int, count: int) -> float:
    """Seconds to read the files written by ``raw_direct_write`` with O_DIRECT."""
    buffer = aligned_buffer(file_bytes)
    view = memoryview(buffer)[:file_bytes]
    start = time.perf_counter()
    for index in range(count):
        fd = os.open(directory / f"raw{index}", os.O_RDONLY | os.O_DIRECT)
        try:
            got = 0
            while got < file_bytes:
                got += os.readv(fd, [view[got:]])
        finally:
            os.close(fd)
    seconds = time.perf_counter() - start
    view.release()
    buffer.close()
    return seconds


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
    }


def report(name: str, rows: list[dict], extra: dict, out_dir: Path | None = None) -> None:
    """Print an aligned table and write the same figures as JSON."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(_cell(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row[c]).ljust(widths[c]) for c in columns))
    out_dir = out_dir or Path(__file__).parent / "results"
    out_dir.mkdir(exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(
        json.dumps({"rows": rows, **extra, "machine": machine(), "argv": sys.argv}, indent=1)
    )
    print(f"\n(figures written to {path})")


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)
