"""`spillcache verify` reports what writes cut short left in a store, and `spillcache
gc` removes it from stores whose process is dead (issue 10, item 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from spill_testing import assert_same
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.store import store_dirs
from spillcache._internal.store.summary import verify
from spillcache.cli import main

VALUES = {"h": torch.arange(1024, dtype=torch.float32), "g": torch.ones(256, dtype=torch.bfloat16)}


@pytest.fixture
def cli(capsys, monkeypatch):
    for name in [k for k in os.environ if k.startswith("SPILLCACHE_")]:
        monkeypatch.delenv(name)

    def call(*args: str) -> tuple[int, list[str]]:
        status = main(list(args))
        return status, capsys.readouterr().out.splitlines()

    return call


def kept_store(tmp_path: Path) -> Path:
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), keep_store=True)
    cache = IntermediatesCache([dict(VALUES)], config=config)
    cache.close()
    return Path(cache.store_path)


def litter(store: Path) -> dict[str, Path]:
    """What a crash leaves: a .partial chunk, a .partial root, a half-written array (its
    chunk without zarr.json), and a whole array no batch refers to."""
    first = sorted((store / "tensors").iterdir())[0]
    partial = first / "c.0.1a2b3c4d.partial"
    partial.write_bytes(b"\0" * 100)
    root_partial = store / "zarr.json.5e6f7a8b.partial"
    root_partial.write_bytes(b"{")
    half = store / "tensors" / "90"
    half.mkdir()
    (half / "c.0.9c8d7e6f.partial").write_bytes(b"\0" * 64)  # counted once, with its array
    stray = store / "tensors" / "91"
    shutil.copytree(first, stray, ignore=shutil.ignore_patterns("*.partial"))
    return {"partial": partial, "root": root_partial, "half": half, "stray": stray}


def dead(store: Path) -> None:
    """Make the store's owner a dead process (its pid since reused: start time differs)."""
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["spillcache"]["start_time"] = store_dirs.owner_identity()["start_time"] - 1
    (store / "zarr.json").write_text(json.dumps(root))


def test_verify_reports_every_leftover_of_a_complete_store_not_as_damage(tmp_path, cli):
    store = kept_store(tmp_path)
    found = litter(store)
    orphans = verify(store)["orphans"]
    chunk_partial = str(found["partial"].relative_to(store))
    half_partial = "tensors/90/c.0.9c8d7e6f.partial"
    assert orphans["partial"] == [chunk_partial, half_partial, "zarr.json.5e6f7a8b.partial"]
    assert orphans["unfinished"] == ["tensors/90"] and orphans["unreferenced"] == ["91"]
    assert orphans["in_progress"] is False
    assert orphans["bytes"] == 100 + 1 + 64 + sum(
        p.stat().st_size for p in found["stray"].iterdir()
    )
    status, lines = cli("verify", str(store))
    assert status == 0  # leftovers are no damage: every value reads back whole
    assert lines[:5] == [
        f"ORPHAN {chunk_partial} (a write that never finished)",
        f"ORPHAN {half_partial} (a write that never finished)",
        "ORPHAN zarr.json.5e6f7a8b.partial (a write that never finished)",
        "ORPHAN tensors/90 (half-written: no zarr.json)",
        "ORPHAN array 91 (no batch refers to it)",
    ]
    assert lines[5].startswith("5 orphans (") and "spillcache gc --yes" in lines[5]


def test_a_store_still_being_written_has_writes_in_progress_not_orphans(tmp_path, cli):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with IntermediatesCache([dict(VALUES)], config=config) as cache:
        cache.flush()
        store = Path(cache.store_path)
        (sorted((store / "tensors").iterdir())[0] / "c.0.0badf00d.partial").write_bytes(b"x")
        assert verify(store)["orphans"]["in_progress"] is True
        status, lines = cli("verify", str(store))
    assert status == 0
    assert not any(line.startswith("ORPHAN") for line in lines)
    assert (
        lines[0]
        == "in progress: 1 unfinished write (1 B); the store's process may still be writing"
    )


def test_gc_removes_the_leftovers_of_a_dead_kept_store_and_keeps_its_values(tmp_path, cli):
    store = kept_store(tmp_path)
    found = litter(store)
    dead(store)
    size = _size(found)
    status, lines = cli("gc", str(tmp_path))
    assert status == 0 and all(path.exists() for path in found.values())  # a dry run
    assert (
        lines[0] == f"would remove 4 orphan files ({size}) from {store} (pid {os.getpid()} is dead)"
    )
    assert lines[-1] == "dry run: pass --yes to delete them"
    status, lines = cli("gc", str(tmp_path), "--yes")
    assert lines[0].startswith("removed 4 orphan files")
    assert lines[1] == f"removed 0 of 1 stores, 0 B; 4 orphan files, {size}"
    assert not any(path.exists() for path in found.values())
    assert verify(store)["orphans"]["partial"] == []
    with IntermediatesCache.open(str(store)) as reopened:
        for key, value in VALUES.items():
            assert_same(reopened.fetch(0)[key], value)


def test_gc_keeps_the_whole_arrays_of_a_dead_runs_unclosed_kept_store(tmp_path, cli):
    """A keep_store run that died: its whole arrays hold data (reopening may use what a
    flush recorded), so only what can never be read goes."""
    store = kept_store(tmp_path)
    found = litter(store)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["spillcache"]["complete"] = False  # as if it had died before close
    (store / "zarr.json").write_text(json.dumps(root))
    dead(store)
    assert verify(store)["orphans"]["unreferenced"] == ["91"]  # reported ...
    status, lines = cli("gc", str(tmp_path), "--yes")
    assert lines[0].startswith("removed 3 orphan files") and status == 0
    assert found["stray"].is_dir() and store.is_dir()  # ... but not removed
    assert not found["partial"].exists() and not found["half"].exists()


def _size(found: dict[str, Path]) -> str:
    from spillcache._internal.store.store_dirs import store_bytes
    from spillcache._internal.text import format_bytes

    return format_bytes(
        sum(store_bytes(p) if p.is_dir() else p.stat().st_size for p in found.values())
    )


def test_gc_never_follows_a_link_out_of_a_tampered_store(tmp_path, cli):
    outside = tmp_path / "outside"
    (outside / "half").mkdir(parents=True)
    (outside / "precious.partial").write_bytes(b"mine")
    store = kept_store(tmp_path / "spill")
    (store / "tensors" / "evil").symlink_to(outside, target_is_directory=True)
    (store / "batches" / "evil").symlink_to(outside, target_is_directory=True)
    dead(store)
    status, lines = cli("gc", str(tmp_path / "spill"), "--yes")
    assert status == 0
    assert (outside / "precious.partial").read_bytes() == b"mine" and (outside / "half").is_dir()


def test_a_structure_nested_too_deeply_for_json_leaves_orphans_unjudged(tmp_path):
    """Found by tests/store's tampered stores: json.loads raised RecursionError."""
    from spillcache._internal.store.store_format import read_root_attributes
    from spillcache._internal.store.summary import find_orphans

    store = kept_store(tmp_path)
    (store / "batches" / "0" / "zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    orphans = find_orphans(store, read_root_attributes(store))
    assert orphans["unreferenced"] == [] and orphans["partial"] == []


def test_regression_an_unfinished_flushs_arrays_are_the_orphans_not_the_last_flushs(tmp_path):
    """A kept store cut short in its second flush: batch 0's zarr.json already names the
    new array, keeping the last completed flush's structure as ``before``, but the root
    still says flush 1. What reopening keeps (and so what is not an orphan) is flush 1's
    array; the new one is the leftover. Leftovers used to read ``entries`` regardless."""
    from spillcache._internal.store.store_format import read_root_attributes
    from spillcache._internal.store.summary import find_orphans

    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path), keep_store=True)
    with IntermediatesCache([{"h": VALUES["h"]}], config=config) as cache:
        cache.flush()
        cache.update(0, {"h": VALUES["h"] + 1})
        cache.flush()
        image = tmp_path / "image"
        shutil.copytree(cache.store_path, image)  # the store as a kill here leaves it
    batch = json.loads((image / "batches" / "0" / "zarr.json").read_text())
    own = batch["attributes"]["spillcache"]
    new = own["entries"]["h"]["array"].removeprefix("tensors/")
    old = own["before"]["entries"]["h"]["array"].removeprefix("tensors/")
    assert new != old and own["flush"] == 2 and own["before"]["flush"] == 1
    root = json.loads((image / "zarr.json").read_text())
    root["attributes"]["spillcache"].update(flush=1, complete=False)  # flush 2 never completed
    (image / "zarr.json").write_text(json.dumps(root))
    dead(image)
    orphans = find_orphans(image, read_root_attributes(image))
    assert orphans["unreferenced"] == [new]


def test_gc_says_removed_only_for_what_it_removed(tmp_path, cli):
    """A store gc finds through a link (or one not this user's to delete) stays: gc says
    so, and counts it in neither the stores nor the bytes it removed."""
    from spillcache._internal.store.tensor_store import Store

    store = Store.create(tmp_path / "elsewhere")
    root = store.path / "zarr.json"
    root.write_text(root.read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999'))
    listed = tmp_path / "disk"
    listed.mkdir()
    link = listed / store.path.name
    link.symlink_to(store.path, target_is_directory=True)
    try:
        status, lines = cli("gc", str(listed), "--yes")
        assert status == 0
        assert os.path.lexists(link) and store.path.is_dir()  # nothing was removed
        assert f"could not remove {link}" in "\n".join(lines)
        assert not any(line.startswith(f"removed {link}") for line in lines), lines
        assert lines[-1].startswith("removed 0 of 1 stores"), lines
    finally:
        store_dirs.unregister(store.path)
        shutil.rmtree(tmp_path / "elsewhere")
