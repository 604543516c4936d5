"""One budget for every cache of a process built with one config.

llm-compressor builds several caches at once (AWQ: the pipeline's and one per
mapping parent). If each took the whole config for itself, a process would hold
``host_bytes`` once per cache. Instead, caches whose configs are equal share a
``SharedPool``: one lock, one placement (the host and device tiers, the write-behind
area and the disk budget, with eviction choosing across caches), one read-buffer
pool, one set of I/O threads. Each cache is a ``Tenant`` of it. A cache built with a
different config gets a pool of its own.

The pool is made when the first cache of its config is built and closed (threads
joined, buffers freed) when the last one closes; a later cache makes a new one.

This is also where a spilled value goes to disk: ``start_queued_disk_io`` hands the
writes that placement queued to the I/O threads, and ``_write_to_disk`` writes one
(outside the lock) and reports back under it.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from typing import Any

import torch

from spillcache.config import CacheConfig

from ..engine.placement import Placement, TensorRecord
from ..engine.records import WriteState
from ..engine.tenants import Tenant
from ..engine.tiers import DiskTier
from ..engine.tiers.budget import BudgetedTier
from ..engine.tiers.disk import Reading
from ..io.arena import Arena, SharedBuffers
from ..io.io_threads import WRITE, IOPool
from ..io.transfers import Transfers
from ..process.resolved import checked_disk_dirs, checked_process_budgets, store_parent
from ..store.failures import WriteFailure, errno_of
from ..store.store_dirs import remove_empty_dirs
from ..store.tensor_store import Store
from ..sysinfo import nearest_existing
from ..text import format_bytes

__all__ = ["SharedPool", "pool_for"]

# Reentrant: a garbage-collection finalizer may close a cache (and so ``leave`` its
# pool) on a thread that is inside ``pool_for`` already.
_registry_lock = threading.RLock()
_pools: dict[CacheConfig, SharedPool] = {}


def pool_for(config: CacheConfig) -> SharedPool:
    """The pool of caches built with ``config`` (a new one if none is open), with one
    more member counted: call ``leave()`` once when that cache closes."""
    with _registry_lock:
        pool = _pools.get(config)
        if pool is not None:
            pool.members += 1
            return pool
    # Made outside the registry's lock: making a pool allocates, so the collector may
    # close other caches (which leave their pools) in the middle of it.
    made = SharedPool(config)
    with _registry_lock:
        pool = _pools.setdefault(config, made)
        pool.members += 1
    if pool is not made:  # another thread made one first; ours never started a thread
        made.io.close()
        made.buffers.close()
    return pool


class SharedPool:
    """What the caches of one config share; see the module docstring.

    Budgets (resolved once, by ``resolved.py``) are the process's: the sum over every cache.
    """

    def __init__(self, config: CacheConfig) -> None:
        self.config = config
        self.members = 0  # caches built on it and not yet closed (guarded by the registry)
        # This process's share: "auto" resolved, node-wide sizes divided among the
        # node's ranks under torchrun (resolved.process_budgets).
        self.budgets = checked_process_budgets(config)
        self.disk_dirs = checked_disk_dirs(config)  # one per drive; [] for no disk tier
        self.lock = threading.Lock()
        # Notified whenever a background write finishes (backpressure, flush, close).
        self.write_finished = threading.Condition(self.lock)
        self.transfers = Transfers()
        # One lane (queue and threads) per disk: bandwidth adds up across drives.
        self.io = IOPool("spillcache-io", config.io_threads, lanes=max(1, len(self.disk_dirs)))
        # All the host memory the pool's values take (host_bytes), mapped on first use.
        self.arena = Arena(
            self.budgets.host_bytes, pin=torch.cuda.is_available(), describe=self._arena_holders
        )
        self.buffers = SharedBuffers(self.budgets.read_buffer_bytes, self.arena)
        disk = None
        if self.disk_dirs:
            disk = DiskTier(
                self.budgets.disk_bytes, len(self.disk_dirs), self._free_bytes, self.disk_dirs
            )
        self.placement = Placement(
            device_budget=self.budgets.device_bytes,
            host_budget=self.budgets.host_tier_bytes,
            disk=disk,
            pin_host=torch.cuda.is_available(),
            write_behind_budget=self.budgets.write_behind_bytes,
            transfers=self.transfers,
            arena=self.arena,
        )

    def _arena_holders(self) -> str:
        """What holds the arena, for its overflow warning (read without the lock:
        figures of a moment)."""
        placement = self.placement
        return (
            f"{format_bytes(placement.host.nbytes)} in the host tier, "
            f"{format_bytes(placement.write_behind.nbytes)} waiting for disk writes, "
            "the rest read back or held by tensors fetch returned"
        )

    def store_maker(self) -> Callable[[int], Store] | None:
        """A function that makes a new cache's store on disk ``i`` (on its first spill
        there), or None without a disk tier."""
        if not self.disk_dirs:
            return None
        return self._create_store

    def read_free_space(self) -> list[Reading | None] | None:
        """Lock NOT held (a statvfs per disk): each disk's free space, for
        ``observe_free_space`` under the lock before values that may spill are placed
        (placement refuses a value no disk has room for); None without a disk tier."""
        disk = self.placement.disk
        return None if disk is None else disk.read_free()

    def observe_free_space(self, readings: list[Reading | None] | None) -> None:
        if readings is not None:
            self.placement.disk.observe(readings)

    def _free_bytes(self, disk: int) -> int:
        """Free space where disk ``disk``'s stores go (a directory made on first use:
        until then, the filesystem of its nearest existing parent)."""
        path = nearest_existing(self.disk_dirs[disk])
        # A statvfs reads the filesystem's counters in memory: no disk I/O.
        stat = os.statvfs(path)
        return stat.f_bavail * stat.f_frsize

    def _create_store(self, disk: int) -> Store:
        config = self.config
        return Store.create(
            # <disk_path>/<run>/rank<R> under torchrun: one run's stores together
            store_parent(self.disk_dirs[disk]),
            direct_io=config.direct_io,
            writers=config.io_threads * len(self.disk_dirs),  # the threads of every disk
            read_buffer_bytes=self.budgets.read_buffer_bytes,
            checksum=config.checksum,
            shared=self.buffers,
            keep=config.keep_store,
        )

    def remove_stores(self, tenant: Tenant) -> None:
        """Delete a cache's stores, and the rank and run directories they leave empty."""
        for store in tenant.stores:
            store.remove()
        for disk_dir in self.disk_dirs:
            remove_empty_dirs(store_parent(disk_dir), disk_dir)

    def leave(self) -> None:
        """A member closed; the last one out closes the pool."""
        with _registry_lock:
            self.members -= 1
            if self.members > 0:
                return
            if _pools.get(self.config) is self:
                del _pools[self.config]
        self.io.close()
        self.buffers.close()
        self.arena.close()

    # ---------------------------------------------------------- write-behind

    def start_queued_disk_io(self) -> None:
        """Hand the writes and deletions placement queued to the I/O threads (lock held).

        Deleting a chunk file (freeing its extents) takes milliseconds: not on the
        caller's thread, and not under the lock.
        """
        placement = self.placement
        io = self.io
        # The job gets its value in a one-item list it empties when it starts: holding
        # it only while it writes, its arena slot comes back as soon as the write ends.
        for record, value in [(record, [tensor]) for record, tensor in placement.take_writes()]:
            job = io.submit(WRITE, self._write_to_disk, record, value, lane=record.disk)
            record.tenant.track(job)
        for tenant, disk, name in placement.take_deletions():
            # A kept store's flushed structures may name it: the next flush deletes it.
            if tenant.kept is not None and tenant.kept.defers_deletion(name):
                continue
            tenant.deleting.add(name)
            tenant.track(io.submit(WRITE, self._delete_from_disk, tenant, disk, name, lane=disk))

    def _delete_from_disk(self, tenant: Tenant, disk: int, name: str) -> None:
        tenant.store_on(disk).delete_tensor(name)
        with self.lock:
            tenant.deleting.discard(name)

    def _write_to_disk(self, record: TensorRecord, value: list[torch.Tensor]) -> None:
        """A background write: the file outside the lock, the bookkeeping inside it. A
        failure goes to the value's cache, whose next call reports it. Its end is
        announced to the arena only once the value is let go (``returned_expected``)."""
        tensor = value.pop()
        ended = self._write_value(record, tensor)
        del tensor
        if ended:  # its write_done left the announcement to this job
            self.arena.returned_expected()

    def _write_value(self, record: TensorRecord, tensor: torch.Tensor) -> bool:
        """Write ``tensor``; True if its write was still the record's to report."""
        store = record.tenant.store_on(record.disk)
        error: BaseException | None = None
        try:
            durable = store.syncs_background_writes  # a kept store's, by default
            store.write_tensor(record.array, tensor, owner=record.owner, durable=durable)
            self.placement.disk.landed(record.rid)  # free-space readings show it from now
        except BaseException as caught:  # reported to the caller, never lost on this thread
            error = caught
        free = None
        if error is not None and errno_of(error) == errno.ENOSPC:
            (free,) = self.placement.disk.read_free(record.disk)  # what is left, unlocked
        with self.lock:
            ours = record.write_state == WriteState.WRITING
            if self.placement.write_done(record, error, free):
                failure = WriteFailure(record.label, record.nbytes, str(store.path), error)
                record.tenant.write_failed(record.disk, failure)
            self.write_finished.notify_all()
        return ours

    # ------------------------------------------------------------- reporting

    def totals(self) -> dict[str, Any]:
        """The pool's own figures (lock held): bytes and budgets over every cache."""
        placement = self.placement
        disk = placement.disk

        def tier(held: BudgetedTier | None) -> dict[str, int | None]:
            if held is None:  # no disk tier: it can hold nothing
                return {"bytes": 0, "budget": 0, "peak_bytes": 0}
            return {"bytes": held.nbytes, "budget": held.budget, "peak_bytes": held.peak}

        return {
            "caches": len(placement.tenants),
            "device": tier(placement.device),
            "host": tier(placement.host),
            "disk": {
                **tier(disk),
                "disks": [
                    {"path": path, "bytes": disk.bytes_on[index]}
                    for index, path in enumerate(self.disk_dirs)
                ],
            },
            "write_behind": {
                "bytes": placement.write_behind.nbytes,
                "budget": self.budgets.write_behind_bytes,
                "unwritten_bytes": placement.write_behind.unwritten_bytes,
            },
            "counters": dict(placement.counters),
            "arena": self.arena.stats(),
        }
