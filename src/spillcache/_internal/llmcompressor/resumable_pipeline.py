"""llm-compressor's sequential pipeline with a checkpoint after every subgraph, and a
rerun that resumes after the last one committed.

``enable(checkpoint_dir=...)`` puts :func:`run_with_checkpoints` in the place of
``SequentialPipeline.__call__``. It does what llm-compressor's own pipeline does (0.14:
trace the model into subgraphs, fill the cache from the dataloader, per subgraph a
calibration pass, the epoch's end, a propagation pass), with three differences:

- the cache is a kept store in ``checkpoint_dir/activations`` (checkpoints.py);
- after each subgraph's last pass, the tensors of the model it changed are saved and
  the cache is flushed with a note that commits the checkpoint;
- when ``checkpoint_dir`` holds a committed checkpoint of the same run (its
  fingerprint: the model's config and starting weights, the recipe, the samples, the
  pipeline's settings, the world size and the versions), the cache is reopened instead
  of filled, the saved tensors are loaded after the modifiers started calibrating, and
  the loop begins at the first subgraph not committed, under llm-compressor's own
  ``(k/N): Calibrating`` progress.

After a run that finishes, the checkpoint directory's contents are removed.

Under torchrun the ranks checkpoint one calibration together (``Ranks``). Each rank
writes its own part of every checkpoint (``checkpoints.Part``: its store and its state
files). A checkpoint counts once every rank's part of it is durable, which no rank can
know alone; so the parts are kept at most one checkpoint apart, and a rerun resumes
every rank from the lower of the two:

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

import contextlib
import random
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy
import torch

from spillcache import __version__
from spillcache.config import CacheConfig
from spillcache.errors import CheckpointError, ConfigError, StoreFormatError

from ..process.resolved import rank_info
from ..runtime.reopen import go_back_one_flush
from ..store import checkpoints
from ..store.checkpoints import NOTE_KEY, Checkpoint, Part, named_tensors
from ..store.store_format import read_root_attributes

__all__ = ["PIPELINE_MODULE", "Ranks", "draws_undone", "hook_checkpoints", "run_with_checkpoints"]

PIPELINE_MODULE = "llmcompressor.pipelines.sequential.pipeline"
INDEPENDENT_MODULE = "llmcompressor.pipelines.independent.pipeline"
# The parameters compressed-tensors adds to a module it will quantize: made with
# torch.empty before calibration (so their bits differ from run to run) and calibrated
# later, they are no part of the model's starting weights.
QUANTIZATION_PARAMETER = re.compile(r"_(scale|zero_point|g_idx|global_scale)$")
PIPELINE_SETTINGS = ("propagate_error", "sequential_targets", "sequential_targets_per_subgraph",
                     "tracing_ignore", "sequential_offload_device", "use_loss_mask")  # fmt: skip


def hook_checkpoints(
    directory: Path, cache_class: Callable[[CacheConfig], type], config: CacheConfig | None
) -> Callable[[], None]:
    """Make llm-compressor's sequential pipeline (its module imported) run
    ``run_with_checkpoints`` in ``directory``, with ``config`` (None: read from the
    environment when the pipeline runs), and its independent pipeline refuse to run several
    (``refuse_several_checkpointed``); returns what puts llm-compressor's own back."""
    module = sys.modules[PIPELINE_MODULE]

    def call(model: Any, dataloader: Any, dataset_args: Any) -> None:
        run_with_checkpoints(model, dataloader, dataset_args, directory=directory,
                             cache_class=cache_class,
                             config=config or CacheConfig.from_env())  # fmt: skip

    hooks = contextlib.ExitStack()  # its close puts llm-compressor's own back
    # As llm-compressor's own: an out-of-memory error says which settings to lower.
    _replace_call(hooks, PIPELINE_MODULE, "SequentialPipeline", module.handle_sequential_oom(call))
    if INDEPENDENT_MODULE in sys.modules:  # the package's __init__ imports both
        run = sys.modules[INDEPENDENT_MODULE].IndependentPipeline.__call__

        def call_independent(model: Any, dataloader: Any, dataset_args: Any) -> None:
            refuse_several_checkpointed(module)
            run(model, dataloader, dataset_args)

        _replace_call(hooks, INDEPENDENT_MODULE, "IndependentPipeline", call_independent)
    return hooks.close


def _replace_call(hooks: contextlib.ExitStack, module: str, name: str, call: Callable) -> None:
    """The static ``__call__`` of the pipeline class ``name`` of ``module`` replaced by
    ``call``; ``hooks`` puts the stock one back (into the module's class of the time)."""
    stock = vars(vars(sys.modules[module])[name])["__call__"]
    vars(sys.modules[module])[name].__call__ = staticmethod(call)
    hooks.callback(lambda: setattr(vars(sys.modules[module])[name], "__call__", stock))


def refuse_several_checkpointed(stock: Any) -> None:
    """ConfigError before llm-compressor's independent pipeline (oneshot's default) runs a
    sequential pipeline for each of several modifiers (SmoothQuant and GPTQ, say): a run
    killed in a later one could not be resumed, its checkpoint's starting weights being
    what the earlier ones made, which a rerun would calibrate again from the start."""
    modifiers = stock.active_session().lifecycle.recipe.modifiers
    infer = stock.CalibrationPipeline.from_modifiers  # as the independent pipeline does
    several = [type(modifier).__name__ for modifier in modifiers
               if isinstance(infer([modifier]), stock.SequentialPipeline)]  # fmt: skip
    if len(several) > 1:
        raise ConfigError(
            "checkpoint_dir cannot checkpoint llm-compressor's independent pipeline "
            "(pipeline='independent', oneshot's default) with more than one modifier that "
            f"calibrates ({', '.join(several)}): it runs a sequential pipeline for each in "
            "turn, and a run killed in a later one could not be resumed. Pass "
            "pipeline='sequential' to oneshot (one checkpointed pipeline calibrates every "
            "modifier, layer by layer), or enable() without checkpoint_dir"
        )


def run_with_checkpoints(
    model: torch.nn.Module,
    dataloader: Any,
    dataset_args: Any,
    *,
    directory: Path,
    cache_class: Callable[[CacheConfig], type],
    config: CacheConfig,
) -> None:
    """The sequential pipeline over ``model``, checkpointed in ``directory``.

    :param cache_class: the switch's cache class for a config (its caches report to
        the switch)
    :param config: the switch's config; the pipeline cache keeps its store in
        ``directory/activations``
    """
    stock = sys.modules[PIPELINE_MODULE]
    session = stock.active_session()
    onload_device = stock.get_main_device()
    offload_device = torch.device(dataset_args.sequential_offload_device)
    stock.set_onload_device(model, onload_device)
    modifiers = session.lifecycle.recipe.modifiers
    if any(type(m).__name__ == "AutoRoundModifier" for m in modifiers):
        dataset_args.propagate_error = False  # as llm-compressor's own pipeline does
    targets = stock.infer_sequential_targets(model, dataset_args.sequential_targets)
    sample_input = next(iter(dataloader))
    subgraphs = stock.trace_subgraphs(model, sample_input, targets, dataset_args.tracing_ignore,
                                      dataset_args.sequential_targets_per_subgraph)  # fmt: skip
    # run_parts reads the dataloader once more than llm-compressor's pipeline does:
    # without undoing its draws, a shuffled run would calibrate other samples.
    with draws_undone(dataloader):
        parts = run_parts(model, dataloader, dataset_args, modifiers, len(subgraphs))
    print_ = checkpoints.fingerprint(parts)
    ranks = Ranks()
    part = ranks.part(directory)
    found, refusal = None, None
    try:
        found = _resumable(part, ranks.world, print_, parts)
    except Exception as error:  # every rank raises it, rather than some waiting forever
        refusal = error
    done = ranks.agree(found, refusal)  # every rank's, or every rank raises

    with contextlib.ExitStack() as stack:
        failed = None
        try:
            kept = cache_class(config.replace(keep_store=True, disk_path=str(part.activations)))
            stock.LifecycleCallbacks.calibration_start()
            stack.enter_context(stock.calibration_forward_context(model))
            stack.enter_context(stock.DisableQuantization(model))
            found = _go_back(ranks, part, found, done)
            activations = _ready(part, found, model, kept, dataloader, onload_device,
                                 offload_device)  # fmt: skip
            # Whatever ends the run, the store stays as the last checkpoint left it:
            # values written since belong to no checkpoint.
            activations._core.keeps_only_flushed = True
            stack.callback(activations.close)
        except Exception as error:
            failed = error
        # The ranks may share the weights: all loaded before any goes on. A rank that
        # failed makes every rank raise.
        ranks.all_ready(failed)
        start, states = (0, []) if found is None else (found.done, list(found.states))
        if getattr(dataset_args, "use_loss_mask", False):
            session.state.loss_masks = [
                activations.fetch(index, ["loss_mask"]).get("loss_mask")
                for index in range(len(dataloader))
            ]
        else:
            session.state.loss_masks = None
        prefetch = getattr(dataset_args, "sequential_prefetch", False)
        session.state.sequential_prefetch = prefetch

        for index in range(start, len(subgraphs)):
            subgraph = subgraphs[index]
            before = checkpoints.TensorCRCs(named_tensors(model, subgraph.submodules(model)))
            _calibrate_subgraph(stock, session, model, subgraph, index, subgraphs, activations,
                                dataset_args, len(dataloader), prefetch)  # fmt: skip
            # Every rank done with the subgraph and with its checkpoint before: what the
            # flush before kept can go, and the weights saved now are final everywhere.
            ranks.wait_for_all()
            activations._core.release_previous()
            changed = before.changed(named_tensors(model, subgraph.submodules(model)))
            states.append(checkpoints.save_states(part, index, changed))
            note = Checkpoint.note(print_, parts, index + 1, len(subgraphs), states)
            activations._core.flush(note={NOTE_KEY: note}, keep_previous=ranks.several)
        stock.LifecycleCallbacks.calibration_end()
    ranks.wait_for_all()  # no rank's part goes while another rank may still need its own
    part.remove()
    left = part.stores()
    if left:
        warnings.warn(f"could not remove {', '.join(map(str, left))}", stacklevel=2)


def _calibrate_subgraph(
    stock, session, model, subgraph, index, subgraphs, activations, dataset_args, batches, prefetch
) -> None:
    """One subgraph's passes, as llm-compressor's own pipeline runs them."""
    count = len(subgraphs)
    last = index == count - 1
    with stock.disable_offloading():
        for batch_index, inputs in _batches(
            stock, activations, batches, subgraph, f"({index + 1}/{count}): Calibrating", prefetch
        ):
            session.state.current_batch_idx = batch_index
            outputs = subgraph.forward(model, **inputs)
            if not dataset_args.propagate_error and not last:
                activations.update(batch_index, outputs)
                activations.delete(batch_index, subgraph.consumed_names)
        stock.LifecycleCallbacks.sequential_epoch_end(subgraph.submodules(model))
        if dataset_args.propagate_error:
            with stock.HooksMixin.disable_hooks():
                for batch_index, inputs in _batches(
                    stock, activations, batches, subgraph,
                    f"({index + 1}/{count}): Propagating", prefetch,
                ):  # fmt: skip
                    output = subgraph.forward(model, **inputs)
                    if not last:
                        activations.update(batch_index, output)
                        activations.delete(batch_index, subgraph.consumed_names)


def _batches(
    stock, activations, batches: int, subgraph, desc: str, prefetch: bool
) -> Iterator[tuple[int, dict]]:
    names = subgraph.input_names
    source = activations.iter_prefetch(names) if prefetch else activations.iter(names)
    yield from enumerate(stock.tqdm(source, total=batches, desc=desc))


@contextlib.contextmanager
def draws_undone(dataloader: Any) -> Iterator[None]:
    """The random numbers drawn by iterating ``dataloader`` inside, given back after: a
    shuffling sampler's permutation and the loader's worker seed (from torch's CPU
    generator, or the sampler's or loader's own), a collate function's (Python's, numpy's).
    Draws in worker processes stay drawn: llm-compressor's collate functions make none."""
    batches = getattr(dataloader, "batch_sampler", None)
    owners = (dataloader, getattr(dataloader, "sampler", None), batches,
              getattr(batches, "sampler", None))  # fmt: skip
    found = {id(g): g for g in (getattr(owner, "generator", None) for owner in owners)}
    states = [(g, g.get_state()) for g in found.values() if isinstance(g, torch.Generator)]
    python, numpys = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for generator, state in states:
                generator.set_state(state)
            random.setstate(python)
            numpy.random.set_state(numpys)


def run_parts(
    model: torch.nn.Module, dataloader: Any, dataset_args: Any, modifiers: list, subgraphs: int
) -> dict[str, str]:
    """What determines the calibration's result, each part a string (the fingerprint's
    parts; a refusal names those that differ)."""
    import llmcompressor  # the switch runs only where it is installed

    config = getattr(model, "config", None)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    samples = (
        (f"{index}.{key}", value)
        for index, batch in enumerate(dataloader)
        for key, value in sorted(batch.items())
    )
    return {
        "model config": config.to_json_string(use_diff=False) if config is not None else "",
        "model weights": checkpoints.digest_tensors(
            (name, tensor)
            for name, tensor in model.state_dict().items()
            if not QUANTIZATION_PARAMETER.search(name)
        ),
        "recipe": repr([repr(modifier) for modifier in modifiers]),
        "calibration samples": checkpoints.digest_tensors(samples),
        "batches": str(len(dataloader)),
        "pipeline": repr({name: getattr(dataset_args, name, None) for name in PIPELINE_SETTINGS}),
        "subgraphs": str(subgraphs),
        "world size": str(world),
        "versions": f"llmcompressor {llmcompressor.__version__}, torch {torch.__version__}, "
        f"spillcache {__version__}",
    }


def _resumable(
    part: checkpoints.Part, world: int, print_: str, parts: dict[str, str]
) -> Checkpoint | None:
    """The committed checkpoint to resume from; None to start afresh; CheckpointError
    for another run's."""
    directory = part.directory
    strays = checkpoints.other_parts(part, world)
    if strays:
        raise CheckpointError(
            f"checkpoint_dir {directory} holds a checkpoint of a run with another number "
            f"of processes, or started otherwise (under torchrun or not), than this one "
            f"({world} process{'es' if world > 1 else ''}, "
            f"{'rank ' + str(part.rank) if part.rank is not None else 'not under torchrun'}"
            f"): {strays[0]}. Use another checkpoint_dir for this run, or remove that "
            "directory to start afresh"
        )
    found = checkpoints.committed(part)
    if found is None or found.fingerprint == print_:
        return found
    differ = checkpoints.describe_difference(found.parts, parts)
    raise CheckpointError(
        f"checkpoint_dir {directory} holds a checkpoint of another calibration "
        f"({found.done} of {found.subgraphs} subgraphs done); what differs: {differ}. "
        "Use another checkpoint_dir for this run, or remove that directory to start afresh"
    )


def _go_back(
    ranks: Ranks, part: checkpoints.Part, found: Checkpoint | None, done: int
) -> Checkpoint | None:
    """This rank's checkpoint as of ``done`` subgraphs (what every rank agreed), with
    the state files no commit names removed."""
    if found is not None and found.done > done:
        _say(
            f"spillcache: rank {ranks.rank} got further than another rank before the "
            f"run ended ({found.done} subgraphs): going back to {done}"
        )
    found = ranks.go_back(part, found, done)
    checkpoints.remove_unnamed_states(part, found)
    if found is None:  # afresh: what runs killed before their first commit left goes
        checkpoints.remove_uncommitted_stores(part)
    return found


def _ready(part, found, model, kept, dataloader, onload_device, offload_device) -> Any:
    """The pipeline's cache: filled from the dataloader, or the checkpoint's store
    reopened once its saved tensors are loaded into the model."""
    if found is None:
        return kept.from_dataloader(dataloader, onload_device, offload_device)
    checkpoints.load_states(part, found, model)
    activations = kept.open(str(found.store))
    _say(
        f"spillcache: resuming from checkpoint_dir {part.directory}: {found.done} of "
        f"{found.subgraphs} subgraphs done, going on with subgraph {found.done + 1}"
    )
    return activations


def _say(message: str) -> None:
    """A line in llm-compressor's log (loguru, which it depends on)."""
    from loguru import logger

    logger.info(message)


# ------------------------------------------------------------------ the ranks


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
