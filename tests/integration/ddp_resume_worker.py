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
- ``--reference DIR``: first an uninterrupted run, in the same processes (with
  ``DIR/ckpt`` as its checkpoint_dir and ``DIR`` for its work), whose records go to
  ``DIR/out``; then the run asked for (the killed one). One launch of torchrun (and
  one import of llm-compressor per rank) for both.
- ``--refused DIR``: first a run from the checkpoint_dir ``DIR`` that must not get
  going (a damaged one): the error each rank's ``oneshot`` raised (None if it
  returned) goes to ``DIR/refusal/rank<R>.json``; then the run asked for.

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

from spill_testing import progress_spies  # noqa: E402
from tiny_llama import hidden_state_bytes  # noqa: E402


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
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--refused", type=Path)
    args = parser.parse_args()

    import spillcache.integrations.llmcompressor  # noqa: F401  (before the kills are set up)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    said: list[str] = []
    for module, name, spy in progress_spies(said):
        setattr(module, name, spy)
    try:
        if args.reference is not None:
            run(args.reference / "ckpt", args.reference, args.reference / "out", said)
            said.clear()
        if args.refused is not None:
            refuse(args.refused, args.work, rank)
            said.clear()
        if args.kill_subgraph is not None:
            kill_at(args.kill_subgraph, "calibrating", 1)
        if args.kill_in_checkpoint is not None:
            kill_in_checkpoint_after_the_others(
                args.kill_in_checkpoint, args.kill_rank, rank, world
            )
        run(args.checkpoint_dir, args.work, args.out, said)
    finally:
        dist.destroy_process_group()


def refuse(checkpoint_dir: Path, work: Path, rank: int) -> None:
    """A run from ``checkpoint_dir``, which must fail on every rank: what each raised."""
    try:
        run(checkpoint_dir, work, checkpoint_dir / "out", [])
    except Exception as error:
        raised = f"{type(error).__name__}: {error}"
    else:
        raised = None
    (checkpoint_dir / "refusal").mkdir(parents=True, exist_ok=True)
    (checkpoint_dir / "refusal" / f"rank{rank}.json").write_text(json.dumps({"raised": raised}))


def run(checkpoint_dir: Path, work: Path, out: Path, said: list[str]) -> None:
    """One run of this rank, checkpointed in ``checkpoint_dir``; its record in ``out``."""
    from spillcache.integrations.llmcompressor import enable

    rank, world = dist.get_rank(), dist.get_world_size()
    (work / "spill").mkdir(parents=True, exist_ok=True)
    with gptq_barrier(True), enable(
        host_bytes=hidden_state_bytes(samples=1),
        inline_bytes=1024,
        disk_path=str(work / "spill"),
        checkpoint_dir=str(checkpoint_dir),
    ):  # fmt: skip
        weights = calibrate_share(
            work / "model" / f"rank{rank}", share(rank, world), prefetch=True, layers=4
        )
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": rank, "said": said, "weights": digests(weights)}
    (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
