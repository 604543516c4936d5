"""Opening a kept store as a cache again: its batches, keys and values, read-write.

Only what a store records is read, and all of it is checked first
(``store_checks``): JSON structures whose array references must be names the writer
makes, array metadata that must match its chunk file's size. Classes named in a
structure are looked up among modules already imported and rebuilt without running
their code (``tree``); nothing in a store is imported, unpickled or run.

A store whose run died (SIGKILL, a power cut) after a ``flush()`` opens with every
entry that flush recorded: the arrays and files written after it (whole or not) are
dropped, said in one warning, and removed, so that the store holds only what its
structures name. A store whose process still runs is refused: it is that cache's.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from spillcache.config import CacheConfig
from spillcache.errors import StoreCorruptError, StoreFormatError

from ..engine.placement import TensorRecord
from ..engine.records import Entry
from ..store import store_checks
from ..store.store_dirs import owner_alive
from ..store.store_format import (
    BATCH_NAME,
    STORED_NAME,
    array_ref,
    deletion_cut_short,
    read_root_attributes,
    tensors_dir,
)
from ..store.tensor_store import Store, write_root_json
from .core import CacheCore
from .persist import opened

__all__ = ["go_back_one_flush", "reopen"]

CPU = torch.device("cpu")
_SHOWN = 10  # dropped entries named in the warning; the rest are counted


def reopen(path: str | os.PathLike[str], config: CacheConfig) -> CacheCore:
    """A cache core over the kept store at ``path``: complete, or left by a dead
    process after a flush (kept when it closes again).

    The cache joins its pool first, so that the store reads and writes through the
    pool's buffers (within the process's budget). Reading, checking and tidying the
    store happen without the pool's lock; its records and batches are recorded with
    the lock held (other caches of the pool may be running), with no I/O under it. On
    any error the pool is left as it was: the cache's records and share go again.
    """
    read_root_attributes(path)  # no store there: refused before a pool is joined for it
    kept = config.replace(disk_path=str(Path(path).parent), keep_store=True)
    core = CacheCore(kept, CPU)
    try:
        store = Store.open(
            path,
            direct_io=config.direct_io,
            writers=config.io_threads,
            shared=core.pool.buffers,
        )
        crashed = _left_by_a_crash(store)
        found = store_checks.survey(store, structures=True)
        leftovers = _leftovers(found)  # a complete store keeps its own (`spillcache gc`)
        dropped = list(leftovers.items()) if crashed else []
        # What a crash left may not read; in a complete store only an array a deletion
        # cut short may not (one with a symbolic link for its chunk is damage there).
        allowed = {name for name in leftovers if crashed or deletion_cut_short(store.path, name)}
        _refuse_damage(store, found, allowed=allowed)
        store.checksum = _checksum(store, found, config)
        said = _remove_leftovers(store, found, dropped) if crashed else ""
        if said:
            # Said before the pool takes the store in: where warnings are errors, this
            # raises with nothing adopted and the store's root as the crash left it.
            warnings.warn(said, stacklevel=3)
        devices = _devices(found)  # may ask the accelerator's driver: not under the lock
        store.keep = True
        if crashed:  # what a flush kept of the one before was dropped with the leftovers
            store.attributes.pop("note_before", None)
        with core.pool.lock:
            batches = _adopt(core, store, found, devices, crashed=crashed)
        # Open again: this process owns it now, and it is not complete until this cache
        # closes and writes it whole.
        store.write_root_attributes(
            complete=False, num_batches=batches, durable=True, flush=found.flush
        )
    except BaseException:
        _abandon(core)
        raise
    return core


def go_back_one_flush(path: str | os.PathLike[str]) -> int:
    """Make the kept store at ``path``, left by a dead process, open as of the flush
    before its last (which must have kept it: ``keep_previous``): its root, rewritten
    atomically and durably, counts that flush and carries its note. Batches the last
    flush wrote are then read as they were (their ``before``), and the arrays only the
    last flush named are dropped when the store is opened. The flush's number. For a
    store whose flushes recorded the same batches (a calibration's pipeline cache): a
    batch the last flush added has nothing to go back to, and is refused."""
    attributes = read_root_attributes(path)
    flush = attributes.get("flush")
    if "note_before" not in attributes or type(flush) is not int or flush < 1:
        raise StoreFormatError(
            f"{path} cannot be opened as of the flush before its last: that flush was "
            "not kept (flush(keep_previous=True))"
        )
    if attributes.get("complete") is True:
        raise StoreFormatError(f"{path} is complete: its flushes are not kept any more")
    # Checked whole before the root changes: every structure of that flush there, and
    # every array it names (a refusal leaves the store as it was).
    store = Store.open(path)
    try:
        found = store_checks.survey(store, structures=True, as_of=flush - 1)
    finally:
        store.close()
    used_and_bad = [text for name, text in found.bad_arrays.items() if name in found.used]
    problems = found.problems + used_and_bad
    if problems:
        raise StoreFormatError(
            f"{path} cannot be opened as of the flush before its last: {problems[0]}"
        )
    earlier = {key: value for key, value in attributes.items() if key != "note_before"}
    earlier.update(flush=flush - 1, note=attributes["note_before"])
    if earlier["note"] is None:
        del earlier["note"]
    write_root_json(Path(path), earlier)
    return flush - 1


def _adopt(
    core: CacheCore,
    store: Store,
    found: store_checks.Survey,
    devices: dict[torch.device, torch.device],
    *,
    crashed: bool,
) -> int:
    """Pool's lock held, no I/O: the store's arrays become records of the cache (disk
    bytes counted), its entries the cache's batches; how many batches there are."""
    core.tenant.attach(store)
    # Every array's record number, removed ones' and a cut-short write's ("17.<hex>.partial")
    # too; a name no reader takes ("²0", 20 digits) numbers nothing.
    names = [name for name in found.kinds if STORED_NAME.fullmatch(name.partition(".")[0])]
    core.placement.skip_record_ids(names)
    records: dict[str, TensorRecord] = {}
    batches: list[dict[str, Entry]] = [{} for _ in range(found.batches)]
    for index, key, spec, refs in found.entries:
        leaves = [
            _record(core, records, found.arrays[ref.array], ref, devices[ref.device], index, key)
            for ref in refs
        ]
        batches[index][key] = Entry(spec, leaves, [])
    core.adopt_batches(batches)
    opened(core.tenant, set(records), found.flush, found.structures, crashed=crashed)
    return len(batches)


def _abandon(core: CacheCore) -> None:
    """Undo a reopen that failed: the cache's records (and their disk bytes) and its
    share leave the pool, and it leaves the pool. The store stays on disk as found
    (less a crash's leftovers, if they were removed already), and can be opened again."""
    tenant = core.tenant
    with core.pool.lock:
        core.placement.remove_tenant(tenant)  # its arrays are not deleted
    if tenant.has_store:
        tenant.store.close()
    core.pool.leave()


def _left_by_a_crash(store: Store) -> bool:
    """Whether ``store`` is incomplete and can be opened as its last flush left it
    (its process is dead); a complete store is False; anything else is refused."""
    attributes = store.attributes
    if attributes.get("complete") is True:
        return False
    # A process that let its store go as its last flush left it (persist.leave_as_flushed)
    # is as good as dead for it.
    alive = False if attributes.get("released") is True else owner_alive(attributes)
    owner = f"pid {attributes.get('pid')!r} on {attributes.get('hostname')!r}"
    if alive:
        raise StoreFormatError(
            f"{store.path} is not complete and its process ({owner}) still runs: it is "
            "that cache's. Close it there (with keep_store = true), or open the store "
            "once that process has ended"
        )
    if alive is None:
        raise StoreFormatError(
            f"{store.path} is not complete and its process ({owner}) cannot be checked "
            "from this host: open it on that host, once the process has ended"
        )
    recorded = attributes.get("num_batches")
    if attributes.get("keep") is not True and not (type(recorded) is int and recorded > 0):
        raise StoreFormatError(
            f"{store.path} is not complete: its run ({owner}, now dead) neither closed "
            "nor flushed with keep_store = true, so it records no batch structures "
            "(`spillcache inspect` lists its arrays)"
        )
    return True


def _leftovers(found: store_checks.Survey) -> dict[str, str]:
    """What a crash may leave in ``tensors/`` that no structure names, by name: whole
    arrays written after the last flush (``"after"``) and ``"incomplete"`` ones (or
    ``.partial`` files). A store never holds links or stray files: those stay problems."""
    leftovers = {}
    for name, kind in found.unused.items():
        if kind == "array" and name in found.arrays:
            leftovers[name] = "after"
        elif kind in ("array", "incomplete", "partial"):
            leftovers[name] = "incomplete"
    return leftovers


def _refuse_damage(store: Store, found: store_checks.Survey, allowed: set[str]) -> None:
    """StoreCorruptError unless every problem of the store is something a crash leaves
    (``allowed``): one line, the first problem and how many more there are."""
    bad = {name: text for name, text in found.bad_arrays.items() if name not in allowed}
    problems = store_checks.Survey(used=found.used, bad_arrays=bad, problems=found.problems)
    lines = problems.all_problems()
    if lines:
        more = f" (and {len(lines) - 1} more: `spillcache verify` lists them)" if lines[1:] else ""
        raise StoreCorruptError(
            f"{store.path} is damaged, so it is not opened: {lines[0]}{more}; it was changed "
            "by something other than spillcache, or its disk failed"
        )


def _checksum(store: Store, found: store_checks.Survey, config: CacheConfig) -> bool:
    """The store's checksum setting: its arrays' (all alike), else the config's."""
    settings = {found.arrays[name].checksum for name in found.used}
    if len(settings) > 1:
        raise StoreCorruptError(
            f"{store.path} is damaged, so it is not opened: some of its arrays carry a "
            "CRC32C and some do not, and spillcache writes every array of a store alike"
        )
    return settings.pop() if settings else config.checksum


def _remove_leftovers(
    store: Store, found: store_checks.Survey, dropped: list[tuple[str, str]]
) -> str:
    """Remove what a crash left that the last flush does not name; the warning that
    says what was dropped."""
    after, incomplete = [], []
    flushed = {(index, key) for index, key, _, _ in found.entries}
    for name, why in dropped:
        if why == "after":
            info = found.arrays[name]
            newer = "a newer value of " if (info.batch, info.key) in flushed else ""
            after.append(f"{newer}{info.owner}")
        else:
            incomplete.append(array_ref(name))
        _remove(tensors_dir(store.path) / name)
    leftovers = _stray_files(store, found.batches)
    for path in leftovers:
        _remove(path)
    pid = store.attributes.get("pid")
    parts = [
        f"{store.path}: its process (pid {pid}) died without closing it; opened the "
        f"{found.batches} batches its last flush() recorded ({len(found.entries)} entries)"
    ]
    if after:
        parts.append(
            f"dropped {len(after)} arrays that flush does not name, written after it or "
            f"superseded by it ({_listed(after)})"
        )
    if incomplete:
        parts.append(f"dropped {len(incomplete)} incomplete arrays ({_listed(incomplete)})")
    if leftovers:
        parts.append(f"removed {len(leftovers)} unfinished files and unrecorded batches")
    return "; ".join(parts)


def _listed(items: list[str]) -> str:
    unique = list(dict.fromkeys(items))
    shown = "; ".join(unique[:_SHOWN])
    return f"{shown}; and {len(unique) - _SHOWN} more" if len(unique) > _SHOWN else shown


def _stray_files(store: Store, batches: int) -> list[Path]:
    """Unfinished ``.partial`` files of the root and batch structures, and batch
    directories past the recorded count (a flush that died before its root)."""
    found = [p for p in store.path.iterdir() if p.name.endswith(".partial")]
    for entry in (store.path / "batches").iterdir():
        if entry.name.endswith(".partial"):
            found.append(entry)
        # Only the names the writer gives batches (and recorded_batches counts): "²" or
        # "007" is none, and str.isdigit() takes "²" while int() refuses it.
        elif BATCH_NAME.fullmatch(entry.name) and not entry.is_symlink() and entry.is_dir():
            if int(entry.name) >= batches:
                found.append(entry)
            else:
                found += [p for p in entry.iterdir() if p.name.endswith(".partial")]
    return found


def _remove(path: Path) -> None:
    """Remove a file or a directory of the store (never following a link)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _record(
    core: CacheCore,
    records: dict[str, TensorRecord],
    info: store_checks.ArrayInfo,
    ref: store_checks.TensorRef,
    device: torch.device,
    batch: int,
    key: str,
) -> TensorRecord:
    """Pool's lock held: the record of an array (one per array, however many entries
    use it), held once more for this use."""
    record = records.get(info.name)
    if record is None:
        record = core.placement.adopt(
            info.name,
            info.shape,
            info.dtype,
            device,
            ref.requires_grad,
            tenant=core.tenant,
            batch=batch,
            label=store_checks.entry_where(batch, key),
        )
        record.key = key
        records[info.name] = record
    core.placement.hold(record)
    return record


def _devices(found: store_checks.Survey) -> dict[torch.device, torch.device]:
    """Where the values of each recorded device go when fetched."""
    recorded = {ref.device for _, _, _, refs in found.entries for ref in refs}
    return {device: _device(device) for device in recorded}


def _device(device: torch.device) -> torch.device:
    """Where a value goes when fetched: its recorded device, or the CPU where that
    device is not present (no device of its kind, or fewer than its index: a store
    written on cuda:7 of an 8-GPU node, opened on a 1-GPU machine)."""
    if device.type == "cpu":
        return device
    module = getattr(torch, device.type, None)
    available = getattr(module, "is_available", None)
    if not (callable(available) and available()):
        return CPU
    count = getattr(module, "device_count", None)
    if device.index is not None and callable(count) and device.index >= count():
        return CPU
    return device
