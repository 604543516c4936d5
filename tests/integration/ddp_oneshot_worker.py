"""One rank of llm-compressor's data-parallel ``oneshot``, logging what its cache saw.

Run by ``tests/integration/test_ddp_oneshot.py`` under torchrun::

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/integration/ddp_oneshot_worker.py --out OUT --spill-root SPILL \\
        --work WORK --runs stock spillcache spillcache-prefetch

llm-compressor 0.14 has no switch for data parallelism: it is on when a process group
is initialised (``compressed_tensors.distributed.is_distributed()`` is
``torch.distributed.is_initialized()``). Then GPTQ sums each module's Hessian over the
ranks (``dist.reduce`` to the rank that compresses the module) and the ranks share the
compressed weights. compressed-tensors' ``init_dist()`` would make the group, but it
needs an accelerator; so this worker makes a gloo group itself from torchrun's
environment before the first ``oneshot``.

Each rank passes ``oneshot`` its own share of the samples, rank r of w the samples
``[n*r//w, n*(r+1)//w)``, as llm-compressor's DDP examples do with
``get_rank_partition``. (0.14 also splits a dataset that is identical on every rank by
itself, but wrongly: ``_make_sampler`` builds the sampler over the rank's
``dataset.select(...)`` while the DataLoader keeps the whole dataset, so the sampler's
indices 0..n/w-1 give every rank the *first* n/w samples.)

Each run (a name of ``RUNS``) calibrates the tiny Llama of ``tests/tiny_llama.py`` with
GPTQ W4A16 and the sequential pipeline, with the stock cache or through spillcache's
``enable()`` with a host budget of one batch's hidden states and ``inline_bytes = 0``
(so nearly every value is spilled to disk); a ``-barrier`` run also makes the ranks
wait for each other after each layer's compression (``gptq_barrier``). Every call the
pipeline makes on its cache is logged, with a digest of every value stored and returned
(sha256 over type, dtype, shape, device and the raw bytes), and written with the run's
cache stats, store paths and weight digests to ``OUT/<run>/rank<R>.json``. Runs share
the process (one import of llm-compressor, one process group), one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import hashlib
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tiny_llama, spill_testing

from spill_testing import bits  # noqa: E402
from tiny_llama import (  # noqa: E402
    SAMPLES,
    SEQ_LEN,
    calibration_samples,
    gptq_recipe,
    hidden_state_bytes,
    in_memory_tokenizer,
    tiny_llama,
)

# name: (cache, sequential_prefetch, ms slept in each fetch, wait after GPTQ compresses)
RUNS = {}
for _name, _spec in {
    "stock": ("stock", False, 0),
    "stock-prefetch": ("stock", True, 0),
    "stock-slow-fetch": ("stock", False, 20),  # the timing experiment of the docs
    "spillcache": ("spillcache", False, 0),
    "spillcache-prefetch": ("spillcache", True, 0),
}.items():
    RUNS[_name] = (*_spec, False)
    # With a barrier after each layer's compression: see gptq_barrier().
    RUNS[f"{_name}-barrier"] = (*_spec, True)


# ------------------------------------------------------------------ digests


def digest(value: Any) -> str:
    """A digest of a value as the pipeline sees it: structure, dtypes, shapes, bytes."""
    hasher = hashlib.sha256()
    _feed(hasher, value)
    return hasher.hexdigest()[:24]


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        header = f"tensor|{value.dtype}|{tuple(value.shape)}|{value.device.type}|"
        hasher.update(header.encode())
        hasher.update(bits(value))
    elif isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__}|{len(value)}|".encode())
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, dict):
        hasher.update(f"dict|{len(value)}|".encode())
        for key in sorted(value, key=repr):
            hasher.update(f"{key!r}=".encode())
            _feed(hasher, value[key])
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        hasher.update(f"{type(value).__qualname__}|".encode())
        for field in dataclasses.fields(value):
            hasher.update(f"{field.name}=".encode())
            _feed(hasher, getattr(value, field.name))
    else:
        hasher.update(f"{type(value).__qualname__}|{value!r}|".encode())


def digests(values: dict[str, Any]) -> dict[str, str]:
    return {key: digest(value) for key, value in values.items()}


# ------------------------------------------------------------------ recording


class Recorder:
    """Wraps a cache class's methods (in place) and logs every call on its caches.

    Logged, in the order the pipeline sees them:

    - ``store``: a batch's values as handed to ``from_dataloader``/``update``/``append``
      (digests taken before the cache gets them);
    - ``delete``: the names deleted from a batch (None: all);
    - ``fetch``: the names asked for and the digests of what came back, for ``fetch``
      and for every batch ``iter``/``iter_prefetch`` yielded (when it is yielded; the
      fetches those make inside, on any thread, are not logged twice).
    """

    METHODS = ("from_dataloader", "empty", "update", "append", "delete", "fetch", "iter",
               "iter_prefetch")  # fmt: skip

    def __init__(self, cls: type, fetch_delay_s: float = 0.0) -> None:
        self.cls = cls
        self.fetch_delay_s = fetch_delay_s
        self.events: list[dict[str, Any]] = []
        self.batches: dict[int, int] = {}  # cache id -> batches it was built with
        self.store_paths: dict[int, str] = {}  # cache id -> its store, once it has one
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._originals = {name: cls.__dict__.get(name) for name in self.METHODS}
        self._install()

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            if original is None:
                delattr(self.cls, name)
            else:
                setattr(self.cls, name, original)

    # -- helpers

    def _log(self, **event: Any) -> None:
        with self._lock:
            self.events.append(event)

    def _id(self, cache: Any) -> int:
        if "_ddp_test_id" not in vars(cache):
            cache._ddp_test_id = next(self._ids)
        return cache._ddp_test_id

    def _note_store(self, cache: Any) -> None:
        path = getattr(cache, "store_path", None)  # spillcache only: a property
        if isinstance(path, str):
            self.store_paths.setdefault(self._id(cache), path)

    def _log_fetch(self, cache: Any, batch: int, names: Any, values: dict[str, Any]) -> None:
        self._log(
            op="fetch",
            cache=self._id(cache),
            batch=batch,
            names=None if names is None else sorted(names),
            values=digests(values),
        )

    # -- the wrappers

    def _install(self) -> None:
        recorder = self
        cls = self.cls
        from_dataloader = cls.from_dataloader.__func__
        empty = cls.empty.__func__
        update, append, delete = cls.update, cls.append, cls.delete
        fetch, iter_, iter_prefetch = cls.fetch, cls.iter, cls.iter_prefetch

        class LoggedLoader:
            """The dataloader, logging each batch as a store into the new cache."""

            def __init__(self, loader: Any, cache_id: int) -> None:
                self.loader, self.cache_id = loader, cache_id

            def __len__(self) -> int:
                return len(self.loader)

            def __iter__(self):
                for batch_index, batch in enumerate(self.loader):
                    recorder._log(
                        op="store", cache=self.cache_id, batch=batch_index, values=digests(batch)
                    )
                    yield batch

        @classmethod
        @functools.wraps(from_dataloader)
        def from_dataloader_logged(klass, dataloader, *args, **kwargs):
            cache_id = next(recorder._ids)
            cache = from_dataloader(klass, LoggedLoader(dataloader, cache_id), *args, **kwargs)
            cache._ddp_test_id = cache_id
            recorder.batches[cache_id] = len(cache)
            recorder._note_store(cache)
            return cache

        @classmethod
        @functools.wraps(empty)
        def empty_logged(klass, num_batches, *args, **kwargs):
            cache = empty(klass, num_batches, *args, **kwargs)
            recorder.batches[recorder._id(cache)] = num_batches
            return cache

        @functools.wraps(update)
        def update_logged(self, batch_index, values):
            if not vars(self).get("_ddp_test_appending"):  # the stock append updates
                recorder._log(
                    op="store", cache=recorder._id(self), batch=batch_index, values=digests(values)
                )
            update(self, batch_index, values)
            recorder._note_store(self)

        @functools.wraps(append)
        def append_logged(self, values):
            recorder._log(
                op="store", cache=recorder._id(self), batch=len(self), values=digests(values)
            )
            self._ddp_test_appending = True
            try:
                append(self, values)
            finally:
                self._ddp_test_appending = False
            recorder._note_store(self)

        @functools.wraps(delete)
        def delete_logged(self, batch_index, consumed_names=None):
            names = None if consumed_names is None else sorted(consumed_names)
            recorder._log(op="delete", cache=recorder._id(self), batch=batch_index, names=names)
            delete(self, batch_index, consumed_names)

        @functools.wraps(fetch)
        def fetch_logged(self, batch_index, input_names=None):
            if recorder.fetch_delay_s:
                time.sleep(recorder.fetch_delay_s)
            values = fetch(self, batch_index, input_names)
            if not vars(self).get("_ddp_test_iterating"):
                recorder._log_fetch(self, batch_index, input_names, values)
            return values

        def iteration(original):
            @functools.wraps(original)
            def logged(self, input_names=None):
                self._ddp_test_iterating = vars(self).get("_ddp_test_iterating", 0) + 1
                try:
                    for batch_index, values in enumerate(original(self, input_names)):
                        recorder._log_fetch(self, batch_index, input_names, values)
                        yield values
                finally:
                    self._ddp_test_iterating -= 1

            return logged

        cls.from_dataloader = from_dataloader_logged
        cls.empty = empty_logged
        cls.update = update_logged
        cls.append = append_logged
        cls.delete = delete_logged
        cls.fetch = fetch_logged
        cls.iter = iteration(iter_)
        cls.iter_prefetch = iteration(iter_prefetch)


# ------------------------------------------------------------------ one run


def share(rank: int, world: int) -> range:
    """The samples rank ``rank`` of ``world`` calibrates."""
    return range(SAMPLES * rank // world, SAMPLES * (rank + 1) // world)


def calibrate_share(
    config_dir: Path, samples: range, *, prefetch: bool, layers: int = 2
) -> dict[str, torch.Tensor]:
    """``tiny_llama.calibrate`` for one rank: GPTQ over its share of the samples."""
    from llmcompressor import oneshot

    model = oneshot(
        model=tiny_llama(config_dir, layers=layers),
        processor=in_memory_tokenizer(),
        dataset=calibration_samples().select(samples),
        recipe=gptq_recipe(),
        pipeline="sequential",
        num_calibration_samples=len(samples),
        max_seq_length=SEQ_LEN,
        shuffle_calibration_samples=False,
        sequential_prefetch=prefetch,
    )
    # The ranks share the weights' memory, and oneshot returns on one rank while another
    # may still be writing the last layer's modules: read them once every rank is done.
    dist.barrier()
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    del model
    gc.collect()  # llm-compressor never closes its caches: collecting them frees their files
    return state


def run(name: str, out: Path, spill_root: Path, work: Path, rank: int, world: int) -> None:
    from llmcompressor.pipelines import cache as stock_module

    from spillcache.integrations import llmcompressor as integration

    kind, prefetch, delay_ms, barrier = RUNS[name]
    samples = share(rank, world)
    record: dict[str, Any] = {"run": name, "rank": rank, "world_size": world, "cache": kind,
                              "prefetch": prefetch, "samples": [samples.start, samples.stop],
                              "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}  # fmt: skip
    switch = None
    if kind == "spillcache":
        disk_path = spill_root / name
        disk_path.mkdir(parents=True, exist_ok=True)
        # A host budget of one batch's hidden states (under torchrun, spillcache may
        # divide it among the node's ranks); every tensor is chunked (inline 0).
        host_bytes = hidden_state_bytes(samples=1)
        switch = integration.enable(host_bytes=host_bytes, disk_path=str(disk_path), inline_bytes=0)
        cls = switch.cache_class
        record.update(disk_path=str(disk_path), host_bytes=host_bytes)
    else:
        cls = stock_module.IntermediatesCache
    recorder = Recorder(cls, fetch_delay_s=delay_ms / 1000)
    start = time.perf_counter()
    try:
        with gptq_barrier(barrier):
            weights = calibrate_share(work / name / f"rank{rank}", samples, prefetch=prefetch)
    finally:
        recorder.uninstall()
        if switch is not None:
            switch.disable()
    record["seconds"] = time.perf_counter() - start
    gc.collect()  # calibrate_share() collects too: every cache llm-compressor dropped is closed
    record.update(
        events=recorder.events,
        batches=recorder.batches,
        store_paths={str(k): v for k, v in recorder.store_paths.items()},
        stores_left=[p for p in recorder.store_paths.values() if os.path.exists(p)],
        weights=digests(weights),
    )
    if switch is not None:
        record["stats"] = switch.stats()
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    if rank == 0 and os.environ.get("DDP_TEST_SAVE_WEIGHTS"):
        torch.save(weights, out / name / "rank0-weights.pt")


@contextlib.contextmanager
def gptq_barrier(on: bool) -> Iterator[None]:
    """With ``on``: after GPTQ compressed a layer's modules, every rank waits until all
    ranks are done before the pipeline propagates through the layer. llm-compressor
    0.14 does not wait there, and on CPU the ranks share the weights' memory (each rank
    writes the modules it compressed), so a rank can propagate batches through a layer
    whose other modules another rank is still writing: what it stores then depends on
    timing. docs/llmcompressor.md, "Data-parallel calibration", has the experiment."""
    if not on:
        yield
        return
    from llmcompressor.modifiers.gptq.base import GPTQModifier

    compress_modules = GPTQModifier.compress_modules

    @functools.wraps(compress_modules)
    def compress_then_wait(self, *args, **kwargs):
        compress_modules(self, *args, **kwargs)
        dist.barrier()

    GPTQModifier.compress_modules = compress_then_wait
    try:
        yield
    finally:
        GPTQModifier.compress_modules = compress_modules


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where the logs go")
    parser.add_argument("--spill-root", type=Path, required=True,
                        help="spillcache runs use <spill-root>/<run> as disk_path")  # fmt: skip
    parser.add_argument("--work", type=Path, required=True, help="model config dirs")
    parser.add_argument("--runs", nargs="+", choices=sorted(RUNS), required=True)
    args = parser.parse_args()

    # torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, ...): init_method env://.
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert SAMPLES % world == 0, (SAMPLES, world)
    try:
        for name in args.runs:
            run(name, args.out, args.spill_root, args.work, rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main()
