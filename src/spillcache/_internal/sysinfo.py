"""Facts about the host that budgets and paths depend on (Linux /proc, with fallbacks)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["available_ram", "directory_problem", "filesystem_type", "nearest_existing", "ram_limit"]

RAM_BACKED = ("tmpfs", "ramfs")
# A cgroup v1 memory limit at or above this is "no limit" (the kernel writes the
# largest page-aligned long there).
_NO_CGROUP_LIMIT = 2**60


def _meminfo(field: str, pages: str) -> int:
    """Bytes of /proc/meminfo's ``field`` ("MemTotal"); where Linux's /proc is not
    there, ``pages`` (a sysconf name) times the page size."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")


def available_ram(
    cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup"
) -> int:
    """Bytes of RAM the system could give this process now: MemAvailable on Linux, or
    what its cgroup still allows where that is less (a container, a Slurm job's --mem:
    the machine's free RAM is not this process's to take). Parameters for tests."""
    free = _meminfo("MemAvailable", "SC_AVPHYS_PAGES")
    room = _cgroup_memory_room(Path(cgroup_root), Path(self_cgroup))
    return free if room is None else min(free, room)


def _mem_total() -> int:
    return _meminfo("MemTotal", "SC_PHYS_PAGES")


def ram_limit(cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup"):
    """The most memory this process can ever have, and what that figure is: the
    machine's RAM (MemTotal), or its cgroup's memory limit where that is lower (a
    container, a Slurm job): ``(bytes, "this machine's RAM")``. A memory budget beyond
    it can never be held; the parameters are for tests."""
    total = _mem_total()
    limit = _cgroup_memory_limit(Path(cgroup_root), Path(self_cgroup))
    if limit is not None and limit < total:
        return limit, "this process's cgroup memory limit"
    return total, "this machine's RAM"


# Per cgroup version: a cgroup's limit file, its usage file, and memory.stat's count of
# page cache not recently used, which the kernel reclaims before it kills (as
# MemAvailable counts it): usage less that is what the cgroup's processes hold.
_V2_FILES = ("memory.max", "memory.current", "inactive_file")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_memory_limit(root: Path, self_cgroup: Path) -> int | None:
    """The lowest memory limit on the way from this process's cgroup up to the root
    (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``), None where none is set."""
    found = [limit for limit, _, _ in _cgroup_limits(root, self_cgroup)]
    return min(found) if found else None


def _cgroup_memory_room(root: Path, self_cgroup: Path) -> int | None:
    """The least any cgroup with a limit, from this process's up to the root, still
    allows: its limit less what its processes hold (v2 ``memory.current``, v1
    ``memory.usage_in_bytes``, less reclaimable page cache); None where none is set."""
    rooms = []
    for limit, directory, (_, usage_file, cache_name) in _cgroup_limits(root, self_cgroup):
        usage = _read_limit(directory / usage_file)  # a number of bytes, as a limit is
        if usage is not None:
            rooms.append(max(limit - usage + _memory_stat(directory, cache_name), 0))
    return min(rooms) if rooms else None


def _cgroup_limits(root: Path, self_cgroup: Path) -> list[tuple[int, Path, tuple[str, ...]]]:
    """(limit, directory, its files) of each cgroup with a memory limit, from this
    process's up to the root of each hierarchy."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return []
    places = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # v2: one unified hierarchy
            places.append((root, parts[2], _V2_FILES))
        elif "memory" in parts[1].split(","):  # v1: the memory controller's hierarchy
            places.append((root / "memory", parts[2], _V1_FILES))
    limits = []
    for mount, inside, files in places:
        directory = mount / inside.lstrip("/")
        while True:
            limit = _read_limit(directory / files[0])
            if limit is not None:
                limits.append((limit, directory, files))
            if directory == mount or mount not in directory.parents:
                break
            directory = directory.parent
    return limits


def _memory_stat(directory: Path, name: str) -> int:
    """Bytes of ``name`` in the cgroup's memory.stat (0 where not there)."""
    try:
        for line in (directory / "memory.stat").read_text().splitlines():
            key, _, number = line.partition(" ")
            if key == name and number.strip().isdigit():
                return int(number)
    except OSError:
        pass
    return 0


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:  # no such controller file here (or not readable): no limit known
        return None
    if not text.isdigit() or int(text) >= _NO_CGROUP_LIMIT:  # "max", or v1's no limit
        return None
    return int(text)


def nearest_existing(path: str | os.PathLike[str]) -> Path:
    """``path`` (absolute) if it exists, else its nearest existing parent: where a
    directory made on first use (a store's parent) will live, and so whose filesystem
    it will be on."""
    found = Path(path).absolute()
    while not found.exists() and found != found.parent:
        found = found.parent
    return found


def directory_problem(directory: str | os.PathLike[str]) -> str | None:
    """Why this process cannot make files in ``directory``: "missing" (no directory
    there), "read-only" (it may not write or enter it), or None. Each caller words the
    problem for the option it checks."""
    path = Path(directory)
    if not path.is_dir():
        return "missing"
    if not os.access(path, os.W_OK | os.X_OK):
        return "read-only"
    return None


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
