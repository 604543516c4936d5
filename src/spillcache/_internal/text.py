"""Numbers and tables as the ``spillcache`` command prints them for people."""

from __future__ import annotations

__all__ = ["aligned", "format_bytes"]


def format_bytes(nbytes: int) -> str:
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
