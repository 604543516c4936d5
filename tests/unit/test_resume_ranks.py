"""resumable_pipeline without llm-compressor: how the ranks of a job agree where to
resume (Ranks), with torch.distributed's calls answered by the test (what the other
ranks say); and the fingerprint's read of the samples, which must draw no random
numbers (draws_undone)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from spillcache import CheckpointError
from spillcache._internal.llmcompressor.resumable_pipeline import Ranks, draws_undone
from spillcache._internal.store import checkpoints
from spillcache._internal.store.checkpoints import Checkpoint, Part
from unit.test_checkpoints import commit


def as_rank(monkeypatch, rank: int, others: list) -> Ranks:
    """This process as rank ``rank`` of a process group; the other ranks answer
    ``others`` in order to each all_gather_object."""
    dist = torch.distributed
    world = len(others) + 1
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: world)
    monkeypatch.setattr(dist, "get_rank", lambda: rank)

    def all_gather_object(every, mine):
        answers = list(others)
        answers.insert(rank, mine)
        every[:] = answers

    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    return Ranks()


def checkpoint(done: int, subgraphs: int = 5) -> Checkpoint:
    note = Checkpoint.note("print", {}, done, subgraphs, [])
    return Checkpoint(note, store=None)


def test_one_process_makes_no_collective(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    ranks = Ranks()
    assert not ranks.several and ranks.part(Path("d")).rank is None
    assert ranks.agree(checkpoint(3), None) == 3
    refusal = CheckpointError("another calibration")
    with pytest.raises(CheckpointError, match="another calibration") as raised:
        ranks.agree(None, refusal)
    assert raised.value is refusal  # its own error, as it was
    ranks.all_ready(None)


def test_a_job_of_one_process_keeps_its_part_where_its_rank_stores_go(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    ranks = Ranks()
    assert ranks.part(Path("d")).rank == 0 and not ranks.several


def test_every_rank_resumes_from_the_lower_of_two_neighbours(monkeypatch):
    assert as_rank(monkeypatch, 0, [(2, 5, None)]).agree(checkpoint(3), None) == 2
    assert as_rank(monkeypatch, 1, [(3, 5, None)]).agree(checkpoint(2), None) == 2
    assert as_rank(monkeypatch, 1, [(1, 5, None), (0, None, None)]).agree(None, None) == 0


def test_a_refusal_on_one_rank_is_raised_on_every_rank(monkeypatch):
    ranks = as_rank(monkeypatch, 0, [(2, 5, "CheckpointError: its state file is damaged")])
    with pytest.raises(CheckpointError, match=r"^rank 1 of 2 refuses its checkpoint: Check"):
        ranks.agree(checkpoint(2), None)


def test_parts_further_apart_than_a_kill_leaves_them_are_refused(monkeypatch):
    ranks = as_rank(monkeypatch, 0, [(1, 5, None)])
    with pytest.raises(CheckpointError, match=r"too far apart .*rank 0: 3, rank 1: 1"):
        ranks.agree(checkpoint(3), None)


def test_a_finished_run_whose_removal_was_cut_short_starts_afresh(monkeypatch):
    """Every subgraph done on one rank, the part of the other removed already."""
    assert as_rank(monkeypatch, 0, [(0, None, None)]).agree(checkpoint(5), None) == 0
    assert as_rank(monkeypatch, 1, [(5, 5, None)]).agree(None, None) == 0


def test_a_failure_on_one_rank_after_the_agreement_is_raised_on_every_rank(monkeypatch):
    ranks = as_rank(monkeypatch, 0, ["StoreCorruptError: batch 3 is damaged"])
    with pytest.raises(CheckpointError, match=r"rank 1 of 2 could not get ready: StoreCorrupt"):
        ranks.all_ready(None)
    own = OSError("no space left")
    with pytest.raises(OSError) as raised:
        as_rank(monkeypatch, 1, [None]).all_ready(own)
    assert raised.value is own
    as_rank(monkeypatch, 0, [None]).all_ready(None)  # all ready: nothing raised


def test_a_rank_ahead_of_a_rank_with_none_starts_afresh(tmp_path, monkeypatch):
    ranks = as_rank(monkeypatch, 0, [(0, None, None)])
    part = Part(tmp_path, 0)
    part.states.mkdir(parents=True)
    (part.states / "0000.pt").write_bytes(b"saved")
    assert ranks.agree(checkpoint(1), None) == 0
    assert ranks.go_back(part, checkpoint(1), 0) is None
    assert not tmp_path.exists()  # its part removed, and the directory with it


def test_a_rank_that_cannot_go_back_says_so(tmp_path, monkeypatch):
    commit(tmp_path, [], done=2)  # a store whose flushes kept nothing before the last
    ranks = as_rank(monkeypatch, 0, [(1, 5, None)])
    part = Part(tmp_path)
    found = checkpoints.committed(part)
    with pytest.raises(CheckpointError, match="keeps no checkpoint of 1 subgraphs"):
        ranks.go_back(part, found, 1)
    assert checkpoints.committed(part).done == 2  # left as it was


@pytest.mark.parametrize("generator", ["torch's", "the loader's", "the sampler's"])
def test_a_read_of_a_shuffling_loader_for_the_fingerprint_leaves_its_next_order(generator):
    """A shuffling loader draws each pass's order (and a seed for its workers) from
    torch's generator or from its own; a pass read inside draws_undone leaves the next
    pass the order it would have had, and torch's generator as it was."""
    from torch.utils.data import DataLoader, RandomSampler

    def loader() -> DataLoader:
        own = torch.Generator().manual_seed(3)
        if generator == "the sampler's":
            return DataLoader(
                range(16), batch_size=4, sampler=RandomSampler(range(16), generator=own)
            )
        return DataLoader(
            range(16), batch_size=4, shuffle=True,
            generator=own if generator == "the loader's" else None,
        )  # fmt: skip

    torch.manual_seed(0)
    expected = [batch.tolist() for batch in loader()]
    torch.manual_seed(0)
    read, state = loader(), torch.get_rng_state()
    with draws_undone(read):
        assert [batch.tolist() for batch in read] == expected  # the fingerprint's read
    assert torch.equal(torch.get_rng_state(), state)
    assert [batch.tolist() for batch in read] == expected
