"""IntermediatesCache: llm-compressor's documented cache API over spillcache's tiers."""

from __future__ import annotations

import time
import weakref
from collections import deque
from collections.abc import Collection, Iterator, Mapping
from typing import Any, ClassVar
from weakref import WeakKeyDictionary

import torch
from tqdm import tqdm

from spillcache._internal.process import cleanup
from spillcache._internal.process.resolved import resolve_offload_device
from spillcache._internal.runtime.core import CacheCore
from spillcache._internal.stock.stock_api import (
    BatchIntermediates,
    offload_value,
    onload_value,
    pin_intermediate,
)
from spillcache._internal.tree import IntermediateValue
from spillcache.config import CacheConfig

__all__ = ["IntermediatesCache"]


class IntermediatesCache:
    """Cache of the intermediate values (activations) of batched, sequential execution.

    Values are offloaded when stored and onloaded to their original device when
    fetched, as in llm-compressor. Unlike the stock cache, offloaded values live in a
    bounded host tier and spill to a zarr store on local disk when it is full; see
    :class:`CacheConfig` for the budgets. With ``offload_device=None`` values are not
    offloaded: they stay on their device (CPU values still spill past the host budget).

    :param batch_intermediates: batches to start with, each a dict of name -> value
        (values may be wrapped in :class:`IntermediateValue`, as the stock cache stores them)
    :param offload_device: ``"cpu"`` (the default), ``None``, or an accelerator
    :param config: budgets and paths; default ``default_config``, else ``CacheConfig.from_env()``

    Code written for the stock class finds what it reaches past the methods too:
    ``batch_intermediates`` (a live view, see :class:`BatchIntermediates`),
    ``offload_values``, and the classmethods ``_offload_value``, ``_onload_value`` and
    ``_pin_intermediate``.
    """

    #: The config of a cache built without one. None: ``CacheConfig.from_env()``, read
    #: when each cache is built. The llm-compressor integration binds a subclass that
    #: sets it, because llm-compressor builds its caches without a config.
    default_config: ClassVar[CacheConfig | None] = None

    #: The stock class's map of a tensor to its offloaded copy, shared by every cache
    #: of the class, used by ``_offload_value`` (a tensor offloaded twice is copied once).
    #: The cache itself stores a tensor given twice once, in its tiers.
    offload_values: ClassVar[WeakKeyDictionary] = WeakKeyDictionary()

    def __init__(
        self,
        batch_intermediates: list[dict[str, Any]] | None = None,
        offload_device: torch.device | str | None = "cpu",
        *,
        config: CacheConfig | None = None,
    ) -> None:
        if config is not None and not isinstance(config, CacheConfig):
            raise TypeError(
                f"config must be a CacheConfig, got {type(config).__name__}; build one with "
                "CacheConfig(...), CacheConfig.from_file(path) or CacheConfig.from_env()"
            )
        self.offload_device = resolve_offload_device(offload_device)
        self._start(CacheCore(config or self._config_for_new_cache(), self.offload_device))
        for values in batch_intermediates or []:
            self._core.append(values)

    def _start(self, core: CacheCore) -> None:
        self._core = core
        # Runs on close(), on garbage collection and at interpreter exit, whichever
        # comes first: callers such as llm-compressor never call close().
        self._finalizer = weakref.finalize(self, core.close_collected)
        cleanup.on_new_cache(core.config, core.pool.disk_dirs)  # signal handlers, sweep

    @classmethod
    def _config_for_new_cache(cls) -> CacheConfig:
        return cls.default_config or CacheConfig.from_env()

    # -------------------------------------------------------------- builders

    @classmethod
    def empty(
        cls,
        num_batches: int,
        offload_device: torch.device | str | None,
        *,
        config: CacheConfig | None = None,
    ) -> IntermediatesCache:
        """A cache of ``num_batches`` empty batches."""
        cache = cls(None, offload_device, config=config)
        cache._core.add_batches(num_batches)
        return cache

    @classmethod
    def from_dataloader(
        cls,
        dataloader: Any,
        model_device: torch.device | str = torch.device("cpu"),
        offload_device: torch.device | str | None = torch.device("cpu"),
        *,
        config: CacheConfig | None = None,
    ) -> IntermediatesCache:
        """A cache holding every batch of ``dataloader``; values onload to ``model_device``."""
        model_device = torch.device(model_device)
        cache = cls(None, offload_device, config=config)
        for batch in tqdm(dataloader, desc="Preparing intermediates cache"):
            if not isinstance(batch, Mapping):
                raise TypeError(
                    f"from_dataloader needs batches that are dicts of name -> value, got "
                    f"{type(batch).__name__}; wrap the dataset to yield dicts"
                )
            cache._core.append(batch, onload_device=model_device)
        return cache

    @classmethod
    def open(cls, path: str, config: CacheConfig | None = None) -> IntermediatesCache:
        """Reopen a store kept by a cache with ``keep_store = true``: the same batches,
        keys and values, read-write; values come back on the devices they were stored
        from (the CPU where that device is absent). The store is kept (and marked
        complete again) when this cache closes.

        A store whose process died before closing it (SIGKILL, a power cut) opens with
        every entry its last ``flush()`` recorded, bit for bit; what was written after
        that flush is dropped and removed, and a warning says what. Refuses a store whose
        process still runs (it is that cache's), a damaged store (``StoreCorruptError``
        naming the batch and key) and a format version this spillcache does not know.
        Never runs code from the store: dataclasses and namedtuples it names are rebuilt
        field by field, without calling their constructors."""
        from spillcache._internal.runtime.reopen import reopen

        cache = cls.__new__(cls)
        cache.offload_device = torch.device("cpu")
        cache._start(reopen(path, config or cls._config_for_new_cache()))
        return cache

    # ------------------------------------------------------------ documented

    def fetch(self, batch_index: int, input_names: Collection[str] | None = None) -> dict[str, Any]:
        """The batch's values (those named in ``input_names``, absent names skipped)."""
        return self._core.fetch(batch_index, input_names)

    def update(self, batch_index: int, values: dict[str, Any]) -> None:
        """Store ``values`` in a batch, replacing values of the same names."""
        self._core.update(batch_index, values)

    def delete(self, batch_index: int, consumed_names: Collection[str] | None = None) -> None:
        """Delete the named values of a batch (all of them by default)."""
        self._core.delete(batch_index, consumed_names)

    def append(self, values: dict[str, Any]) -> None:
        """Store ``values`` as a new batch at the next index."""
        self._core.append(values)

    def size(self) -> dict[torch.device, int]:
        """Bytes of memory used by cached values, keyed by device (disk not included)."""
        return self._core.size()

    def iter(self, input_names: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
        """Fetch every batch in order."""
        for batch_index in range(len(self)):
            yield self.fetch(batch_index, input_names)

    def iter_prefetch(self, input_names: Collection[str] | None = None) -> Iterator[dict[str, Any]]:
        """Like :meth:`iter`, with the next ``prefetch_depth`` batches fetched on a
        background thread. A batch updated or deleted after it was prefetched is fetched
        again, so this always yields what :meth:`iter` would."""
        depth = self._core.config.prefetch_depth
        if depth == 0:
            yield from self.iter(input_names)
            return
        count = len(self)
        pending: deque = deque()
        next_index = 0
        try:
            for batch_index in range(count):
                while next_index < count and len(pending) < depth:
                    pending.append(self._core.submit_fetch(next_index, input_names))
                    next_index += 1
                start = time.perf_counter()
                generation, values, ready, read = pending.popleft().result()
                self._core.add_stall(time.perf_counter() - start)
                self._core.mark_read(batch_index, read)
                if generation != self._core.generation(batch_index):
                    ready.let_go()  # not used: its copies' sources go once they ran
                    values = self.fetch(batch_index, input_names)
                elif ready:
                    ready.wait()  # the consumer's stream waits for the side-stream copies
                yield values
        finally:
            for future in pending:
                future.cancel()
                future.add_done_callback(_let_go_unused)

    def pin_memory(self, batch_index: int, input_names: Collection[str] | None = None) -> None:
        """Bring a batch's values up to host RAM so that onloading them is fast."""
        self._core.prepare(batch_index, input_names)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter()

    # ------------------------------------------------------- stock attributes

    @property
    def batch_intermediates(self) -> BatchIntermediates:
        """The batches as the stock class's list of ``{key: IntermediateValue}``: a live
        view. Keys and ``in`` cost nothing; reading a value builds its IntermediateValue
        tree from what the cache holds, which reads a spilled tensor from disk."""
        return BatchIntermediates(self)

    @batch_intermediates.setter
    def batch_intermediates(self, batches: Any) -> None:
        raise AttributeError(
            "a spillcache cache's batch_intermediates cannot be replaced: build a new "
            "IntermediatesCache(batch_intermediates), or change batches with "
            "update/delete/append"
        )

    @classmethod
    def _offload_value(
        cls,
        value: Any,
        offload_device: torch.device | str | None,
        onload_device: torch.device | str | None = None,
    ) -> IntermediateValue:
        """``value`` as an IntermediateValue tree, its tensors moved to ``offload_device``
        (once per tensor: ``offload_values``), each recording its onload device
        (``onload_device``, else where it was). Stores nothing in any cache."""
        return offload_value(value, offload_device, onload_device, cls.offload_values)

    @classmethod
    def _onload_value(cls, intermediate: IntermediateValue) -> Any:
        """The value an IntermediateValue tree stands for, tensors on their onload devices."""
        return onload_value(intermediate)

    @classmethod
    def _pin_intermediate(cls, intermediate: IntermediateValue) -> None:
        """Pin the CPU tensors of an IntermediateValue tree in place (needs an
        accelerator, as ``Tensor.pin_memory`` does). A tree shown by
        ``batch_intermediates`` is read-only: ``pin_memory(batch_index)`` pins a batch."""
        pin_intermediate(intermediate)

    def __len__(self) -> int:
        return self._core.num_batches()

    # ------------------------------------------------------------ spillcache

    @property
    def config(self) -> CacheConfig:
        return self._core.config

    @property
    def store_path(self) -> str | None:
        """The directory of this cache's store, once something was written to disk."""
        return self._core.store_path()

    def stats(self) -> dict[str, Any]:
        """Per tier (device, host, disk): bytes held, budget, hits, misses, bytes read and
        written, evictions; the write-behind area; and ``stall_seconds``, the time the
        caller spent waiting for I/O. Cheap: counters kept as the cache works."""
        return self._core.stats()

    def flush(self) -> None:
        """Wait until every background disk write is done; raise any write error."""
        self._core.flush()

    def close(self) -> None:
        """Join background threads and delete the store (or, with keep_store, complete it)."""
        if self._finalizer.detach() is not None:  # not closed yet (here or by collection)
            self._core.close()

    def __enter__(self) -> IntermediatesCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"IntermediatesCache(batches={len(self)}, offload_device={self.offload_device}, "
            f"store={self.store_path})"
        )


def _let_go_unused(future) -> None:
    """A prefetch the iteration left unused: the host sources of its copies go once
    those ran (``Ready.let_go``)."""
    if not future.cancelled() and future.exception() is None:
        future.result().ready.let_go()
