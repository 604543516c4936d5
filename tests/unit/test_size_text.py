"""Sizes as ``spillcache plan --write`` writes them: with a unit, read back exactly."""

from __future__ import annotations

import pytest

from spillcache._internal.text import format_bytes, rounded_up_size, size_text
from spillcache.config import parse_size

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(GiB, "1GiB"), (11 * GiB + GiB // 2, "11.5GiB"), (11674 * MiB, "11674MiB"),
     (1536, "1.5KiB"), (5 * MiB // 4, "1.25MiB"), (100 * TiB, "100TiB"), (1000, "1000B"),
     (0, "0B"), (1234567 * TiB, "1234567TiB")],
)  # fmt: skip
def test_size_text_is_exact_with_a_unit(nbytes, text):
    assert size_text(nbytes) == text
    assert parse_size("host_bytes", text) == nbytes


@pytest.mark.parametrize("nbytes", [12240656793, 3 * MiB + 1, 999, GiB - 1, 5 * TiB + 7])
def test_rounded_up_sizes_grow_by_under_a_thousandth_and_read_with_a_unit(nbytes):
    rounded = rounded_up_size(nbytes)
    assert nbytes <= rounded < nbytes + max(1, nbytes // 1000)
    text = size_text(rounded)
    assert parse_size("host_bytes", text) == rounded
    assert nbytes < KiB or not text.endswith("0B") and text[-3:] in ("KiB", "MiB", "GiB")


def test_memory_sizes_in_tib_say_what_gib_would_hide():
    assert format_bytes(100 * TiB, tib=True) == "100.0 TiB"
    assert format_bytes(100 * TiB) == "102400.0 GiB"  # tables keep their one unit
    assert format_bytes(3 * GiB, tib=True) == "3.0 GiB"
