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

Every change to what the caches hold is a transaction (``transact``): the pool's lock
taken, placement's decision made under it, and its effects run, the slow ones with the
lock released (a store made on a disk, a device value copied to the host: the decision
is then made again, see ``engine/transaction.py``). This is also where a spilled value
goes to disk: a transaction hands the writes placement queued to the I/O lanes, and
``_write_to_disk`` writes one (outside the lock) and reports back in a transaction.

The figures ``stats()`` and ``size()`` give come from here too: the pool's totals
(``SharedPool.totals``) and each cache's share of them (``report``, ``cache_memory``)."""

from __future__ import annotations

import errno
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from spillcache.config import CacheConfig

from ..engine.placement import Placement, TensorRecord
from ..engine.records import InlineTensor, WriteState
from ..engine.tenants import TIER_COUNTERS, Tenant
from ..engine.tiers import BudgetedTier, DiskTier, Reading
from ..engine.transaction import Needs, NeedsFirst
from ..io.arena import Arena, SharedBuffers
from ..io.io_threads import WRITE, IOPool
from ..io.transfers import Transfers
from ..process.resolved import checked_disk_dirs, checked_process_budgets, store_parent
from ..store.failures import WriteFailure, errno_of
from ..store.store_dirs import remove_empty_dirs
from ..store.tensor_store import Store, TensorStore
from ..sysinfo import nearest_existing
from ..text import format_bytes

__all__ = ["SharedPool", "cache_memory", "pool_for", "report"]

Result = TypeVar("Result")

# Tries of a decision whose device values' copies, made outside the lock, were taken
# by others meanwhile (their victims changed); the last try copies under the lock.
_COPY_TRIES = 3

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
        # Held while a store is made (disk I/O, the pool's lock released): one at a time,
        # so that two transactions needing the same store make it once.
        self._making_stores = threading.Lock()
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
            disk = DiskTier(self.budgets.disk_bytes, len(self.disk_dirs), self.disk_dirs)
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

    # ---------------------------------------------------------- transactions

    def transact(self, decide: Callable[[], Result]) -> Result:
        """``decide()`` under the pool's lock; then its effects. Writes and deletions
        are handed to the lanes before the lock is released (a queue's put: so that a
        closing cache, which takes its jobs under the lock, sees every one of them).
        Work the decision needs first is done with the lock released, and ``decide`` is
        called again: it must take itself back when it raises ``NeedsFirst``, as
        ``Placement.admit`` does; a store made for a decision that then failed goes
        again, as if never made. Work a decision that went through only asked for (a
        promotion's store) is done after it; a failure there is left for the next
        decision that needs it to report."""
        placement = self.placement
        copies: dict[tuple, torch.Tensor] = {}  # made for this transaction, by copy_key
        stores: list[tuple[Tenant, int]] = []  # made for this transaction
        copy_tries = 0
        try:
            while True:
                with self.lock:
                    placement.premade = dict(copies)  # a try taken back used none
                    placement.copies_under_lock = copy_tries == _COPY_TRIES - 1
                    try:
                        result = decide()
                    except NeedsFirst:
                        needs, again = placement.take_needs(), True
                    except BaseException:
                        placement.take_needs()  # what a failed decision asked for goes too
                        raise
                    else:
                        needs, again = placement.take_needs(), False
                    finally:
                        placement.premade, placement.copies_under_lock = {}, False
                        self._hand_effects_to_lanes()
                if not again:
                    if self._make_stores(needs, optional=True) and needs.promotions:
                        self.transact(functools.partial(self._promote, needs.promotions))
                    return result
                stores.extend(needs.stores)
                self._make_stores(needs, optional=False)
                copies.update(self._copy_to_host(needs))
                copy_tries += bool(needs.copies)
        except BaseException:
            with self.lock:
                unused = self._take_back_unused(stores)
            for store, disk in unused:
                self._remove_store(store, disk)
            raise

    def _take_back_unused(self, stores: list[tuple[Tenant, int]]) -> list[tuple[TensorStore, int]]:
        """Lock held: of the stores a failed transaction made, those nothing went to
        since (no value of the cache there, no deletion running), taken off their cache.
        A kept store is never taken back (its cache's flush or close completes it), nor
        a closed cache's (its close removes or keeps them)."""
        if self.config.keep_store:
            return []
        taken = []
        for tenant, disk in stores:
            if not tenant.has_store_on(disk) or tenant.deleting or tenant.closed:
                continue
            used = any(
                record.disk == disk and (record.on_disk or record.write_state is not None)
                for record in self.placement.records_of(tenant)
            )
            if not used:
                taken.append((tenant.detach(disk), disk))
        return taken

    def _make_stores(self, needs: Needs, *, optional: bool) -> bool:
        """Lock NOT held: make the stores ``needs`` asks for. A cache closed meanwhile
        gets none: deciding again finds its values gone (or, for the deciding cache,
        closed). ``optional``: False if one is not made, not an error; else always True."""
        for tenant, disk in needs.stores:
            try:
                if not self.make_store(tenant, disk) and optional:
                    return False
            except Exception:
                if optional:
                    return False
                raise
        return True

    def _copy_to_host(self, needs: Needs) -> dict[tuple, torch.Tensor]:
        """Lock NOT held: the host copies of the device values ``needs`` asks for, by
        the key it asks by (a full arena is waited for here: the lock is not held)."""
        pin = self.placement.pin_host
        return {
            key: self.transfers.to_host(tensor, pin=pin, arena=self.arena)
            for key, tensor in needs.copies.items()
        }

    def _promote(self, waiting: list[tuple[TensorRecord, torch.Tensor, bool]]) -> None:
        for record, tensor, asked in waiting:
            self.placement.promote(record, tensor, asked=asked)

    def make_store(self, tenant: Tenant, disk: int, *, closing: bool = False) -> bool:
        """Lock NOT held: ``tenant``'s store on ``disk``, made if it has none yet; False
        if it has none (it closed: a closed cache's stores are being removed or kept).
        ``closing``: its own close makes it (a kept store, even if nothing spilled)."""
        with self._making_stores:
            with self.lock:
                if tenant.has_store_on(disk) or (tenant.closed and not closing):
                    return tenant.has_store_on(disk)
            store = self._create_store(disk)
            with self.lock:
                attached = closing or not tenant.closed
                if attached:
                    tenant.attach(store, disk)
            if not attached:
                self._remove_store(store, disk)
            return attached

    def read_free_space(self, disk: int | None = None) -> list[Reading | None] | None:
        """Lock NOT held: each disk's free space (or ``disk``'s; None if unreadable),
        for ``observe_free_space`` under the lock before values that may spill are
        placed (placement refuses a value no disk has room for); None: no disk tier."""
        if (tier := self.placement.disk) is None:
            return None
        readings: list[Reading | None] = []
        for index in range(tier.disks) if disk is None else [disk]:
            mark, shown = tier.writes_counted(index)  # before the statvfs: see there
            free = self._free_bytes(index)
            readings.append(None if free is None else Reading(free, mark, shown))
        return readings

    def observe_free_space(self, readings: list[Reading | None] | None) -> None:
        if readings is not None:
            self.placement.disk.observe(readings)

    def _free_bytes(self, disk: int) -> int | None:
        """Free space where disk ``disk``'s stores go (a directory made on first use:
        until then, its nearest existing parent's filesystem); None if unreadable. A
        statvfs reads the filesystem's counters in memory: no disk I/O."""
        path = self.disk_dirs[disk]
        try:
            try:
                stat = os.statvfs(path)
            except FileNotFoundError:
                stat = os.statvfs(nearest_existing(path))
        except OSError:
            return None
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
            root=self.disk_dirs[disk],  # a signal removes what it leaves empty up to here
        )

    def remove_stores(self, tenant: Tenant) -> None:
        """Delete a cache's stores, and the rank and run directories they leave empty."""
        for store in tenant.stores:
            store.remove()
        for disk_dir in self.disk_dirs:
            remove_empty_dirs(store_parent(disk_dir), disk_dir)

    def _remove_store(self, store: TensorStore, disk: int) -> None:
        store.remove()
        remove_empty_dirs(store_parent(self.disk_dirs[disk]), self.disk_dirs[disk])

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

    def _hand_effects_to_lanes(self) -> None:
        """Lock held, at the end of a transaction: hand the writes and deletions
        placement queued to the I/O lanes. Deleting a chunk file (freeing its extents)
        takes milliseconds: not on the caller's thread, and not under the lock."""
        placement, io = self.placement, self.io
        # The job gets its value in a one-item list it empties when it starts: holding
        # it only while it writes, its arena slot comes back as soon as the write ends.
        for record, value in [(record, [tensor]) for record, tensor in placement.take_writes()]:
            job = io.submit(WRITE, self._write_to_disk, record, value, lane=record.disk)
            record.tenant.track(job)
        for tenant, disk, name in placement.take_deletions():
            # A closed cache's store goes whole once its reads end (not from under one).
            if tenant.closed and not self.config.keep_store:
                continue
            # A kept store's flushed structures may name it: the next flush deletes it.
            if tenant.kept is not None and tenant.kept.defers_deletion(name):
                continue
            tenant.deleting.add(name)
            tenant.track(io.submit(WRITE, self._delete_from_disk, tenant, disk, name, lane=disk))

    def _delete_from_disk(self, tenant: Tenant, disk: int, name: str) -> None:
        tenant.store_on(disk).delete_tensor(name)
        self.transact(lambda: tenant.deleting.discard(name))

    def _write_to_disk(self, record: TensorRecord, value: list[torch.Tensor]) -> None:
        """A background write: the file outside the lock, the bookkeeping inside it. A
        failure of either goes to the value's cache, whose next call reports it. Its end
        is announced to the arena only once the value is let go (``returned_expected``)."""
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
        # What is left after a write failed for lack of space (read unlocked).
        free = self.read_free_space(record.disk)[0] if errno_of(error) == errno.ENOSPC else None
        ours: list[bool] = []  # still this job's to report, as the first try found it

        def report(failed: Exception | None = None) -> bool:
            ours.append(record.write_state == WriteState.WRITING)
            lost = failed or error
            if self.placement.write_done(record, lost, free) or failed is not None:
                failure = WriteFailure(record.label, record.nbytes, str(store.path), lost)
                record.tenant.write_failed(record.disk, failure)
            self.write_finished.notify_all()
            return ours[0]

        try:
            return self.transact(report)
        except Exception as failed:  # else the write would never end: a failed one now
            return self.transact(functools.partial(report, failed))

    # ------------------------------------------------------------- reporting

    def totals(self) -> dict[str, Any]:
        """The pool's own figures (lock held): bytes and budgets over every cache."""
        placement, disk = self.placement, self.placement.disk

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
            "counters": placement.counters.names(),
            "arena": self.arena.stats(),
        }


# ----------------------------------------------------------- a cache's figures


def report(
    placement: Placement,
    tenant: Tenant,
    *,
    write_behind_budget: int,
    store_path: str | None,
    stall_seconds: float,
    pool: dict[str, Any],
    disk_dirs: list[str],
) -> dict[str, Any]:
    """One cache's figures. Per tier: its bytes held, the budget (the pool's, shared by
    every cache of its config), hits, misses, bytes read and written, evictions; the
    write-behind area; the time the caller waited for I/O; and under ``"pool"`` the
    pool's totals over every cache (``pool["caches"]``: how many share it)."""
    counters = tenant.counters
    disk = placement.disk
    share = _share(placement, tenant)

    def tier(name: str, nbytes: int, budget: int | None) -> dict[str, Any]:
        figures = {counter: getattr(counters.of(name), counter) for counter in TIER_COUNTERS}
        return {"bytes": nbytes, "budget": budget, **figures}

    return {
        # A cache offloading to the CPU with device_bytes = "auto" keeps nothing there.
        "device": tier(
            "device", share["device"], placement.device.budget if tenant.device_tier else 0
        ),
        "host": tier("host", share["host"], placement.host.budget),
        # No disk tier can hold nothing (budget 0); None is "no limit but the disk".
        "disk": {
            **tier("disk", share["disk"], disk.budget if disk is not None else 0),
            "path": store_path,
            # Per disk directory (disk_path may list several): this cache's bytes there.
            "disks": [
                {"path": str(path), "bytes": nbytes}
                for path, nbytes in zip(disk_dirs, share["disks"], strict=True)
            ],
        },
        "write_behind": {
            "bytes": share["write_behind"],
            "budget": write_behind_budget,
            "writes": tenant.writes_in_flight,
            "hits": counters.write_behind_hits,
            "unwritten_bytes": share["unwritten"],
        },
        "stall_seconds": stall_seconds,
        "pool": pool,
    }


def _share(placement: Placement, tenant: Tenant) -> dict[str, Any]:
    """Bytes of one cache's values in each tier and in the write-behind area."""
    held: dict[str, Any] = dict.fromkeys(("device", "host", "disk", "write_behind", "unwritten"), 0)
    held["disks"] = [0] * (placement.disk.disks if placement.disk is not None else 0)
    tiers = {"device": placement.device, "host": placement.host}  # each counts its room
    for record in placement.records_of(tenant):
        if record.resident is not None:
            held[record.resident] += tiers[record.resident].room(record.nbytes)
        if placement.disk is not None and record.rid in placement.disk:
            held["disk"] += record.nbytes
            held["disks"][record.disk] += record.nbytes
        if record.write_state in (WriteState.QUEUED, WriteState.WRITING):
            held["write_behind"] += placement.write_behind.room(record.nbytes)
        if record.write_error is not None:  # in the host tier, its write failed
            held["unwritten"] += placement.host.room(record.nbytes)
    return held


def cache_memory(placement: Placement, tenant: Tenant, batches: list[dict]) -> dict:
    """``size()``: bytes of memory a cache's values use, by device: its tiered values in
    memory (tiers and write-behind), and the tensors kept with its entries (inline, or
    opaque values)."""
    sizes: dict[torch.device, int] = {}
    for record in placement.records_of(tenant):
        tensor = placement.memory_copy(record)
        if tensor is not None:
            sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
    seen: set[int] = set()
    for batch in batches:
        for entry in batch.values():
            in_ram = [leaf.tensor for leaf in entry.leaves if isinstance(leaf, InlineTensor)]
            in_ram += [obj for obj in entry.opaques if isinstance(obj, torch.Tensor)]
            for tensor in in_ram:
                if id(tensor) not in seen and not tensor.is_meta:
                    seen.add(id(tensor))
                    sizes[tensor.device] = sizes.get(tensor.device, 0) + tensor.nbytes
    return sizes
