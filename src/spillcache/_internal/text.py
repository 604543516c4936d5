"""Numbers, tables and messages as the ``spillcache`` command prints them for people."""

from __future__ import annotations

import difflib
import errno

from spillcache.errors import SpillCacheError

__all__ = [
    "aligned",
    "did_you_mean",
    "format_bytes",
    "os_error_text",
    "rounded_up_size",
    "size_text",
]


def format_bytes(nbytes: int, *, tib: bool = False) -> str:
    """``nbytes`` for people, one decimal; in TiB from 1 TiB with ``tib`` (memory sizes
    that may be typos: "102400.0 GiB" hides what "100.0 TiB" says)."""
    if tib and nbytes >= 2**40:
        return f"{nbytes / 2**40:.1f} TiB"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def aligned(rows: list[list[str]]) -> str:
    """Rows as aligned columns (the first row: the headings)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """The end of a message about a mistyped ``word``: "; did you mean 'x'?" with the
    closest of ``choices``, or "" where none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


_BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def size_text(nbytes: int) -> str:
    """``nbytes`` as a size string a config file takes back exactly: in the largest
    binary unit that says it with at most two decimals ("11.5GiB", "1035MiB"), else in
    bytes ("1000B")."""
    for unit, scale in _BINARY_UNITS:
        if nbytes >= scale and (nbytes * 100) % scale == 0:
            whole, hundredths = divmod(nbytes * 100 // scale, 100)
            decimals = f".{hundredths:02d}".rstrip("0") if hundredths else ""
            return f"{whole}{decimals}{unit}"
    return f"{nbytes}B"


def rounded_up_size(nbytes: int) -> int:
    """``nbytes`` rounded up to a whole number of the unit below its largest (whole
    MiB from 1 GiB, whole KiB from 1 MiB): written with ``size_text`` it reads as a
    figure a person would write, and grows by less than 0.1 %."""
    for _, scale in _BINARY_UNITS[:-1]:
        if nbytes >= scale:
            step = scale // 1024
            return -(-nbytes // step) * step
    return nbytes


# What to do about an OSError the command did not turn into a message of its own.
_ERRNO_FIXES = {
    errno.EACCES: "run as a user who may write there, or name another path",
    errno.EPERM: "run as a user who may write there, or name another path",
    errno.EROFS: "the filesystem is read-only: name a path on a writable one",
    errno.ENOSPC: "free space there, or name a path on a disk with room",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: a part of it is a file",
    errno.EISDIR: "name a file, not a directory",
}


def os_error_text(error: OSError) -> str:
    """An OSError as one line: what failed, on which path, and what to do; not
    Python's "[Errno 13] Permission denied: 'x'"."""
    if not error.strerror:
        return str(error)
    if isinstance(error, SpillCacheError):  # its message says it all, less "[Errno 28]"
        return error.strerror
    where = f" ({error.filename})" if error.filename else ""
    fix = _ERRNO_FIXES.get(error.errno, "check the path and try again")
    return f"{error.strerror}{where}: {fix}"
