"""What the caller is told when the disk fails, and what to change.

Three kinds of trouble, each one error of spillcache's tree naming the value and the
path involved:

- a value that must spill finds no disk that can take it (no room, or a disk whose
  writes failed): ``refusal``, raised by ``update``/``append`` before they store
  anything;
- background writes that failed: each is kept as a ``WriteFailure`` and all of those
  since the last report are raised together, once, by the cache's next call
  (``write_report``);
- a read or write of one array that failed: ``io_error`` (in the store) and
  ``naming`` (by the cache, adding the batch and key).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Collection
from pathlib import Path
from typing import NamedTuple, Protocol

from spillcache.errors import DiskFullError, StoreCorruptError, StoreError

__all__ = ["WriteFailure", "io_error", "naming", "refusal", "write_report"]

_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


class Disks(Protocol):
    """What ``refusal`` reads of the disk tier (``engine.tiers.DiskTier``)."""

    disks: int
    paths: list[str]

    def why_full(self, index: int, nbytes: int) -> str: ...


class WriteFailure(NamedTuple):
    """One background write that failed; its value went back to the host tier."""

    label: str  # "batch 3, key 'h'"
    nbytes: int
    store: str  # the store it was written into
    error: BaseException


def errno_of(error: BaseException | None) -> int | None:
    return getattr(error, "errno", None)


def describe(error: BaseException) -> str:
    """``ENOSPC (No space left on device)``-style text for an error."""
    code = errno_of(error)
    if code is None:
        return f"{type(error).__name__}: {error}"
    reason = getattr(error, "reason", None) or os.strerror(code)
    return f"{errno.errorcode.get(code, code)} ({reason})"


def _fixes(codes: list[int | None], directories: list[str]) -> str:
    """What to change, once per kind of failure (with the directories it concerns)."""
    where: dict[int | None, list[str]] = {}
    for code, directory in zip(codes, directories, strict=True):
        where.setdefault(code, []).append(directory)
    return "; ".join(_fix(code, ", ".join(dict.fromkeys(dirs))) for code, dirs in where.items())


def _fix(code: int | None, directory: str) -> str:
    if code == errno.ENOSPC:
        return (
            f"free space under {directory}, set disk_path to a directory with room (or add "
            "one to it), raise host_bytes so that fewer values spill, or set disk_bytes "
            "below the free space"
        )
    if code == errno.ENOENT:
        return (
            "if the store directory was removed while the cache was open, close the cache "
            "(its values in RAM stay readable until then)"
        )
    if code in _NOT_WRITABLE:
        return f"make {directory} writable, or set disk_path to a writable directory"
    return f"check the disk under {directory} (dmesg), or set disk_path to another disk"


def io_error(error: OSError, what: str, store: Path) -> StoreError:
    """The StoreError (DiskFullError for ENOSPC, StoreCorruptError for a damaged chunk)
    for an OSError met while ``what`` (say ``"cannot write tensor 5 (64 bytes) to
    /x/store"``) in the store at ``store``."""
    corrupt = isinstance(error, StoreCorruptError)
    if not store.exists():  # the whole store went, not only this file
        reason = f"the store directory {store} was removed while the cache was open"
        message = f"{what}: {reason}; close the cache (its values in RAM stay readable until then)"
        result = StoreCorruptError(message) if corrupt else StoreError(errno.ENOENT, message)
    elif corrupt:
        return StoreCorruptError(f"{what}: {error}")
    else:
        code, reason = error.errno, error.strerror or str(error)
        message = f"{what}: {reason}; {_fix(code, str(store.parent))}"
        result = DiskFullError(message) if code == errno.ENOSPC else StoreError(code, message)
    result.reason = reason  # the short why, for write_report's list
    return result


def naming(error: StoreError, label: str, note: str = "other entries stay readable") -> StoreError:
    """``error`` again (same class, same errno), its message starting with the entry
    it concerns (``label``) and ending with ``note``."""
    text = error.strerror if error.strerror is not None else str(error)
    message = f"{label}: {text} ({note})"
    if isinstance(error, DiskFullError):
        return DiskFullError(message)
    if error.errno is None:
        return type(error)(message)
    return type(error)(error.errno, message)


def refusal(disk: Disks, broken: dict[int, WriteFailure], nbytes: int, label: str) -> StoreError:
    """Why no disk can take a value of ``nbytes`` (``label``): DiskFullError where a
    disk lacks room, else a StoreError about the disk(s) whose writes failed."""
    lines, codes = [], []
    for index in range(disk.disks):
        failure = broken.get(index)
        if failure is not None:
            lines.append(
                f"{disk.paths[index]}: writing there failed earlier "
                f"({failure.label} into {failure.store}: {describe(failure.error)}), "
                "so this cache writes nothing more there"
            )
            codes.append(errno_of(failure.error))
        else:
            lines.append(disk.why_full(index, nbytes))
            codes.append(errno.ENOSPC)
    code = errno.ENOSPC if errno.ENOSPC in codes else codes[0]
    message = (
        f"{label} ({nbytes} bytes) must go to disk, but no disk can take it: "
        f"{'; '.join(lines)}. Nothing was stored by this call and the cache is as it was. "
        f"To fix: {_fixes(codes, disk.paths)}"
    )
    return DiskFullError(message) if code == errno.ENOSPC else StoreError(code, message)


def write_report(failures: Collection[WriteFailure], directories: list[str]) -> StoreError:
    """One error for every background write that failed since the last report:
    DiskFullError if any failed for lack of space, else a StoreError. Its
    ``failures`` attribute lists them."""
    codes = [errno_of(failure.error) for failure in failures]
    lines = [
        f"  {failure.label} ({failure.nbytes} bytes) into {failure.store}: "
        f"{describe(failure.error)}"
        for failure in failures
    ]
    where = ", ".join(directories)
    message = (
        f"{len(lines)} background disk write(s) failed since the last report; those "
        "values stay readable from RAM, counted against host_bytes:\n"
        + "\n".join(lines)
        + f"\nThis call did nothing: call it again. To fix: {_fixes(codes, [where] * len(codes))}"
    )
    if errno.ENOSPC in codes:
        error: StoreError = DiskFullError(message)
    elif codes[0] is None:  # not an OSError (it says what it is in the list)
        error = StoreError(message)
    else:
        error = StoreError(codes[0], message)
    error.failures = tuple(failures)
    return error
