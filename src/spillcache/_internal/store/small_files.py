"""Reading a store's small files (its zarr.json files) as data: never through a
symbolic link (which could lead anywhere, /dev/zero included), never a file that is not
a regular one, never more bytes than the format writes there."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

__all__ = ["NotPlainFile", "read_small_file"]


class NotPlainFile(ValueError):
    """A path where a store keeps a small regular file holds something else."""


def read_small_file(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at ``path``; FileNotFoundError if there is none,
    NotPlainFile (saying what is there instead) for a link, a directory or a device, or
    a file of more than ``limit`` bytes; OSError if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise NotPlainFile("is a symbolic link; a store holds none") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotPlainFile("is not a regular file")
        if info.st_size > limit:
            raise NotPlainFile(f"holds {info.st_size} bytes, more than spillcache writes there")
        return handle.read(limit + 1)
