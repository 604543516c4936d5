"""A flush that keeps the flush before it (``keep_previous``): a store left by a crash
opens as of either, bit for bit, and what only the earlier one named goes once it is
let go (``release_previous``), on close, or when the store opens as of the later."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from spillcache import IntermediatesCache, StoreFormatError
from spillcache._internal.runtime.reopen import go_back_one_flush
from spillcache._internal.store.store_format import read_root_attributes
from spillcache.cli import main
from store import kept_writer
from store.test_kept_store_after_crash import (
    assert_flushed_state,
    assert_value,
    kill,
    open_after_crash,
    start,
    wait_for,
)


def arrays(path: str) -> set[str]:
    return set(os.listdir(Path(path) / "tensors")) - {"zarr.json"}


def killed_after_two_flushes(tmp_path: Path) -> str:
    child, path = start(tmp_path, "kept_previous")
    wait_for(child, "flushed")
    wait_for(child, "flushed again")
    kill(child)
    return path


def test_a_store_goes_back_to_the_flush_it_kept(tmp_path, capsys):
    path = killed_after_two_flushes(tmp_path)
    assert read_root_attributes(path)["note"] == {"n": 2}
    assert go_back_one_flush(path) == 1
    root = read_root_attributes(path)
    assert (root["flush"], root["note"]) == (1, {"n": 1}) and "note_before" not in root
    cache, warning = open_after_crash(path)
    with cache:
        assert_flushed_state(cache)  # every "h" as first stored, batch 1's "pair" back
    # The four newer "h" arrays the second flush wrote were dropped.
    assert "dropped 4 arrays that flush does not name" in warning, warning
    assert main(["verify", path]) == 0
    capsys.readouterr()


def test_without_going_back_the_last_flush_opens_and_the_kept_arrays_go(tmp_path, capsys):
    path = killed_after_two_flushes(tmp_path)
    before = arrays(path)
    cache, _ = open_after_crash(path)
    with cache:
        for batch in range(kept_writer.BATCHES):
            values = cache.fetch(batch)
            assert sorted(values) == (["bits", "h"] if batch == 1 else ["bits", "h", "pair"])
            assert_value(values["h"], batch, "h", version=1)
            assert_value(values["bits"], batch, "bits")
    # The first flush's four "h" arrays and batch 1's "pair" are gone; nothing else.
    assert len(before - arrays(path)) == 5 and not arrays(path) - before
    assert read_root_attributes(path)["note"] == {"n": 2}
    assert main(["verify", path]) == 0
    capsys.readouterr()


def test_going_back_needs_a_kept_flush(tmp_path):
    child, path = start(tmp_path, "after_flush")
    wait_for(child, "flushed")
    wait_for(child, "written")
    kill(child)
    root = (Path(path) / "zarr.json").read_bytes()
    with pytest.raises(StoreFormatError, match=r"flush before its last: that flush was not kept"):
        go_back_one_flush(path)
    assert (Path(path) / "zarr.json").read_bytes() == root


def test_release_previous_deletes_what_only_the_flush_before_named(tmp_path, capsys):
    config = kept_writer.config(str(tmp_path))
    with IntermediatesCache.empty(0, "cpu", config=config) as cache:
        for batch in range(2):
            cache.append(kept_writer.batch_values(batch))
        cache.flush()
        first = arrays(cache.store_path)
        cache.update(0, {"h": kept_writer.value(0, "h", 1)})
        cache._core.flush(keep_previous=True)
        kept = arrays(cache.store_path)
        assert first <= kept and len(kept - first) == 1  # the old "h" stays, the new is added
        assert "note_before" in read_root_attributes(cache.store_path)
        cache._core.release_previous()
        released = arrays(cache.store_path)
        assert len(first - released) == 1 and released < kept
        assert_value(cache.fetch(0)["h"], 0, "h", version=1)
        cache.update(1, {"h": kept_writer.value(1, "h", 1)})
        cache._core.flush(keep_previous=True)
        path = cache.store_path
    # Closed without a release: the kept array goes with the rest no structure names.
    assert main(["verify", path]) == 0
    assert "orphan" not in capsys.readouterr().out.lower()
    assert len(arrays(path)) == len(released)
    with IntermediatesCache.open(path) as again:
        assert_value(again.fetch(1)["h"], 1, "h", version=1)
        assert_value(again.fetch(0)["h"], 0, "h", version=1)


def test_a_kept_note_is_the_one_its_flush_committed(tmp_path):
    """The caller may change its note's objects after the flush: the note the next
    flush keeps as the one before is still what the first committed."""
    config = kept_writer.config(str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, kept_writer.batch_values(0))
        states = ["0000.pt"]
        cache._core.flush(note={"done": 1, "states": states})
        states.append("0001.pt")  # the caller's list, for its next checkpoint
        cache._core.flush(note={"done": 2, "states": states}, keep_previous=True)
        root = read_root_attributes(cache.store_path)
        assert root["note_before"] == {"done": 1, "states": ["0000.pt"]}
        assert root["note"] == {"done": 2, "states": ["0000.pt", "0001.pt"]}


def test_a_cache_that_keeps_only_what_it_flushed_closes_as_its_last_flush(tmp_path):
    """Closed for whatever reason (an exception unwinding, the interpreter's exit), a
    checkpoint's store keeps what its last flush committed, not what came after, and
    opens again in the same process."""
    config = kept_writer.config(str(tmp_path))
    cache = IntermediatesCache.empty(0, "cpu", config=config)
    for batch in range(kept_writer.BATCHES):
        cache.append(kept_writer.batch_values(batch))
    cache._core.keeps_only_flushed = True
    cache._core.flush(note={"n": 1})
    path = cache.store_path
    cache.update(0, {"h": kept_writer.value(0, "h", 1)})  # after the flush: not kept
    cache.append(kept_writer.batch_values(4))
    cache.close()
    root = read_root_attributes(path)
    assert root["complete"] is False and root["released"] is True and root["note"] == {"n": 1}
    again, warning = open_after_crash(path)  # this process let it go: it opens here
    with again:
        assert_flushed_state(again)
    assert "dropped" in warning


def test_a_flush_that_does_not_keep_drops_the_note_it_no_longer_keeps(tmp_path):
    config = kept_writer.config(str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, kept_writer.batch_values(0))
        cache._core.flush(note={"n": 1})
        cache._core.flush(note={"n": 2}, keep_previous=True)
        assert read_root_attributes(cache.store_path)["note_before"] == {"n": 1}
        cache.update(0, {"h": kept_writer.value(0, "h", 1)})
        cache.flush()  # keeps nothing before it: the arrays of note 1 are gone
        root = read_root_attributes(cache.store_path)
        assert "note_before" not in root and root["note"] == {"n": 2}


def test_going_back_is_refused_whole_when_an_array_it_needs_is_gone(tmp_path):
    path = killed_after_two_flushes(tmp_path)
    needed = only_the_flush_before_names(path)
    assert len(needed) == 5, needed  # the four first "h" and batch 1's "pair"
    root = (Path(path) / "zarr.json").read_bytes()
    shutil.rmtree(Path(path) / "tensors" / sorted(needed)[0])
    with pytest.raises(StoreFormatError, match=r"as of the flush before its last: .*missing"):
        go_back_one_flush(path)
    assert (Path(path) / "zarr.json").read_bytes() == root  # nothing changed


def only_the_flush_before_names(path: str) -> set[str]:
    """The arrays the batches' kept structures (``before``) name and theirs do not."""

    def arrays_in(node) -> set[str]:
        if isinstance(node, dict):
            own = {node["array"].split("/")[-1]} if node.get("type") == "tensor" else set()
            return own.union(*map(arrays_in, node.values()))
        if isinstance(node, list):
            return set().union(*map(arrays_in, node))
        return set()

    names: set[str] = set()
    for batch in sorted((Path(path) / "batches").glob("*/zarr.json")):
        own = json.loads(batch.read_text())["attributes"]["spillcache"]
        if "before" in own:
            names |= arrays_in(own["before"]["entries"]) - arrays_in(own["entries"])
    return names
