"""A oneshot run with spillcache checkpointing, killed with SIGKILL where asked.

    python resume_child.py CHECKPOINT_DIR SPILL_DIR OUT [--recipe gptq] [--layers 4]
        [--kill-subgraph K --kill-pass calibrating|propagating --kill-batch B
         [--raise-instead]]
        [--kill-in-checkpoint K --kill-step states|commit|call [--kill-call N]]

Runs the tiny Llama through ``oneshot`` under ``enable(checkpoint_dir=...)``. With
``--kill-subgraph``, the process kills itself (SIGKILL: nothing runs after it) when
subgraph K (1-based) runs batch B of that pass: counted from the subgraphs' forward
calls, never by timing. A run that finishes saves the calibrated state dict to OUT.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_llama import RECIPES, calibrate, hidden_state_bytes  # noqa: E402


def kill_at(subgraph: int, pass_name: str, batch: int, *, raise_instead: bool = False) -> None:
    """SIGKILL this process at the forward call of subgraph ``subgraph``'s pass (or
    raise an exception there, which unwinds through the pipeline)."""
    from llmcompressor.pipelines.sequential import helpers

    forward = helpers.Subgraph.forward
    seen: list[int] = []  # id of each subgraph in the order they first ran
    calls: dict[int, int] = {}

    def counting_forward(self, *args, **kwargs):
        if id(self) not in calls:
            seen.append(id(self))
            calls[id(self)] = 0
        calls[id(self)] += 1
        number = seen.index(id(self)) + 1
        # A pass is one call per batch: the calibrating pass first, then propagating.
        wanted = batch if pass_name == "calibrating" else BATCHES + batch
        if number == subgraph and calls[id(self)] == wanted:
            if raise_instead:
                raise RuntimeError(f"injected at subgraph {subgraph}, {pass_name} batch {batch}")
            print(f"killing at subgraph {subgraph}, {pass_name} batch {batch}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(self, *args, **kwargs)

    helpers.Subgraph.forward = counting_forward


BATCHES = 16  # tiny_llama.SAMPLES, one sample per batch


def kill_in_checkpoint(subgraph: int, step: str) -> None:
    """SIGKILL this process inside subgraph ``subgraph``'s checkpoint: once its state
    file is written ("states"), or as the flush that commits it is about to write the
    store's root ("commit")."""
    from spillcache._internal.store import checkpoints
    from spillcache._internal.store.tensor_store import Store

    save_states = checkpoints.save_states
    write_root = Store.write_root_attributes

    def saving(part, index, tensors):
        entry = save_states(part, index, tensors)
        if step == "states" and index + 1 == subgraph:
            print(f"killing after the state file of subgraph {subgraph}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return entry

    def committing(store, **kwargs):
        note = store.attributes.get("note", {}).get("checkpoint", {})
        if step == "commit" and note.get("subgraphs_done") == subgraph:
            print(f"killing before the commit of subgraph {subgraph}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return write_root(store, **kwargs)

    checkpoints.save_states = saving
    Store.write_root_attributes = committing


CALLS = ("open", "pwrite", "fsync", "replace")  # the system calls a checkpoint is made of


def kill_at_call(subgraph: int, number: int) -> None:
    """SIGKILL this process just before the ``number``-th system call (of ``CALLS``,
    made by the thread running oneshot) of subgraph ``subgraph``'s checkpoint: from
    its state file's first fsync to its store's flush returning. A checkpoint that
    ends with fewer calls says how many it made."""
    import threading

    from spillcache._internal.runtime.core import CacheCore
    from spillcache._internal.store import checkpoints

    counting = threading.Event()
    made = [0]
    save_states, flush = checkpoints.save_states, CacheCore.flush

    def counted(name, call):
        def call_or_die(*args, **kwargs):
            if counting.is_set() and threading.current_thread() is threading.main_thread():
                made[0] += 1
                if number == 0:  # counting: each call said
                    where = args[0] if name != "pwrite" else "a chunk file"
                    print(f"call {made[0]}: {name} {where}", flush=True)
                if made[0] == number:
                    print(f"killing at call {number} of checkpoint {subgraph}: {name}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return call(*args, **kwargs)

        return call_or_die

    def saving(part, index, tensors):
        if index + 1 == subgraph:
            counting.set()
        return save_states(part, index, tensors)

    def flushing(core, *args, **kwargs):
        flush(core, *args, **kwargs)
        if counting.is_set():
            counting.clear()
            print(f"checkpoint {subgraph} made {made[0]} calls", flush=True)

    for name in CALLS:
        setattr(os, name, counted(name, getattr(os, name)))
    checkpoints.save_states = saving
    CacheCore.flush = flushing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("spill_dir")
    parser.add_argument("out")
    parser.add_argument("--recipe", default="gptq", choices=sorted(RECIPES))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kill-subgraph", type=int)
    parser.add_argument("--raise-instead", action="store_true",
                        help="raise at --kill-subgraph rather than SIGKILL")  # fmt: skip
    parser.add_argument("--kill-pass", default="calibrating")
    parser.add_argument("--kill-batch", type=int, default=1)
    parser.add_argument("--no-propagate-error", action="store_true")
    parser.add_argument("--kill-in-checkpoint", type=int)
    parser.add_argument("--kill-step", default="states", choices=["states", "commit", "call"])
    parser.add_argument("--kill-call", type=int, default=0,
                        help="with --kill-step call: the call to die at (0: count)")  # fmt: skip
    args = parser.parse_args()

    import spillcache.integrations.llmcompressor  # noqa: F401  (before the kills are set up)

    if args.kill_subgraph is not None:
        kill_at(
            args.kill_subgraph, args.kill_pass, args.kill_batch, raise_instead=args.raise_instead
        )
    if args.kill_in_checkpoint is not None and args.kill_step == "call":
        kill_at_call(args.kill_in_checkpoint, args.kill_call)
    elif args.kill_in_checkpoint is not None:
        kill_in_checkpoint(args.kill_in_checkpoint, args.kill_step)
    weights = checkpointed_run(
        args.checkpoint_dir, args.spill_dir, args.out, recipe=args.recipe, layers=args.layers,
        propagate_error=not args.no_propagate_error,
    )  # fmt: skip
    import torch

    torch.save(weights, args.out)


def checkpointed_run(
    checkpoint_dir: str | Path,
    spill_dir: str | Path,
    out: str | Path,
    *,
    recipe: str = "gptq",
    layers: int = 4,
    propagate_error: bool = True,
) -> dict:
    """The run this script makes (its kills aside): the tiny Llama through ``oneshot``
    under ``enable(checkpoint_dir=...)``; the calibrated state dict. test_resume.py
    also calls it in its own process, to resume a run this script left."""
    from spillcache.integrations.llmcompressor import enable

    with enable(
        host_bytes=hidden_state_bytes() // 2,
        inline_bytes=1024,
        disk_path=str(spill_dir),
        checkpoint_dir=str(checkpoint_dir),
    ):
        return calibrate(
            Path(out).parent / "model",
            RECIPES[recipe](),
            prefetch=True,
            layers=layers,
            **({} if propagate_error else {"propagate_error": False}),
        )  # fmt: skip


if __name__ == "__main__":
    main()
