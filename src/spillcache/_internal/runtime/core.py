"""The state of one cache: batches of entries over the tiers of its pool, behind the
pool's lock.

``CacheCore`` owns what a cache holds (its entries, its ``Tenant`` in the pool) and is
what the garbage-collection finalizer closes, so it must never refer back to the
public ``IntermediatesCache`` object. The tiers, the lock and the I/O threads are its
``SharedPool``'s, shared with every cache of the same config.
"""

from __future__ import annotations

import concurrent.futures
import operator
import time
from collections.abc import Callable, Collection, Iterable
from concurrent.futures import Future
from typing import Any

import torch

from spillcache.config import CacheConfig
from spillcache.errors import CacheClosedError, ConfigError

from ..engine.placement import TensorRecord
from ..engine.records import Admission, Entry, InlineTensor
from ..engine.records import records_of as _records_of
from ..engine.tenants import Tenant
from ..io.io_threads import READ, WRITE
from ..io.transfers import Ready
from ..process.resolved import keeps_device_tier
from ..store.failures import write_report
from ..tree import unflatten
from . import unlocked
from .persist import complete_on_close, make_durable, release_previous
from .pool import cache_memory, pool_for, report
from .unlocked import Fetched, Offload, Prepared, may_spill, tiered_bytes

__all__ = ["CacheCore"]


class CacheCore:
    """Batches of ``key -> Entry`` whose tensors live in its pool's ``Placement``.

    The pool's lock guards all of it. Disk I/O runs outside the lock: writes on the I/O
    pool (write-behind), reads on whichever thread needs the value (the caller, or a
    prefetch job on the pool), with the record held so it cannot be deleted meanwhile.
    """

    def __init__(self, config: CacheConfig, offload_device: torch.device | None) -> None:
        if config.keep_store and config.disk_path is None:
            raise ConfigError("keep_store: there is no disk tier to keep; set disk_path too")
        if config.keep_store and isinstance(config.disk_path, tuple):
            raise ConfigError(
                "keep_store: a kept store lives in one directory, but disk_path lists "
                f"{len(config.disk_path)}; set disk_path to one directory to keep stores"
            )
        self.config = config
        self.offload_device = offload_device
        accelerator = offload_device if offload_device and offload_device.type != "cpu" else None
        self.pool = pool_for(config)
        self._lock = self.pool.lock
        self.placement = self.pool.placement
        self.io = self.pool.io
        self.transfers = self.pool.transfers
        tenant = Tenant(
            bool(self.pool.disk_dirs),
            config.eviction,
            device_target=accelerator,
            device_tier=keeps_device_tier(config, offload_device),
        )
        with self._lock:
            self.tenant = self.placement.add_tenant(tenant)
        self._offload = Offload(config, offload_device, self.placement, self.tenant, self.transfers)
        self._batches: list[dict[str, Entry]] = []
        self._generations: list[int] = []
        self._stall_seconds = 0.0
        self._closed = False
        # A checkpoint's store: closing leaves it as its last flush() committed it.
        self.keeps_only_flushed = False

    # --------------------------------------------------------------- helpers

    def _check_open(self, *, report: bool = True) -> None:
        """Lock held: refuse a closed cache; ``report`` background writes that failed
        since the last report (one error for all of them, before the call does anything)."""
        if self._closed:
            raise CacheClosedError(
                "this cache is closed; create a new one (or reopen a kept store)"
            )
        if report:
            self._report_write_failures()

    def _report_write_failures(self) -> None:
        failures = self.tenant.take_write_failures()
        if failures:
            raise write_report(failures, self.pool.disk_dirs)

    def _index(self, batch_index: Any) -> int:
        index = operator.index(batch_index)
        count = len(self._batches)
        if not -count <= index < count:
            raise IndexError(
                f"batch index {batch_index} is out of range: the cache has {count} batches"
            )
        return index % count

    # ---------------------------------------------------------- write-behind

    def _wait_for_write_room(self, incoming: int) -> None:
        """Backpressure: wait (lock held, released while waiting) until the write-behind
        area has room for ``incoming`` more bytes, what making room for the values about
        to come up may evict; or until it is empty, for more than its whole budget. The
        area is a part of the arena: past its budget it would take the reads' part."""
        budget = self.pool.budgets.write_behind_bytes
        area = self.placement.write_behind

        def has_room() -> bool:
            return area.nbytes == 0 or area.nbytes + incoming <= budget

        if has_room():
            return
        self._wait_for_writes(lambda: self._closed or has_room())
        self._check_open()

    def _wait_for_writes(self, done: Callable[[], bool]) -> None:
        """Lock held (released while waiting): wait until ``done()``, re-checked after
        each finished background write; the wait is the caller's stall."""
        start = time.perf_counter()
        self.pool.write_finished.wait_for(done)
        self._stall_seconds += time.perf_counter() - start

    def flush(self, note: dict | None = None, *, keep_previous: bool = False) -> None:
        """Wait for every background write; report those that failed since the last
        report. A kept store records everything stored so far, and ``note`` (JSON)
        in its root: it is committed with this flush (what a checkpoint says); with
        ``keep_previous`` the flush before stays readable until ``release_previous``."""
        with self._lock:
            self._check_open(report=False)
            self._wait_for_writes(lambda: self.tenant.writes_in_flight == 0)
            self._report_write_failures()
        if self.config.keep_store:
            make_durable(self.pool, self.tenant, self._batches, note, keep_previous=keep_previous)

    def release_previous(self) -> None:
        """The flush before the last (kept by ``flush(keep_previous=True)``) is let go."""
        release_previous(self.pool, self.tenant)

    # ----------------------------------------------------------------- write

    def adopt_batches(self, batches: list[dict[str, Entry]]) -> None:
        """Lock held: start from batches read back from a store (a reopened cache)."""
        self._batches.extend(batches)
        self._generations.extend(0 for _ in batches)
        self.placement.tenants.resized(self.tenant, len(self._batches))

    def num_batches(self) -> int:
        with self._lock:
            return len(self._batches)

    def add_batches(self, count: int) -> None:
        with self._lock:
            self._check_open()
            self._batches.extend({} for _ in range(count))
            self._generations.extend(0 for _ in range(count))
            self.placement.tenants.resized(self.tenant, len(self._batches))

    def append(self, values: dict[str, Any], onload_device: torch.device | None = None) -> int:
        """Store ``values`` as a new last batch; on error the cache is unchanged."""
        prepared = self._offload.prepare(values, onload_device)
        readings = self.pool.read_free_space() if may_spill(prepared) else None

        def store_as_new_batch() -> int:
            self._check_open()
            self._wait_for_write_room(tiered_bytes(prepared))
            self.pool.observe_free_space(readings)
            self._batches.append({})
            self._generations.append(0)
            self.placement.tenants.resized(self.tenant, len(self._batches))
            try:
                self._store_prepared(len(self._batches) - 1, prepared)
            except BaseException:
                self._batches.pop()
                self._generations.pop()
                self.placement.tenants.resized(self.tenant, len(self._batches))
                raise
            return len(self._batches) - 1

        return self.pool.transact(store_as_new_batch)

    def update(self, batch_index: int, values: dict[str, Any]) -> None:
        with self._lock:  # refused before anything is copied into the arena
            self._check_open()
            self._index(batch_index)
        prepared = self._offload.prepare(values, None)
        readings = self.pool.read_free_space() if may_spill(prepared) else None

        def store_in_batch() -> None:
            self._check_open()
            index = self._index(batch_index)
            self._wait_for_write_room(tiered_bytes(prepared))
            self.pool.observe_free_space(readings)
            self._store_prepared(index, prepared)

        self.pool.transact(store_in_batch)

    def _store_prepared(self, index: int, prepared: list[Prepared]) -> None:
        """Lock held: place the prepared values in batch ``index``; all or nothing."""
        admissions = [
            Admission(
                offloaded, leaf.onload_device, leaf.tensor, f"batch {index}, key {item.key!r}",
                item.key,
            )
            for item in prepared
            for leaf, offloaded, tiered in item.leaves
            if tiered
        ]  # fmt: skip
        records = iter(self.placement.admit(admissions, tenant=self.tenant, batch=index))
        batch = self._batches[index]
        replaced: list[TensorRecord] = []
        for item in prepared:
            leaves: list[TensorRecord | InlineTensor] = []
            for leaf, offloaded, tiered in item.leaves:
                if tiered:
                    leaves.append(next(records))
                else:
                    requires_grad = leaf.tensor.requires_grad
                    leaves.append(InlineTensor(offloaded, leaf.onload_device, requires_grad))
            if item.key in batch:
                replaced.extend(_records_of(batch[item.key]))
            batch[item.key] = Entry(item.flat.spec, leaves, item.flat.opaques)
        self.placement.release(replaced)
        self._generations[index] += 1

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
        return self.fetch_versioned(batch_index, input_names).values

    def fetch_versioned(
        self, batch_index: int, input_names: Collection[str] | None, *, by_reader: bool = True
    ) -> Fetched:
        """The batch's values, its generation (bumped by every update and delete), the
        device copies still in flight (only for prefetch: ``Ready.wait()`` before use),
        and the values read from disk whose promotion waits for the reader.

        ``by_reader`` is False for prefetch jobs: they read ahead of the caller, so they
        neither move the scan policy's position nor count as the caller's stall, they
        onload on a side stream, and what they read is promoted into the host tier only
        when the caller takes the batch (``mark_read``): at the same point of the
        caller's updates and deletes as a plain fetch, so the tiers end up the same
        however the threads interleave.
        """
        with self._lock:
            self._check_open(report=by_reader)  # a prefetch job would lose the report
            index = self._index(batch_index)
            if by_reader:
                self.placement.tenants.reached(self.tenant, index, len(self._batches))
            generation = self._generations[index]
            entries = _selected(self._batches[index], input_names)
            loads = unlocked.plan(self.placement, _records_in(entries))
        deferred: list[tuple[TensorRecord, torch.Tensor]] = []
        tensors = self._finish_loads(loads, by_reader=by_reader, deferred=deferred)
        ready = Ready()
        side = None if by_reader else ready
        values = {key: self._assemble(entry, tensors, side) for key, entry in entries}
        return Fetched(generation, values, ready, deferred)

    def mark_read(self, batch_index: int, read: list[tuple[TensorRecord, torch.Tensor]]) -> None:
        """The caller took a prefetched batch: the scan policy's position moves to it,
        and the values its prefetch read from disk are promoted as a fetch would."""

        def take_prefetched() -> None:
            self.placement.tenants.reached(
                self.tenant, self._index(batch_index), len(self._batches)
            )
            for record, tensor in read:
                self.placement.promote(record, tensor)

        self.pool.transact(take_prefetched)

    def generation(self, batch_index: int) -> int:
        with self._lock:
            return self._generations[self._index(batch_index)]

    def submit_fetch(self, batch_index: int, input_names: Collection[str] | None) -> Future:
        with self._lock:
            self._check_open()
            lane = batch_index % self.io.lanes  # consecutive batches: another drive's queue
            job = self.io.submit(READ, self._prefetch, batch_index, input_names, lane=lane)
            self.tenant.track(job)  # closing waits for it
            return job

    def _prefetch(self, batch_index: int, input_names: Collection[str] | None) -> Fetched:
        return self.fetch_versioned(batch_index, input_names, by_reader=False)

    def add_stall(self, seconds: float) -> None:
        with self._lock:
            self._stall_seconds += seconds

    def _finish_loads(
        self,
        loads: unlocked.Loads,
        *,
        by_reader: bool,
        asked: bool = False,
        deferred: list | None = None,
    ) -> dict:
        """Read what ``loads`` holds (lock NOT held), then promote and release under it
        (a prefetch's promotions go to ``deferred``, for ``mark_read``)."""
        if not loads.held:
            return loads.found
        start = time.perf_counter()
        error = unlocked.read(
            loads, pin_host=self.placement.pin_host, read_mode=self.config.read_mode
        )

        def count_promote_release() -> None:
            for record in loads.to_read:
                record.loading = None
                if record.rid in loads.read:
                    promote = not unlocked.maps(record, self.config.read_mode)
                    if promote and not by_reader and deferred is not None:
                        deferred.append((record, loads.read[record.rid]))
                        promote = False
                    self.placement.read_done(
                        record, loads.read[record.rid], promote=promote, asked=asked
                    )
            self.placement.release(loads.held)
            if by_reader:
                self._stall_seconds += time.perf_counter() - start

        self.pool.transact(count_promote_release)
        if error is not None:
            raise error
        return {**loads.found, **loads.read}

    def _assemble(self, entry: Entry, tensors: dict[int, torch.Tensor], ready: Ready | None) -> Any:
        onload = self.transfers.onload
        leaves = [
            onload(tensor, leaf.onload_device, leaf.requires_grad, ready)
            for tensor, leaf in zip(_held(entry, tensors), entry.leaves, strict=True)
        ]
        return unflatten(entry.spec, leaves, entry.opaques)

    def prepare(self, batch_index: int, input_names: Collection[str] | None) -> None:
        """Bring a batch's spilled values up to the host tier ahead of use; making room
        may evict values to write, so it waits for write room first, as update does."""
        with self._lock:
            self._check_open()
            entries = _selected(self._batches[self._index(batch_index)], input_names)
            coming_up = [r for r in _records_in(entries) if r.resident is None]
            self._wait_for_write_room(sum(record.nbytes for record in coming_up))
        self.fetch_stored(batch_index, input_names, asked=True)

    def fetch_stored(
        self, batch_index: int, input_names: Collection[str] | None, *, asked: bool = False
    ) -> dict[str, tuple[Entry, list[torch.Tensor]]]:
        """The batch's entries with their tensors as the cache holds them, not onloaded:
        a tier's own tensor, or one read from disk (promoted as a fetch promotes it;
        ``asked``: read ahead of use, by ``prepare``)."""
        with self._lock:
            self._check_open()
            entries = _selected(self._batches[self._index(batch_index)], input_names)
            loads = unlocked.plan(self.placement, _records_in(entries))
        tensors = self._finish_loads(loads, by_reader=True, asked=asked)
        return {key: (entry, _held(entry, tensors)) for key, entry in entries}

    def keys(self, batch_index: int) -> list[str]:
        with self._lock:
            self._check_open()
            return list(self._batches[self._index(batch_index)])

    # ------------------------------------------------------------- reporting

    def size(self) -> dict[torch.device, int]:
        with self._lock:
            return cache_memory(self.placement, self.tenant, self._batches)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return report(
                self.placement,
                self.tenant,
                write_behind_budget=self.pool.budgets.write_behind_bytes,
                store_path=self._store_path_locked(),
                stall_seconds=self._stall_seconds,
                pool=self.pool.totals(),
                disk_dirs=self.pool.disk_dirs,
            )

    def values_held(self, *, reset_peak: bool = False) -> tuple[int, int]:
        """Bytes of this cache's tiered values now (each once, wherever it is), and the
        most since the last ``reset_peak``."""
        with self._lock:
            return self.placement.records.values_held(self.tenant, reset_peak=reset_peak)

    def store_path(self) -> str | None:
        with self._lock:
            return self._store_path_locked()

    def _store_path_locked(self) -> str | None:
        return str(self.tenant.store.path) if self.tenant.has_store else None

    # -------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Finish or cancel background work; keep (complete) or delete the store; give
        the cache's share of the pool back.

        Safe to call twice, and from a garbage-collection finalizer on any thread.
        """
        tenant = self.tenant
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.pool.write_finished.notify_all()
            if self.config.keep_store and not self.io.on_pool_thread():
                # Every value goes into the kept store: let queued writes finish first.
                self.pool.write_finished.wait_for(lambda: tenant.writes_in_flight == 0)
            tenant.closed = True  # no other cache evicts its values any more
            if not self.config.keep_store:
                self.placement.release_tenant(tenant)  # its share back to the pool now
            jobs = tenant.take_jobs()
        self._end_jobs(jobs)
        try:  # a kept store that cannot be completed still gives the pool its share back
            if self.config.keep_store:
                complete_on_close(self.pool, tenant, self._batches, self.keeps_only_flushed)
        finally:
            with self._lock:
                self.placement.remove_tenant(tenant)
            if tenant.has_store:
                if self.config.keep_store:
                    tenant.store.close()
                else:
                    self.pool.remove_stores(tenant)
            self.pool.leave()

    def close_collected(self) -> None:
        """The finalizer's close, for a cache garbage-collected (or left at exit).

        The collector runs wherever an allocation triggers it, possibly inside another
        cache's operation on this very thread, with the pool's lock held: closing here
        would then wait for that lock forever. So a cache collected while the lock is
        taken is closed on one of the pool's threads instead, as soon as the lock is free.
        """
        if self._lock.acquire(blocking=False):
            self._lock.release()
            self.close()
            return
        try:
            self.io.submit(WRITE, self.close)
        except RuntimeError:  # the pool is closed: interpreter exit; nothing else runs
            self.close()

    def _end_jobs(self, jobs: list[Future]) -> None:
        """Cancel the cache's queued background work and wait for what already runs
        (lock not held), so that nothing writes into its store after this."""
        current = self.io.current_job()  # a finalizer may run on a pool thread, in a job
        running = [job for job in jobs if job is not current and not job.cancel()]
        concurrent.futures.wait(running)


def _held(entry: Entry, tensors: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """An entry's tensor leaves as the cache holds them: a record's from ``tensors``
    (by record number), an inline one's own."""
    return [
        tensors[leaf.rid] if isinstance(leaf, TensorRecord) else leaf.tensor
        for leaf in entry.leaves
    ]


def _records_in(entries: list[tuple[str, Entry]]) -> list[TensorRecord]:
    return [record for _, entry in entries for record in _records_of(entry)]


def _selected(batch: dict[str, Entry], names: Collection[str] | None) -> list[tuple[str, Entry]]:
    """The batch's entries named in ``names`` (all with None; absent names skipped)."""
    return [(key, entry) for key, entry in batch.items() if names is None or key in names]
