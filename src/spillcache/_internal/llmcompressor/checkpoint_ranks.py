"""The ranks of a torchrun job checkpointing one calibration together.

Each rank writes its own part of every checkpoint (``checkpoints.Part``: its store and
its state files). A checkpoint counts once every rank's part of it is durable, which no
rank can know alone; so the parts are kept at most one checkpoint apart, and a rerun
resumes every rank from the lower of the two:

- **One collective per subgraph**, a barrier before the checkpoint is written
  (``wait_for_all``): a rank begins checkpoint k only once every rank has finished
  checkpoint k-1 and subgraph k, so the weights it saves are final on every rank.
- **Each rank keeps its checkpoint before the last** until that barrier: its store's
  flush keeps the flush before (``flush(keep_previous=True)``), and the arrays only
  that one names are deleted after the next barrier (``release_previous``). A rank
  ahead of the others after a kill goes back to it (``reopen.go_back_one_flush``).
- **The rerun agrees first** (``agree``, one ``all_gather_object``): every rank says
  how far its part got and whether it refuses the checkpoint (another run's, damaged);
  all resume from the same subgraph, or all raise the same error. Once each has loaded
  its part (or filled its cache), a second one (``all_ready``) makes a failure on one
  rank an error on every rank, not a barrier the others wait at forever.
- **A finished run's removal cut short**: each rank removes its part after the last
  barrier, so a kill then leaves some parts with every subgraph done and some gone;
  every rank starts afresh.

One process (no process group, or a world of 1) makes no collective at all.
"""

from __future__ import annotations

from pathlib import Path

import torch

from spillcache.errors import CheckpointError, StoreFormatError

from ..process.resolved import rank_info
from ..runtime.reopen import go_back_one_flush
from ..store import checkpoints
from ..store.checkpoints import NOTE_KEY, Checkpoint, Part
from ..store.store_format import read_root_attributes

__all__ = ["Ranks"]


class Ranks:
    """This process's place among the ranks that checkpoint one calibration."""

    def __init__(self) -> None:
        # Where its part is: where spillcache puts this process's stores (a torchrun
        # job of one process has a rank too).
        info = rank_info()
        self.rank: int | None = None if info is None else info.rank
        self.world = 1 if info is None else info.world_size
        dist = torch.distributed
        self.several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def part(self, directory: Path) -> Part:
        return Part(directory, self.rank)

    def wait_for_all(self) -> None:
        """The barrier of a subgraph boundary (nothing for one process)."""
        if self.several:
            torch.distributed.barrier()

    def agree(self, found: Checkpoint | None, refusal: BaseException | None) -> int:
        """How many subgraphs every rank resumes after (0: start afresh), from each
        rank's committed checkpoint (``found``) or why it refuses its part
        (``refusal``); CheckpointError on every rank if any refuses, or if the parts
        are further apart than a kill can leave them."""
        done = found.done if found is not None else 0
        if not self.several:
            if refusal is not None:
                raise refusal
            return done
        total = found.subgraphs if found is not None else None
        every = self._gather((done, total, _said(refusal)))
        for rank, (_, _, why) in enumerate(every):
            if why is not None:
                raise CheckpointError(
                    f"rank {rank} of {self.world} refuses its checkpoint: {why}"
                ) from refusal
        counts = [count for count, _, _ in every]
        totals = [count for _, count, _ in every if count is not None]
        if min(counts) == 0 and totals and max(counts) == max(totals):
            # Every rank had finished (a rank removes its part only after the last
            # barrier): a kill cut the removal short. What is left is of no use to a
            # rank whose part went: every rank starts afresh.
            return 0
        if max(counts) - min(counts) > 1:
            listed = ", ".join(f"rank {rank}: {count}" for rank, count in enumerate(counts))
            raise CheckpointError(
                f"the ranks' parts of the checkpoint are too far apart to resume ({listed} "
                "subgraphs done; a kill leaves them at most one apart): they were written "
                "by different runs, or a run's part was removed. Remove the checkpoint "
                "directory to start afresh"
            )
        return min(counts)

    def all_ready(self, error: BaseException | None) -> None:
        """After each rank made ready to go on (its checkpoint loaded, or its cache
        filled): ``error`` raised on this rank, and CheckpointError on every other
        rank if any failed, rather than a collective that waits for it forever."""
        if not self.several:
            if error is not None:
                raise error
            return
        every = self._gather(_said(error))
        if error is not None:
            raise error
        for rank, why in enumerate(every):
            if why is not None:
                raise CheckpointError(f"rank {rank} of {self.world} could not get ready: {why}")

    def _gather(self, mine: object) -> list:
        """What every rank says, by rank (one all_gather_object)."""
        every: list = [None] * self.world
        torch.distributed.all_gather_object(every, mine)
        return every

    def go_back(self, part: Part, found: Checkpoint | None, done: int) -> Checkpoint | None:
        """This rank's checkpoint as of ``done`` subgraphs (``agree``'s answer): the one
        found, or the one before it when this rank got one checkpoint further than
        another (None: start afresh, this rank's part removed)."""
        if found is None or found.done == done:
            return found
        if done == 0:
            part.remove()
            return None
        kept = read_root_attributes(found.store).get("note_before")
        before = kept.get(NOTE_KEY) if isinstance(kept, dict) else None
        if not isinstance(before, dict) or before.get("subgraphs_done") != done:
            raise CheckpointError(
                f"rank {self.rank} got one checkpoint further than another rank, and its "
                f"store ({found.store}) keeps no checkpoint of {done} subgraphs to go back "
                "to. Remove the checkpoint directory to start afresh"
            )
        try:
            go_back_one_flush(found.store)
        except StoreFormatError as error:
            raise CheckpointError(
                f"rank {self.rank} got one checkpoint further than another rank and "
                f"cannot go back to the one before: {error}. Remove the checkpoint "
                "directory to start afresh"
            ) from None
        earlier = checkpoints.committed(part)
        if earlier is None or earlier.done != done:
            raise CheckpointError(
                f"rank {self.rank}'s checkpoint before the last does not read as "
                f"{done} subgraphs done. Remove the checkpoint directory to start afresh"
            )
        return earlier


def _said(error: BaseException | None) -> str | None:
    """An error as one rank tells the others of it."""
    return None if error is None else f"{type(error).__name__}: {error}"
