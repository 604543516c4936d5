"""spillcache._internal.store.checkpoints: a checkpoint directory's state files, commit and
fingerprint, without llm-compressor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spill_testing import ALL_DTYPES, assert_same, random_tensor
from spillcache import CacheConfig, CheckpointError, IntermediatesCache
from spillcache._internal.store import checkpoints
from spillcache._internal.store.checkpoints import ACTIVATIONS, NOTE_KEY, STATES, Checkpoint, Part
from spillcache._internal.store.store_format import read_root_attributes
from spillcache._internal.store.tensor_store import write_root_json


def tensors_of_every_dtype() -> dict[str, torch.Tensor]:
    return {
        f"layer.{index}.w": random_tensor(dtype, (3, 5), index)
        for index, dtype in enumerate(ALL_DTYPES)
    }


def commit(directory, states, done=1, parts=None) -> str:
    """A kept activation store in ``directory`` whose flush commits a checkpoint (under
    torchrun's environment, where spillcache puts that rank's stores)."""
    parts = parts or {"recipe": "gptq", "model weights": "abc"}
    config = CacheConfig(host_bytes=0, disk_path=str(directory / ACTIVATIONS), keep_store=True)
    cache = IntermediatesCache.empty(1, "cpu", config=config)
    cache.update(0, {"h": torch.ones(4, 4)})
    note = Checkpoint.note(checkpoints.fingerprint(parts), parts, done, 5, states)
    cache._core.flush(note={NOTE_KEY: note})
    cache.close()
    return cache.store_path


def test_state_files_come_back_bit_for_bit_in_every_dtype(tmp_path):
    saved = tensors_of_every_dtype()
    entry = checkpoints.save_states(Part(tmp_path), 0, saved)
    assert (tmp_path / STATES / "0000.pt").stat().st_size == entry["bytes"]
    assert not list((tmp_path / STATES).glob("*.partial"))
    commit(tmp_path, [entry])
    found = checkpoints.committed(Part(tmp_path))
    assert found is not None and found.done == 1 and found.states == [entry]
    checkpoints.check_states(Part(tmp_path), found)
    (loaded,) = list(checkpoints.iter_states(Part(tmp_path), found))
    assert loaded.keys() == saved.keys()
    for name, tensor in saved.items():
        assert_same(loaded[name], tensor)


@pytest.mark.parametrize("damage", ["missing", "shorter", "flipped"])
def test_a_damaged_state_file_is_named(tmp_path, damage):
    entry = checkpoints.save_states(Part(tmp_path), 0, {"w": torch.arange(1000.0)})
    commit(tmp_path, [entry])
    path = tmp_path / STATES / "0000.pt"
    data = bytearray(path.read_bytes())
    if damage == "missing":
        path.unlink()
    elif damage == "shorter":
        path.write_bytes(bytes(data[:-1]))
    else:
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    expected = {
        "missing": "is missing", "shorter": "holds", "flipped": "does not match its CRC-32C"
    }[damage]  # fmt: skip
    with pytest.raises(CheckpointError, match=expected) as raised:
        checkpoints.check_states(Part(tmp_path), checkpoints.committed(Part(tmp_path)))
    assert "0000.pt" in str(raised.value) and "Remove the directory" in str(raised.value)


def test_state_files_no_commit_names_are_removed(tmp_path):
    first = checkpoints.save_states(Part(tmp_path), 0, {"w": torch.zeros(2)})
    checkpoints.save_states(Part(tmp_path), 1, {"w": torch.ones(2)})  # its commit never came
    (tmp_path / STATES / "0002.pt.partial").write_bytes(b"torn")
    commit(tmp_path, [first])
    part = Part(tmp_path)
    removed = checkpoints.remove_unnamed_states(part, checkpoints.committed(part))
    assert removed == ["0001.pt", "0002.pt.partial"]
    assert sorted(p.name for p in (tmp_path / STATES).iterdir()) == ["0000.pt"]


def test_no_store_or_no_commit_is_no_checkpoint(tmp_path):
    assert checkpoints.committed(Part(tmp_path)) is None
    config = CacheConfig(host_bytes=0, disk_path=str(tmp_path / ACTIVATIONS), keep_store=True)
    with IntermediatesCache.empty(1, "cpu", config=config) as cache:
        cache.update(0, {"h": torch.ones(4, 4)})
        cache.flush()  # a flush without a note commits no checkpoint
    assert checkpoints.committed(Part(tmp_path)) is None


def test_two_checkpointed_stores_in_one_directory_are_refused(tmp_path):
    commit(tmp_path, [])
    commit(tmp_path, [])
    with pytest.raises(CheckpointError, match="holds 2 checkpointed activation stores"):
        checkpoints.committed(Part(tmp_path))


def test_a_note_of_another_format_is_refused(tmp_path):
    path = commit(tmp_path, [])
    config = CacheConfig(host_bytes=0, keep_store=True)
    with IntermediatesCache.open(path, config) as cache:
        cache._core.flush(note={NOTE_KEY: {"format": 99}})
    with pytest.raises(CheckpointError, match="damaged or of another spillcache version"):
        checkpoints.committed(Part(tmp_path))


def test_the_difference_names_the_parts_that_differ():
    saved = {"recipe": "gptq", "model weights": "abc", "samples": "x" * 500}
    stored = Checkpoint.note("f", saved, 1, 5, [])["parts"]
    assert stored["samples"].startswith("sha256:")  # long parts kept by their digest
    now = {**saved, "recipe": "awq"}
    assert checkpoints.describe_difference(stored, now) == "recipe"
    assert (
        checkpoints.describe_difference(stored, {**now, "samples": "y" * 500}) == "recipe, samples"
    )
    assert checkpoints.fingerprint(saved) != checkpoints.fingerprint(now)


def as_rank(monkeypatch, rank: int, world: int, run: str = "job1") -> None:
    """torchrun's environment for rank ``rank`` of ``world`` (no process group)."""
    for name, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank,
                        "LOCAL_WORLD_SIZE": world, "TORCHELASTIC_RUN_ID": run}.items():  # fmt: skip
        monkeypatch.setenv(name, str(value))


def test_each_rank_finds_its_own_part_whatever_the_run_was_called(tmp_path, monkeypatch):
    paths = {}
    for rank in range(2):
        as_rank(monkeypatch, rank, 2, run=f"job{rank}")  # a relaunch is named anew
        paths[rank] = commit(tmp_path, [], done=rank + 1)
    monkeypatch.delenv("RANK")
    for rank in range(2):
        found = checkpoints.committed(Part(tmp_path, rank))
        assert str(found.store) == paths[rank] and found.done == rank + 1
    assert f"/{ACTIVATIONS}/job1/rank1/" in paths[1]
    assert checkpoints.committed(Part(tmp_path)) is None  # one process: none of these
    assert Part(tmp_path, 1).states == tmp_path / STATES / "rank1"


def test_checkpoints_of_another_world_size_are_found(tmp_path, monkeypatch):
    for rank in range(3):
        as_rank(monkeypatch, rank, 3)
        commit(tmp_path, [])
    monkeypatch.delenv("RANK")
    assert checkpoints.other_parts(Part(tmp_path, 0), 3) == []
    assert [path.parent.name for path in checkpoints.other_parts(Part(tmp_path, 1), 2)] == ["rank2"]
    assert checkpoints.other_parts(Part(tmp_path, 0), 1)[0].parent.name == "rank1"
    assert len(checkpoints.other_parts(Part(tmp_path), 1)) == 3
    single = tmp_path / "single"
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    commit(single, [])
    assert checkpoints.other_parts(Part(single), 1) == []
    assert len(checkpoints.other_parts(Part(single, 0), 2)) == 1


def test_a_rank_removes_its_own_part_and_the_last_the_directory(tmp_path, monkeypatch):
    for rank in range(2):
        as_rank(monkeypatch, rank, 2)
        checkpoints.save_states(Part(tmp_path, rank), 0, {"w": torch.zeros(2)})
        commit(tmp_path, [])
    Part(tmp_path, 0).remove()
    assert checkpoints.committed(Part(tmp_path, 0)) is None
    assert checkpoints.committed(Part(tmp_path, 1)) is not None
    assert sorted(p.name for p in (tmp_path / STATES).iterdir()) == ["rank1"]
    Part(tmp_path, 1).remove()
    assert not tmp_path.exists()


def test_a_removal_a_kill_cut_short_is_finished_by_the_next(tmp_path, monkeypatch):
    as_rank(monkeypatch, 1, 2)
    path = Path(commit(tmp_path, []))
    left = path.with_name(f"{checkpoints.REMOVING}{path.name}")  # renamed, never deleted
    path.rename(left)
    (left / "tensors" / "7").mkdir(parents=True, exist_ok=True)
    part = Part(tmp_path, 1)
    assert checkpoints.committed(part) is None  # out of sight: no checkpoint
    part.remove()
    assert not tmp_path.exists()


@pytest.mark.parametrize("note", ["text", ["a", "list"], {"checkpoint": "text"}, {"checkpoint": {
    "format": 1, "fingerprint": "f", "subgraphs_done": float("inf"), "subgraphs": 5,
    "states": []}}])  # fmt: skip
def test_a_malformed_note_is_no_checkpoint_to_the_cli_and_damage_to_a_resume(tmp_path, note):
    path = Path(commit(tmp_path, []))
    attributes = read_root_attributes(path)
    attributes["note"] = note
    write_root_json(path, attributes)
    assert checkpoints.describe_store(path, read_root_attributes(path)) is None
    if isinstance(note, dict):  # it says it is a checkpoint's, and does not read
        with pytest.raises(CheckpointError, match="damaged or of another spillcache version"):
            checkpoints.committed(Part(tmp_path))
    else:
        assert checkpoints.committed(Part(tmp_path)) is None
