"""The state of one cache: batches of entries over the tiers, behind one lock.

``CacheCore`` owns everything a cache holds (entries, tiers, store, worker) and is
what the garbage-collection finalizer closes, so it must never refer back to the
public ``IntermediatesCache`` object.
"""

from __future__ import annotations

import operator
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from . import dtypes, reads, stats
from .config import AUTO, CacheConfig
from .entries import Entry, InlineTensor
from .entries import records_of as _records_of
from .errors import CacheClosedError, ConfigError, StoreCorruptError, StoreError
from .format import Store
from .io import READ, WRITE, IOPool
from .persist import persist
from .placement import Placement, TensorRecord
from .sysinfo import RAM_BACKED, available_ram, filesystem_type
from .tiers import DiskTier
from .transfers import Ready, Transfers
from .tree import flatten, unflatten

__all__ = ["CacheCore", "resolve_offload_device"]

CPU = torch.device("cpu")


def resolve_offload_device(offload_device: Any) -> torch.device | None:
    if offload_device is None:
        return None
    try:
        return torch.device(offload_device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"offload_device: {offload_device!r} is not a torch device; use 'cpu' "
            "(offload to host RAM, spilling to disk), None (keep values where they are) "
            "or an accelerator such as 'cuda:0'"
        ) from error


class CacheCore:
    """Batches of ``key -> Entry`` whose tensors live in a ``Placement``.

    One lock guards all of it. Disk I/O runs outside the lock: writes on the I/O
    pool (write-behind), reads on whichever thread needs the value (the caller, or a
    prefetch job on the pool), with the record held so it cannot be deleted meanwhile.
    """

    def __init__(self, config: CacheConfig, offload_device: torch.device | None) -> None:
        self.config = config
        self.offload_device = offload_device
        accelerator = offload_device if offload_device and offload_device.type != "cpu" else None
        device_budget = config.device_bytes
        if device_budget == AUTO:
            device_budget = 0 if offload_device is not None and accelerator is None else None
        host_budget = config.host_bytes
        if host_budget == AUTO:
            host_budget = available_ram() // 2
        disk_dir = config.disk_path
        if disk_dir == AUTO:
            disk_dir = tempfile.gettempdir()
        if disk_dir is not None and filesystem_type(disk_dir) in RAM_BACKED:
            warnings.warn(
                f"spillcache's disk tier is at {disk_dir}, which is RAM-backed "
                f"({filesystem_type(disk_dir)}): spilled values still use RAM. Set disk_path "
                "(or SPILLCACHE_DISK_PATH) to a directory on a local disk",
                stacklevel=4,
            )
        if config.keep_store and disk_dir is None:
            raise ConfigError("keep_store: there is no disk tier to keep; set disk_path too")
        disk = None
        if disk_dir is not None:
            disk = DiskTier(
                config.disk_bytes,
                lambda: Store.create(
                    disk_dir,
                    direct_io=config.direct_io,
                    writers=config.io_threads,
                    read_buffer_bytes=config.read_buffer_bytes,
                    checksum=config.checksum,
                ),
            )
        self.transfers = Transfers()
        self.placement = Placement(
            device_budget=device_budget,
            device_target=accelerator,
            host_budget=host_budget,
            disk=disk,
            eviction=config.eviction,
            pin_host=torch.cuda.is_available(),
            write_behind_budget=config.write_behind_bytes,
            transfers=self.transfers,
        )
        self._lock = threading.Lock()
        # Notified whenever a background write finishes (backpressure, flush, close).
        self._write_finished = threading.Condition(self._lock)
        self._batches: list[dict[str, Entry]] = []
        self._generations: list[int] = []
        self._write_errors: list[StoreError] = []  # not yet raised to the caller
        self._deleting: set[str] = set()  # arrays whose background deletion is not done
        self._stall_seconds = 0.0
        self._closed = False
        self.io = IOPool("spillcache-io", config.io_threads)

    # --------------------------------------------------------------- helpers

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError(
                "this cache is closed; create a new one (or reopen a kept store)"
            )
        if self._write_errors:
            raise self._write_errors.pop(0)

    def _index(self, batch_index: Any) -> int:
        index = operator.index(batch_index)
        count = len(self._batches)
        if not -count <= index < count:
            raise IndexError(
                f"batch index {batch_index} is out of range: the cache has {count} batches"
            )
        return index % count

    def _offload_inline(self, tensor: torch.Tensor) -> torch.Tensor:
        """Where a tensor that stays with its entry is kept (one that cannot tier stays as is)."""
        if not dtypes.is_tierable(tensor):
            return tensor
        if self.offload_device is None:
            return tensor.detach()
        if self.offload_device.type == "cpu":
            return dtypes.to_host(tensor.detach())
        return dtypes.move(tensor.detach(), self.offload_device)

    # ---------------------------------------------------------- write-behind

    def _submit_writes(self) -> None:
        """Hand the writes and deletions placement queued to the I/O pool (lock held).

        Deleting a chunk file (freeing its extents) takes milliseconds: not on the
        caller's thread, and not under the lock.
        """
        for record, tensor in self.placement.take_writes():
            self.io.submit(WRITE, self._write, record, tensor)
        for name in self.placement.take_deletions():
            self._deleting.add(name)
            self.io.submit(WRITE, self._delete, name)

    def _delete(self, name: str) -> None:
        self.placement.disk.store.delete_tensor(name)
        with self._lock:
            self._deleting.discard(name)

    def _write(self, record: TensorRecord, tensor: torch.Tensor) -> None:
        """A background write: the file outside the lock, the bookkeeping inside it."""
        error: BaseException | None = None
        try:
            self.placement.disk.store.write_tensor(record.array, tensor)
        except BaseException as caught:  # reported to the caller, never lost on this thread
            error = caught
        with self._lock:
            if self.placement.write_done(record, error):
                self._write_errors.append(
                    StoreError(
                        getattr(error, "errno", None),
                        f"writing {record.label} ({record.nbytes} bytes) to disk failed: "
                        f"{error}. The value stays readable from RAM; free space under "
                        "disk_path (or set disk_path elsewhere) for later values",
                    )
                )
            self._write_finished.notify_all()

    def _wait_for_write_room(self) -> None:
        """Backpressure: wait (lock held, released while waiting) until write-behind has room."""
        budget = self.config.write_behind_bytes
        placement = self.placement
        if placement.pending_bytes <= budget:
            return
        self._wait_for_writes(lambda: self._closed or placement.pending_bytes <= budget)
        self._check_open()

    def _wait_for_writes(self, done: Callable[[], bool]) -> None:
        """Lock held (released while waiting): wait until ``done()``, re-checked after
        each finished background write; the wait is the caller's stall."""
        start = time.perf_counter()
        self._write_finished.wait_for(done)
        self._stall_seconds += time.perf_counter() - start

    def flush(self) -> None:
        """Wait for every background write; raise the first write error not yet raised."""
        with self._lock:
            if self._closed:
                raise CacheClosedError("this cache is closed")
            self._wait_for_writes(lambda: self.placement.writes_in_flight == 0)
            if self._write_errors:
                raise self._write_errors.pop(0)

    # ----------------------------------------------------------------- write

    def adopt_batches(self, batches: list[dict[str, Entry]]) -> None:
        """Start from batches read back from a store (a reopened cache)."""
        with self._lock:
            self._batches.extend(batches)
            self._generations.extend(0 for _ in batches)

    def num_batches(self) -> int:
        with self._lock:
            return len(self._batches)

    def add_batches(self, count: int) -> None:
        with self._lock:
            self._check_open()
            self._batches.extend({} for _ in range(count))
            self._generations.extend(0 for _ in range(count))

    def append(self, values: dict[str, Any], onload_device: torch.device | None = None) -> int:
        """Store ``values`` as a new last batch; on error the cache is unchanged."""
        with self._lock:
            self._check_open()
            self._wait_for_write_room()
            self._batches.append({})
            self._generations.append(0)
            try:
                self._update_locked(len(self._batches) - 1, values, onload_device)
            except BaseException:
                self._batches.pop()
                self._generations.pop()
                raise
            finally:
                self._submit_writes()
            return len(self._batches) - 1

    def update(self, batch_index: int, values: dict[str, Any]) -> None:
        with self._lock:
            self._check_open()
            index = self._index(batch_index)
            self._wait_for_write_room()
            try:
                self._update_locked(index, values, None)
            finally:
                self._submit_writes()

    def _update_locked(self, index: int, values: Any, onload_device: torch.device | None) -> None:
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict of name -> value, got {type(values).__name__}")
        for key in values:
            if not isinstance(key, str):
                raise TypeError(f"keys must be str, got {key!r} ({type(key).__name__})")
        flats = {key: flatten(value, onload_device) for key, value in values.items()}
        tiered = {
            key: [self._is_tiered(leaf.tensor) for leaf in flat.tensors]
            for key, flat in flats.items()
        }
        to_admit, labels = [], []
        for key, flat in flats.items():
            for leaf, is_tiered in zip(flat.tensors, tiered[key], strict=True):
                if is_tiered:
                    to_admit.append((leaf.tensor, leaf.onload_device))
                    labels.append(f"batch {index}, key {key!r}")
        records = iter(self.placement.admit(to_admit, batch=index, labels=labels))
        batch = self._batches[index]
        replaced: list[TensorRecord] = []
        for key, flat in flats.items():
            leaves: list[TensorRecord | InlineTensor] = []
            for leaf, is_tiered in zip(flat.tensors, tiered[key], strict=True):
                if is_tiered:
                    leaves.append(next(records))
                else:
                    offloaded = self._offload_inline(leaf.tensor)
                    leaves.append(
                        InlineTensor(offloaded, leaf.onload_device, leaf.tensor.requires_grad)
                    )
            if key in batch:
                replaced.extend(_records_of(batch[key]))
            batch[key] = Entry(flat.spec, leaves, flat.opaques)
        self.placement.release(replaced)
        self._generations[index] += 1

    def _is_tiered(self, tensor: torch.Tensor) -> bool:
        if not dtypes.is_tierable(tensor):
            warnings.warn(
                f"spillcache keeps {tensor.dtype} tensors with layout {tensor.layout} "
                f"({type(tensor).__name__}) in RAM as they are; only dense tensors spill",
                stacklevel=5,
            )
            return False
        return tensor.nbytes >= self.config.inline_bytes

    def delete(self, batch_index: int, consumed_names: Iterable[str] | None) -> None:
        with self._lock:
            self._check_open()
            index = self._index(batch_index)
            batch = self._batches[index]
            # A name given twice is one name: deleting it once is all that was asked.
            names = list(batch) if consumed_names is None else list(dict.fromkeys(consumed_names))
            missing = [name for name in names if name not in batch]
            if missing:
                raise KeyError(
                    f"batch {batch_index} has no value(s) named {missing}; nothing was deleted"
                )
            for name in names:
                self.placement.release(list(_records_of(batch.pop(name))))
            self._generations[index] += 1

    # ------------------------------------------------------------------ read

    def fetch(self, batch_index: int, input_names: Collection[str] | None) -> dict[str, Any]:
        return self.fetch_versioned(batch_index, input_names)[1]

    def fetch_versioned(
        self, batch_index: int, input_names: Collection[str] | None, *, by_reader: bool = True
    ) -> tuple[int, dict[str, Any], Ready]:
        """The batch's values, its generation (bumped by every update and delete), and the
        device copies still in flight (only for prefetch: ``Ready.wait()`` before use).

        ``by_reader`` is False for prefetch jobs: they read ahead of the caller, so they
        neither move the scan policy's position nor count as the caller's stall, and they
        onload on a side stream.
        """
        with self._lock:
            self._check_open()
            index = self._index(batch_index)
            if by_reader:
                self.placement.reached(index, len(self._batches))
            generation = self._generations[index]
            entries = _selected(self._batches[index], input_names)
            loads = reads.plan(self.placement, _records_in(entries))
        tensors = self._finish_loads(loads, by_reader=by_reader)
        ready = Ready()
        side = None if by_reader else ready
        values = {key: self._assemble(entry, tensors, side) for key, entry in entries}
        return generation, values, ready

    def mark_read(self, batch_index: int) -> None:
        """The caller took a prefetched batch: the scan policy's position moves to it."""
        with self._lock:
            self.placement.reached(self._index(batch_index), len(self._batches))

    def generation(self, batch_index: int) -> int:
        with self._lock:
            return self._generations[self._index(batch_index)]

    def submit_fetch(self, batch_index: int, input_names: Collection[str] | None) -> Future:
        return self.io.submit(READ, self._prefetch, batch_index, input_names)

    def _prefetch(self, batch_index: int, input_names: Collection[str] | None) -> tuple:
        return self.fetch_versioned(batch_index, input_names, by_reader=False)

    def add_stall(self, seconds: float) -> None:
        with self._lock:
            self._stall_seconds += seconds

    def _finish_loads(self, loads: reads.Loads, *, by_reader: bool, asked: bool = False) -> dict:
        """Read what ``loads`` holds (lock NOT held), then promote and release under it."""
        if not loads.held:
            return loads.found
        start = time.perf_counter()
        error = reads.read(loads, self._read_record)
        with self._lock:
            for record in loads.to_read:
                record.loading = None
                if record.rid in loads.read:
                    promote = not self._maps(record)
                    self.placement.read_done(
                        record, loads.read[record.rid], promote=promote, asked=asked
                    )
            self.placement.release(loads.held)
            self._submit_writes()
            if by_reader:
                self._stall_seconds += time.perf_counter() - start
        if error is not None:
            raise error
        return {**loads.found, **loads.read}

    def _maps(self, record: TensorRecord) -> bool:
        """read_mode "mmap": a value for the CPU is mapped, not read (nor promoted)."""
        return self.config.read_mode == "mmap" and record.onload_device.type == "cpu"

    def _read_record(self, record: TensorRecord) -> torch.Tensor:
        pin = self.placement.pin_host and record.onload_device.type != "cpu"
        try:
            return self.placement.disk.store.read_tensor(
                record.array, record.shape, record.dtype, pin=pin, mapped=self._maps(record)
            )
        except StoreCorruptError as error:  # name the entry, not just the file
            raise StoreCorruptError(f"{record.label}: {error}") from None

    def _assemble(self, entry: Entry, tensors: dict[int, torch.Tensor], ready: Ready | None) -> Any:
        onload = self.transfers.onload
        leaves = [
            onload(tensors[leaf.rid], leaf.onload_device, leaf.requires_grad, ready)
            if isinstance(leaf, TensorRecord)
            else onload(leaf.tensor, leaf.onload_device, leaf.requires_grad, ready)
            for leaf in entry.leaves
        ]
        return unflatten(entry.spec, leaves, entry.opaques)

    def prepare(self, batch_index: int, input_names: Collection[str] | None) -> None:
        """Bring a batch's spilled values up to the host tier ahead of use."""
        with self._lock:
            self._check_open()
            entries = _selected(self._batches[self._index(batch_index)], input_names)
            loads = reads.plan(self.placement, _records_in(entries))
        self._finish_loads(loads, by_reader=True, asked=True)

    # ------------------------------------------------------------- reporting

    def size(self) -> dict[torch.device, int]:
        with self._lock:
            sizes = self.placement.memory_by_device()
            seen: set[int] = set()
            for batch in self._batches:
                for entry in batch.values():
                    in_ram = [
                        leaf.tensor for leaf in entry.leaves if isinstance(leaf, InlineTensor)
                    ]
                    in_ram += [obj for obj in entry.opaques if isinstance(obj, torch.Tensor)]
                    for tensor in in_ram:
                        if id(tensor) not in seen and not tensor.is_meta:
                            seen.add(id(tensor))
                            sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
            return sizes

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return stats.report(
                self.placement,
                write_behind_budget=self.config.write_behind_bytes,
                store_path=self._store_path_locked(),
                stall_seconds=self._stall_seconds,
            )

    def store_path(self) -> str | None:
        with self._lock:
            return self._store_path_locked()

    def _store_path_locked(self) -> str | None:
        disk = self.placement.disk
        return str(disk.store.path) if disk is not None and disk.has_store else None

    # -------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Finish or cancel background work; keep (complete) or delete the store.

        Safe to call twice, and from a garbage-collection finalizer on any thread.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._write_finished.notify_all()
            if self.config.keep_store and not self.io.on_pool_thread():
                # Every value goes into the kept store: let queued writes finish first.
                self._write_finished.wait_for(lambda: self.placement.writes_in_flight == 0)
        self.io.close()
        with self._lock:
            disk = self.placement.disk
            if self.config.keep_store:
                # Deletions the pool did not get to: a kept store holds no stray arrays.
                for name in self._deleting | set(self.placement.take_deletions()):
                    disk.store.delete_tensor(name)
                persist(self.placement, self._batches)
                disk.store.close()
            elif disk is not None and disk.has_store:
                disk.store.remove()


def _records_in(entries: list[tuple[str, Entry]]) -> list[TensorRecord]:
    return [record for _, entry in entries for record in _records_of(entry)]


def _selected(batch: dict[str, Entry], names: Collection[str] | None) -> list[tuple[str, Entry]]:
    """The batch's entries named in ``names`` (all with None; absent names skipped)."""
    return [(key, entry) for key, entry in batch.items() if names is None or key in names]
