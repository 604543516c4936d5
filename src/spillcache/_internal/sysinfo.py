"""Facts about the host that budgets and paths depend on (Linux /proc, with fallbacks)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_ram", "filesystem_type", "nearest_existing"]

RAM_BACKED = ("tmpfs", "ramfs")


def available_ram() -> int:
    """Bytes of RAM the system could give this process now (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute) if it exists, else its nearest existing parent: where a
    directory made on first use (a store's parent) will live, and so whose filesystem
    it will be on."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def filesystem_type(path: str) -> str | None:
    """The type of the filesystem holding ``path`` ("ext4", "tmpfs", ...), if known."""
    path = os.path.realpath(path)
    best, best_type = "", None
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount_point = fields[1].replace("\\040", " ")
                inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
                if inside and len(mount_point) >= len(best):
                    best, best_type = mount_point, fields[2]
    except OSError:
        return None
    return best_type
