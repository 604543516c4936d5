"""A kept store survives a crash: what flush() acknowledged opens bit for bit after a
SIGKILL, every array says which batch and key it holds, and a store whose process
still runs is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from spill_testing import assert_same, child_process, random_tensor
from spillcache import CacheConfig, IntermediatesCache, StoreError, StoreFormatError
from spillcache._internal.store import summary
from spillcache._internal.store.store_format import read_root_attributes
from spillcache._internal.store.summary import load_value
from spillcache._internal.store.tensor_store import Store
from spillcache.cli import main
from store import kept_writer

WRITER = Path(kept_writer.__file__)


def start(disk_dir: Path, scenario: str) -> tuple[subprocess.Popen, str]:
    """The writer child, and its store once it has one (it says so on a line)."""
    child = child_process(WRITER, disk_dir, scenario)
    path = child.stdout.readline().strip()
    assert path, child.stderr.read()
    return child, path


def wait_for(child: subprocess.Popen, line: str) -> None:
    got = child.stdout.readline().strip()
    assert got == line, f"{got!r}: {child.stderr.read() if not got else ''}"


def kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    finish(child)


def finish(child: subprocess.Popen) -> None:
    """Wait for a child that was killed (or killed itself), and close its pipes."""
    child.wait(timeout=120)
    error = child.stderr.read()
    for pipe in (child.stdin, child.stdout, child.stderr):
        pipe.close()
    assert child.returncode == -signal.SIGKILL, error


def open_after_crash(path: str) -> tuple[IntermediatesCache, str]:
    """Open a store whose process died: exactly one warning, returned with the cache."""
    with pytest.warns(UserWarning) as caught:
        cache = IntermediatesCache.open(path)
    messages = [str(w.message) for w in caught if "spillcache" in str(w.message)]
    assert len(messages) == 1, messages
    return cache, messages[0]


def assert_value(got, batch: int, key: str, version: int = 0) -> None:
    want = kept_writer.value(batch, key, version)
    if key == "pair":
        assert_same(got[0], want[0])
        assert got[1] == want[1]
    else:
        assert_same(got, want)


def assert_flushed_state(cache: IntermediatesCache) -> None:
    """The 4 batches exactly as the writer's first flush() recorded them."""
    assert len(cache) == kept_writer.BATCHES
    for batch in range(kept_writer.BATCHES):
        values = cache.fetch(batch)
        assert sorted(values) == ["bits", "h", "pair"]
        for key, got in values.items():
            assert_value(got, batch, key)


def test_flushed_entries_come_back_bit_for_bit_after_sigkill(tmp_path, capsys):
    child, path = start(tmp_path, "after_flush")
    wait_for(child, "flushed")
    wait_for(child, "written")
    kill(child)
    # Before anything opens it: inspect lists the flushed keys (structures were written).
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["complete"] is False and info["owner_alive"] is False
    assert info["batches"] == 4 and info["problems"] == []
    assert set(info["keys"]) == {"h", "bits", "pair"} and info["keys"]["h"]["batches"] == 4
    cache, warning = open_after_crash(path)
    with cache:
        assert_flushed_state(cache)  # the replaced, deleted and updated entries as flushed
    for dropped in ("a newer value of batch 0, key 'h'", "a newer value of batch 2, key 'bits'",
                    "batch 4, key 'h'", "dropped 3 arrays that flush does not name"):  # fmt: skip
        assert dropped in warning, warning
    assert "4 batches its last flush() recorded (12 entries)" in warning
    # Closed, it is complete and holds nothing but what its structures name.
    assert read_root_attributes(path)["complete"] is True
    assert main(["verify", path]) == 0
    assert "orphan" not in capsys.readouterr().out.lower()
    with IntermediatesCache.open(path) as again:
        assert_flushed_state(again)


def test_every_array_records_its_batch_and_key(tmp_path):
    config = kept_writer.config(str(tmp_path))
    with IntermediatesCache.empty(0, "cpu", config=config) as cache:
        for batch in range(3):
            cache.append(kept_writer.batch_values(batch))
        cache.update(1, {"h": kept_writer.value(1, "h", 1)})
        cache.flush()
        path = Path(cache.store_path)
        named = 0
        for batch in range(3):
            group = json.loads((path / "batches" / str(batch) / "zarr.json").read_text())
            for key, node in group["attributes"]["spillcache"]["entries"].items():
                tensor = node if node["type"] == "tensor" else node["items"][0]
                array = path / tensor["array"] / "zarr.json"
                attributes = json.loads(array.read_text())["attributes"]["spillcache"]
                assert (attributes["batch"], attributes["key"]) == (batch, key)
                named += 1
        assert named == 9


def test_a_flush_cut_short_leaves_every_batch_as_the_flush_before(tmp_path):
    """The second flush() is killed after two of its four batch structures: every
    batch opens as the first flush left it, never half of each."""
    child, path = start(tmp_path, "mid_flush")
    wait_for(child, "flushed")
    finish(child)
    cache, _ = open_after_crash(path)
    with cache:
        assert_flushed_state(cache)


def test_a_failed_flush_is_rewritten_whole_by_the_next(tmp_path, monkeypatch):
    """A flush that fails half-way may have written a batch that then goes back to what
    the flush before recorded: the next flush writes it again, not "unchanged"."""
    with IntermediatesCache.empty(2, "cpu", config=kept_writer.config(str(tmp_path))) as cache:
        cache.update(0, {"n": 1})
        cache.update(1, {"n": 1})
        cache.flush()
        cache.update(0, {"n": 2})
        cache.update(1, {"n": 2})
        write_batch, calls = Store.write_batch, []

        def fail_second(store, *args, **kwargs):
            calls.append(args[0])
            if len(calls) == 2:
                raise StoreError(5, "injected: Input/output error")
            write_batch(store, *args, **kwargs)

        monkeypatch.setattr(Store, "write_batch", fail_second)
        with pytest.raises(StoreError, match="injected"):
            cache.flush()
        monkeypatch.undo()
        assert load_value(cache.store_path, 0, "n") == 1  # the failed flush did not count
        cache.update(0, {"n": 1})  # back to what the first flush recorded
        cache.flush()
        assert [load_value(cache.store_path, b, "n") for b in range(2)] == [1, 2]


def test_a_flushs_note_is_committed_with_it_and_kept_after(tmp_path, monkeypatch):
    """The note a flush carries (what a calibration's checkpoint says) is written with
    the root that commits the flush: a flush that fails before its root leaves the note
    before; later flushes and closes without a note keep the last one."""
    with IntermediatesCache.empty(2, "cpu", config=kept_writer.config(str(tmp_path))) as cache:
        cache.update(0, {"n": 1})
        cache._core.flush(note={"checkpoint": {"done": 1}})
        path = cache.store_path
        assert read_root_attributes(path)["note"] == {"checkpoint": {"done": 1}}
        cache.update(1, {"n": 2})
        monkeypatch.setattr(
            Store, "write_batch", lambda *args, **kwargs: (_ for _ in ()).throw(
                StoreError(5, "injected: Input/output error")
            ),
        )  # fmt: skip
        with pytest.raises(StoreError, match="injected"):
            cache._core.flush(note={"checkpoint": {"done": 2}})
        monkeypatch.undo()
        assert read_root_attributes(path)["note"] == {"checkpoint": {"done": 1}}
        cache.flush()  # no note: the last committed one stays
        assert read_root_attributes(path)["note"] == {"checkpoint": {"done": 1}}
        cache._core.flush(note={"checkpoint": {"done": 3}})
    assert read_root_attributes(path)["complete"] is True
    with IntermediatesCache.open(path) as again:
        again.flush()
        assert read_root_attributes(path)["note"] == {"checkpoint": {"done": 3}}
    assert read_root_attributes(path)["note"] == {"checkpoint": {"done": 3}}


def test_a_store_whose_process_runs_is_refused(tmp_path):
    with IntermediatesCache.empty(1, "cpu", config=kept_writer.config(str(tmp_path))) as cache:
        cache.update(0, kept_writer.batch_values(0))
        cache.flush()
        with pytest.raises(StoreFormatError, match=r"not complete and its process .* still runs"):
            IntermediatesCache.open(cache.store_path)


def test_a_kept_store_never_flushed_opens_empty_and_drops_its_arrays(tmp_path):
    child, path = start(tmp_path, "never_flushed")
    kill(child)
    cache, warning = open_after_crash(path)
    with cache:
        assert len(cache) == 0
    assert "opened the 0 batches" in warning
    assert "dropped 8 arrays that flush does not name" in warning
    assert sorted(os.listdir(Path(path) / "tensors")) == ["zarr.json"]


def test_a_store_that_was_not_kept_is_refused(tmp_path):
    child, path = start(tmp_path, "not_kept")
    kill(child)
    with pytest.raises(StoreFormatError, match="neither closed nor flushed with keep_store"):
        IntermediatesCache.open(path)
    assert len(os.listdir(Path(path) / "tensors")) == 9  # refused: nothing removed


def test_flush_writes_with_the_pool_lock_released(tmp_path, monkeypatch):
    """While one cache's flush() writes its values, another cache of the same pool
    stores and fetches (it would wait for the whole flush if the lock were held)."""
    config = CacheConfig(host_bytes="1MiB", disk_path=str(tmp_path), keep_store=True)
    flushing, release, other_done = threading.Event(), threading.Event(), threading.Event()
    write_tensor = Store.write_tensor

    def blocking_write(store, *args, **kwargs):
        if threading.current_thread().name == "flusher":
            flushing.set()
            assert release.wait(timeout=300)  # longer than the other cache may take
        return write_tensor(store, *args, **kwargs)

    monkeypatch.setattr(Store, "write_tensor", blocking_write)
    first = IntermediatesCache([{"h": random_tensor(torch.float32, (64, 64))}], config=config)
    second = IntermediatesCache.empty(1, "cpu", config=config)
    flusher = threading.Thread(target=first.flush, name="flusher")
    flusher.start()
    try:
        assert flushing.wait(timeout=60)

        def use_second():
            second.update(0, {"g": random_tensor(torch.float32, (64, 64), 1)})
            assert_same(second.fetch(0)["g"], random_tensor(torch.float32, (64, 64), 1))
            other_done.set()

        user = threading.Thread(target=use_second)
        user.start()
        assert other_done.wait(timeout=30), "the other cache waited for the flush"
        user.join()
    finally:
        release.set()
        flusher.join(timeout=60)
    second.close()
    first.close()
    with IntermediatesCache.open(first.store_path) as again:
        assert_same(again.fetch(0)["h"], random_tensor(torch.float32, (64, 64)))


def test_a_deletion_cut_short_leaves_a_half_written_array_that_never_stops_an_open(
    tmp_path, monkeypatch
):
    """Deleting an array removes its zarr.json first: a crash mid-deletion leaves what a
    crash mid-write leaves (no zarr.json), which opening a store passes over."""
    config = kept_writer.config(str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, kept_writer.batch_values(0))
    path = Path(cache.store_path)
    store = Store.open(path)
    name = json.loads((path / "batches/0/zarr.json").read_text())["attributes"]["spillcache"][
        "entries"
    ]["h"]["array"].removeprefix("tensors/")
    shutil.copytree(path / "tensors" / name, path / "tensors" / "999")
    seen = []
    monkeypatch.setattr(
        "spillcache._internal.store.tensor_store.shutil.rmtree",
        lambda directory, **_: seen.append(sorted(os.listdir(directory))),  # then "crash"
    )
    store.delete_tensor("999")
    assert seen == [["c.0.0"]]
    monkeypatch.undo()
    # What a deletion that took the chunk first would have left: never refused either.
    shutil.copytree(path / "tensors" / name, path / "tensors" / "998")
    os.unlink(path / "tensors" / "998" / "c.0.0")
    with IntermediatesCache.open(path) as again:  # complete: the leftover stays for gc
        assert_value(again.fetch(0)["h"], 0, "h")
    # verify agrees with open(): an orphan for gc, not damage (it said "1 bad", exit 1).
    checked = summary.verify(path)
    assert checked["bad"] == [] and checked["orphans"]["unreferenced"] == ["998"]


def test_a_batch_directory_named_with_a_foreign_digit_is_no_batch_and_left_alone(tmp_path):
    """Tidying a crashed store removes batch directories past the recorded count, by
    the names the writer gives them: "²" is none ("²".isdigit() is true, int("²")
    raises), so it is neither counted nor removed, and the store opens."""
    config = kept_writer.config(str(tmp_path))
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, kept_writer.batch_values(0))
    path = Path(cache.store_path)
    root = path / "zarr.json"
    metadata = json.loads(root.read_text())
    # As a run that flushed and then let its store go leaves it: opened as after a crash.
    metadata["attributes"]["spillcache"].update(complete=False, released=True)
    root.write_text(json.dumps(metadata))
    (path / "batches" / "²").mkdir()
    cache, warning = open_after_crash(str(path))
    with cache:
        assert_value(cache.fetch(0)["h"], 0, "h")
    assert "opened the 1 batches" in warning
    assert (path / "batches" / "²").is_dir()
