"""The placements and I/O modes the cache tests run in, through the ``make_cache`` fixture.

A test that takes ``make_cache`` (and ``placement``, ``mode`` where it needs their names)
runs in one of two grids:

- **The disk grid** (the default): "ram" once, and every placement that spills in every
  I/O mode of ``MODES``. For tests about values going to disk and back (fetch, update,
  delete, iteration, prefetch, dtypes, structures), where O_DIRECT, buffered or mapped
  reads, eviction, one I/O thread or the checksum can change what comes back. Every
  instance of a spilling placement must read back from a chunk file: at teardown
  ``make_cache`` fails each of its caches that read no bytes from disk
  (``stats()["disk"]["hits"]`` or ``["bytes_read"]`` still 0), so that a mode cannot
  pass without being used. A value fetched right after ``update`` usually comes from the
  write-behind area (RAM, before its write lands); ``cache.flush()`` first makes the
  fetch read the chunk file.
- **Placements only**, for a test marked ``@pytest.mark.placements_only("reason")``:
  each placement once, in the default settings (ids: the placement's name). For tests
  that no I/O mode can change (argument checks, errors, accounting, values kept in RAM);
  the reason says why. Nothing is required of their reads.

An override given to ``make_cache`` may not replace the setting its mode changes: that
instance would be another mode's (or the defaults') twin. ``prefetch_depth`` is no mode:
only ``iter_prefetch`` reads it, so the prefetch tests take their depth as a parameter.
"""

from __future__ import annotations

import pytest

from spill_testing import tier_sizes
from spillcache import CacheConfig, IntermediatesCache
from spillcache.config import parse_size

# All in RAM; host tier tiny (most values spilled, every value through the pool's
# arena: copied into a slot, written from it, read back into one); no arena at all
# (host_bytes = 0: everything spilled, from and into ordinary memory); that with the
# default inline_bytes (small tensors stay with their entry).
PLACEMENTS = {
    "ram": dict(host_bytes="1GiB", disk_path=None, inline_bytes=0),
    "tiny": dict(
        host_tier=4096, write_behind_bytes="2MiB", read_buffer_bytes="2MiB", inline_bytes=0
    ),
    "zero": dict(host_bytes=0, inline_bytes=0),
    "inline": dict(host_bytes=0),
}
SPILLING = sorted(set(PLACEMENTS) - {"ram"})

# How spilled values travel: each mode changes one setting from the defaults (O_DIRECT
# where the filesystem takes it, copy reads, three I/O threads, a CRC32C with every
# chunk). "ram" touches no disk, so it runs in the defaults only: DEFAULT is no mode of
# the disk grid and claims no disk I/O. The eviction policy is no mode: no placement
# here evicts from a host tier (it holds no test tensor, or there is none), so an "lru"
# mode would be the defaults' twin; the policies' choices are tested where they act
# (test_eviction.py, test_eviction_order.py).
MODES = {
    "direct": dict(direct_io=True),
    "buffered": dict(direct_io=False),
    "mmap": dict(read_mode="mmap"),
    "one-thread": dict(io_threads=1, write_behind_bytes=0),
    "no-checksum": dict(checksum=False),
}
DEFAULT = "default"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "placements_only(reason): run in each placement once, not in every I/O mode "
        "(tests/cache/conftest.py)",
    )


def pytest_generate_tests(metafunc):
    if "placement" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("placements_only")
    if marker is not None:
        if not (marker.args and isinstance(marker.args[0], str) and marker.args[0]):
            raise pytest.UsageError(
                f"{metafunc.definition.nodeid}: placements_only needs a reason: why no "
                "I/O mode can change what the test checks"
            )
        combos = [(placement, DEFAULT) for placement in PLACEMENTS]
    else:
        combos = [("ram", DEFAULT)] + [(p, mode) for p in SPILLING for mode in MODES]
    ids = [p if mode == DEFAULT else f"{p}-{mode}" for p, mode in combos]
    metafunc.parametrize(("placement", "mode"), combos, ids=ids)


@pytest.fixture
def make_cache(placement, mode, tmp_path):
    """Build caches in the current placement and mode; every one is closed after the
    test, and in the disk grid each must have read from disk (see the module's text)."""
    caches: list[IntermediatesCache] = []
    mode_settings = MODES.get(mode, {})

    def make(num_batches: int = 2, offload_device="cpu", **overrides) -> IntermediatesCache:
        undone = sorted(set(overrides) & set(mode_settings))
        assert not undone, f"the override of {undone} undoes mode {mode!r}"
        settings = {**PLACEMENTS[placement], **mode_settings}
        if "host_tier" in settings:  # host_bytes: the tier and the parts the mode leaves
            parts = [settings[name] for name in ("write_behind_bytes", "read_buffer_bytes")]
            tier = settings.pop("host_tier")
            settings.update(tier_sizes(tier, *(parse_size("part", part) for part in parts)))
        if settings.get("disk_path", "auto") == "auto":
            settings["disk_path"] = str(tmp_path / "spill")
        settings.update(overrides)
        cache = IntermediatesCache.empty(
            num_batches, offload_device, config=CacheConfig(**settings)
        )
        caches.append(cache)
        return cache

    yield make
    unread = []
    for number, cache in enumerate(caches):
        cache.close()
        disk = cache.stats()["disk"]  # the counters outlive close
        if placement in SPILLING and mode in MODES and not (disk["hits"] and disk["bytes_read"]):
            unread.append(
                f"cache {number} (disk hits {disk['hits']}, bytes read {disk['bytes_read']}, "
                f"bytes written {disk['bytes_written']})"
            )
    assert not unread, (
        f"{placement}-{mode} is in the disk grid but read nothing from a chunk file: "
        f"{', '.join(unread)}. Fetch after cache.flush() (else the value may come from the "
        "write-behind area), or mark the test placements_only(reason) if no I/O mode can "
        "change what it checks."
    )
