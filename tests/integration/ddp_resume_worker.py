"""One rank of a data-parallel ``oneshot`` with spillcache checkpointing, killed where
asked. Run by ``tests/integration/test_ddp_resume.py`` under torchrun::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/integration/ddp_resume_worker.py CHECKPOINT_DIR WORK OUT
        [--kill-subgraph K] [--kill-in-checkpoint K --kill-rank R]

Each rank calibrates its half of the tiny Llama's samples with GPTQ, as
``ddp_oneshot_worker.py`` does, with the ranks waiting for each other after each
layer's compression (``gptq_barrier``: then nothing depends on gloo's timing and two
runs give the same weights), through ``enable(checkpoint_dir=...)``.

- ``--kill-subgraph K``: every rank kills itself (SIGKILL) as subgraph K begins (its
  first forward call); torchrun's agent stops a rank that has not got there yet.
- ``--kill-in-checkpoint K --kill-rank R``: rank R kills itself as it is about to
  commit subgraph K's checkpoint, once every other rank has committed its own (the
  ranks wait on torchrun's key-value store, never on time): the other ranks' parts
  are then one checkpoint ahead of rank R's.

A rank that finishes writes ``OUT/rank<R>.json``: the subgraphs its progress bars
announced, what spillcache said when it resumed, and a digest of every weight.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other workers

from ddp_oneshot_worker import calibrate_share, digests, gptq_barrier, share  # noqa: E402
from resume_child import kill_at  # noqa: E402

from tiny_llama import hidden_state_bytes  # noqa: E402


def record_progress(said: list[str]) -> None:
    """Every progress bar's title and every line spillcache logs, into ``said``."""
    from llmcompressor.pipelines.sequential import pipeline

    from spillcache._internal.llmcompressor import resumable_pipeline

    tqdm, say = pipeline.tqdm, resumable_pipeline._say

    def titled(*args, **kwargs):
        said.append(f"progress {kwargs.get('desc')}")
        return tqdm(*args, **kwargs)

    def saying(message: str) -> None:
        said.append(message)
        say(message)

    pipeline.tqdm = titled
    resumable_pipeline._say = saying


def kill_in_checkpoint_after_the_others(subgraph: int, victim: int, rank: int, world: int) -> None:
    """Rank ``victim`` dies as it is about to commit subgraph ``subgraph``'s checkpoint,
    after every other rank committed its own; they say so on torchrun's store."""
    from spillcache._internal.store.tensor_store import Store

    store = dist.distributed_c10d._get_default_store()
    write_root = Store.write_root_attributes

    def committing(self, **kwargs):
        note = self.attributes.get("note", {}).get("checkpoint", {})
        if note.get("subgraphs_done") != subgraph:
            return write_root(self, **kwargs)
        if rank == victim:
            store.wait([f"committed-{other}" for other in range(world) if other != victim])
            print(f"rank {rank}: killing before the commit of subgraph {subgraph}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        write_root(self, **kwargs)
        store.set(f"committed-{rank}", "1")

    Store.write_root_attributes = committing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir", type=Path)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--kill-subgraph", type=int)
    parser.add_argument("--kill-in-checkpoint", type=int)
    parser.add_argument("--kill-rank", type=int, default=0)
    args = parser.parse_args()

    from spillcache.integrations.llmcompressor import enable

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (args.work / "spill").mkdir(parents=True, exist_ok=True)
    said: list[str] = []
    record_progress(said)
    if args.kill_subgraph is not None:
        kill_at(args.kill_subgraph, "calibrating", 1)
    if args.kill_in_checkpoint is not None:
        kill_in_checkpoint_after_the_others(args.kill_in_checkpoint, args.kill_rank, rank, world)
    try:
        with gptq_barrier(True), enable(
            host_bytes=hidden_state_bytes(samples=1),
            inline_bytes=1024,
            disk_path=str(args.work / "spill"),
            checkpoint_dir=str(args.checkpoint_dir),
        ):  # fmt: skip
            weights = calibrate_share(
                args.work / "model" / f"rank{rank}", share(rank, world), prefetch=True, layers=4
            )
    finally:
        dist.destroy_process_group()
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "said": said, "weights": digests(weights)}
    (args.out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
