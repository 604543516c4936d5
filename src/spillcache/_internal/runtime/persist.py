"""A kept store (``keep_store``) made durable: whole on close, and as far as the cache
got on every ``flush()``.

What makes a kept store survive a crash is one order, kept on flush and close alike:
the arrays a set of batch structures names are written (durably) first, then the
structures (each batch's zarr.json atomically, durably), then the root; an array that
the structures on disk may still name is deleted only after structures that no longer
name it are on disk. So at every instant each batch's structure names arrays that
exist, and reopening the store after a crash (``reopen``) finds every entry the last
flush recorded.

A flush is all or nothing across batches: flushes are numbered, a batch it rewrites
keeps the structure it replaces (``before``), and the root's ``flush`` number, written
last, is what completes it; readers take ``before`` from a batch written by a flush
the root does not count yet. Batches whose structure did not change are not written.

During a run the cache deletes arrays it no longer needs in the background (a
transaction's effects); for a kept store, a deletion of an array the flushed
structures name waits for the next flush or close (``KeptStructures.defers_deletion``:
what this module knows of the store's structures lives on its ``Tenant``).

A flush may also keep the flush before it readable (``keep_previous``): the arrays
only that one names stay until ``release_previous``, the batches keep its structures
as ``before`` and the root keeps its note as ``note_before``, so that a store left by
a crash can be opened as of either (``reopen.go_back_one_flush``). Several ranks committing
one checkpoint together need this: a rank that flushed cannot know the others did
until they say so.

``flush()`` writes outside the pool's lock: under it, a snapshot of the structures
and the values only in memory (and a fresh array name for each), then the writes
with the lock released, then, under it again, each written record takes its copy
unless it changed meanwhile. Closing writes without the lock too: under it, the
values handed over and the deletions taken; then nothing else uses the closed
cache's values nor its store (other caches evict none of them, its jobs are over).
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from spillcache.errors import StoreError

from .. import dtypes
from ..engine.placement import Placement, TensorRecord
from ..engine.records import Entry, InlineTensor
from ..engine.tenants import KeptStructures, Tenant
from ..io import transfers
from ..io.chunkio import fsync_directory
from ..store.failures import naming
from ..store.store_checks import array_name
from ..store.store_format import (
    batch_dir,
    read_root_attributes,
    stored_tensor_node,
    tensors_dir,
    unstored_tensor_node,
)
from ..store.tensor_store import TensorStore, write_root_json
from ..tree import spec_to_json

if TYPE_CHECKING:
    from .pool import SharedPool

__all__ = ["complete_on_close", "make_durable", "opened", "release_previous"]


def _state(tenant: Tenant) -> KeptStructures:
    if tenant.kept is None:
        tenant.kept = KeptStructures()
    return tenant.kept


def opened(
    tenant: Tenant,
    names: set[str],
    flush: int,
    structures: list[tuple[int, dict]],
    *,
    crashed: bool,
) -> None:
    """Pool's lock held, for a reopened cache: the structures on disk name ``names``;
    they are those of flush number ``flush``, each batch's as ``structures`` gives it
    (flush, JSON). A ``crashed`` run may have left batches of an unfinished flush: the
    next flush rewrites them all."""
    state = _state(tenant)
    state.named = set(names)
    state.flush = flush
    state.committed = dict(enumerate(structures))
    state.rewrite_all = crashed


# ---------------------------------------------------------------------- flush


@dataclass
class _Snapshot:
    """What one flush writes, taken under the lock."""

    batches: list[list[tuple[str, Entry]]]
    # rid -> (record, its value, the new array's name) for values only in memory
    records: dict[int, tuple[TensorRecord, torch.Tensor, str]] = field(default_factory=dict)
    inline: dict[int, tuple[InlineTensor, str | None, tuple[int, str]]] = field(
        default_factory=dict
    )  # id(leaf) -> (leaf, its array if a flush wrote it already, owner)
    # rid -> its array, for values on disk when the snapshot was taken (a record may be
    # written again under another name while the flush runs without the lock)
    on_disk: dict[int, str] = field(default_factory=dict)


def make_durable(
    pool: SharedPool,
    tenant: Tenant,
    batches: list[dict[str, Entry]],
    note: dict | None = None,
    *,
    keep_previous: bool = False,
) -> None:
    """A kept store's ``flush()``: every value only in memory written, then every
    batch's structure, then the root's count of batches (and ``note``, the owner's,
    where given), all durably; arrays that no structure on disk names any more deleted
    last, or with ``keep_previous`` kept (with the flush before's note) until
    ``release_previous``. Call without the pool's lock."""
    pool.make_store(tenant, 0)  # a kept store exists from its first flush
    with pool.lock:
        state = _state(tenant)
        pool.write_finished.wait_for(
            lambda: tenant.closed or (tenant.writes_in_flight == 0 and not state.flushing)
        )
        if tenant.closed:  # closing writes the store whole
            return
        state.flushing = True
        try:
            store = tenant.store
            snapshot = _snapshot(pool.placement, batches, state)
            state.named |= set(snapshot.on_disk.values())
            state.named |= {name for _, name, _ in snapshot.records.values()}
        except BaseException:
            state.flushing = False
            raise
    written: list[tuple[TensorRecord, str]] = []
    inline: dict[int, tuple[InlineTensor, str]] = {}
    committed = None
    before = store.attributes
    try:
        # Written with the root, which commits this flush; a flush that does not keep
        # the one before drops the note of a flush it no longer keeps.
        if note is not None or keep_previous or "note_before" in before:
            # A copy: the caller may change its objects after this flush (a later flush
            # that keeps this one writes this note again, as it is now).
            note = json.loads(json.dumps(note)) if note is not None else before.get("note")
            previous = {"note_before": before.get("note")} if keep_previous else {}
            kept = {key: value for key, value in before.items() if key != "note_before"}
            store.attributes = {**kept, "note": note, **previous}
        committed = _write(store, snapshot, state, written, inline)
    except BaseException:
        store.attributes = before  # a flush that did not commit leaves the note before
        raise
    finally:
        with pool.lock:
            named_before = state.named
            doomed = _settle(pool.placement, state, snapshot, written, inline, committed)
            if committed is not None:  # what the flush before kept is let go now
                older = _let_go_of_previous(state)
                if keep_previous:
                    doomed, state.previous = older, doomed
                    state.previous_named = named_before - state.named
                else:
                    doomed |= older
            state.flushing = False
            pool.write_finished.notify_all()
    for name in doomed:
        store.delete_tensor(name)


def release_previous(pool: SharedPool, tenant: Tenant) -> None:
    """Delete the arrays only the flush before the last named (kept by a flush with
    ``keep_previous``): the store can no longer go back to it. Call without the
    pool's lock."""
    with pool.lock:
        state = tenant.kept
        if state is None:
            return
        pool.write_finished.wait_for(lambda: not state.flushing)
        doomed = _let_go_of_previous(state)
        store = tenant.store
    for name in doomed:
        store.delete_tensor(name)


def _let_go_of_previous(state: KeptStructures) -> set[str]:
    """Lock held: the arrays only the kept flush before the last named, to delete; the
    store no longer keeps that flush."""
    doomed, state.previous, state.previous_named = state.previous, set(), set()
    return doomed


def leave_as_flushed(pool: SharedPool, tenant: Tenant) -> None:
    """On close of a cache that keeps only what its flushes committed
    (``CacheCore.keeps_only_flushed``: a calibration checkpoint's store, whose
    values between two checkpoints belong to no checkpoint): nothing more is written
    into the store, whatever made the cache close (an exception, the interpreter's
    exit); its root says the process let it go, so that it opens as the last flush
    left it, in this process too (``reopen``). Call without the pool's lock."""
    with pool.lock:
        state = tenant.kept
        # A flush() on another thread writes into the store with the lock released.
        pool.write_finished.wait_for(lambda: state is None or not state.flushing)
        tenant.kept = None
    if not tenant.has_store:
        return
    path = tenant.store.path
    attributes = read_root_attributes(path)
    if attributes.get("flush"):  # never flushed: nothing in it to open again
        write_root_json(Path(path), {**attributes, "released": True})


def _snapshot(
    placement: Placement, batches: list[dict[str, Entry]], state: KeptStructures
) -> _Snapshot:
    """Lock held: the batches' entries as they are, and the values to write."""
    snapshot = _Snapshot([list(batch.items()) for batch in batches])
    for index, batch in enumerate(snapshot.batches):
        for key, entry in batch:
            for leaf in entry.leaves:
                if isinstance(leaf, TensorRecord):
                    if leaf.rid in snapshot.records or leaf.rid in snapshot.on_disk:
                        continue
                    if _on_disk(leaf):
                        snapshot.on_disk[leaf.rid] = leaf.array
                        continue
                    value = placement.memory_copy(leaf)
                    if value is None:  # never: writes were waited for, and nothing else drops it
                        raise StoreError(f"{leaf.label}: no copy in memory or on disk to flush")
                    name = placement.new_array_name(leaf)
                    snapshot.records[leaf.rid] = (leaf, value, name)
                elif dtypes.is_tierable(leaf.tensor) and id(leaf) not in snapshot.inline:
                    known = state.inline.get(id(leaf))
                    array = known[1] if known is not None and known[0] is leaf else None
                    snapshot.inline[id(leaf)] = (leaf, array, (index, key))
    return snapshot


def _on_disk(record: TensorRecord) -> bool:
    return record.on_disk and record.write_state is None


def _write(
    store: TensorStore,
    snapshot: _Snapshot,
    state: KeptStructures,
    written: list[tuple[TensorRecord, str]],
    inline: dict[int, tuple[InlineTensor, str]],
) -> dict[int, tuple[int, dict]]:
    """Lock not held: the arrays, then the structures, then the root, durably; the
    structures now recorded, by batch."""
    names = _inline_names(store, state)
    for key, (leaf, array, owner) in snapshot.inline.items():
        if array is None:
            array = next(names)
            tensor = transfers.to_host(leaf.tensor.detach()).contiguous()
            store.write_tensor(array, tensor, owner=owner)
        inline[key] = (leaf, array)
    for record, value, name in snapshot.records.values():
        tensor = transfers.to_host(value.detach()).contiguous()
        store.write_tensor(name, tensor, owner=record.owner)
        written.append((record, name))
    # These arrays and those the I/O threads wrote since the last flush, with every
    # directory on the way to them, fsync'd before any structure names them.
    store.sync_written()
    planned = {**snapshot.on_disk}
    planned.update({rid: name for rid, (_, _, name) in snapshot.records.items()})
    structures = []
    for batch in snapshot.batches:
        entries = {}
        for key, entry in batch:
            described = [_leaf_json(leaf, planned, inline) for leaf in entry.leaves]
            entries[key] = spec_to_json(entry.spec, described.__getitem__)
        structures.append(entries)
    return _commit(store, state, structures, complete=False)


def _commit(
    store: TensorStore, state: KeptStructures, structures: list[dict], *, complete: bool
) -> dict[int, tuple[int, dict]]:
    """Write the batches whose structure changed since the last flush, each keeping the
    one it replaces as ``before``; then the root, which completes this flush: until
    then readers take every batch as the last flush left it."""
    flush = state.flush + 1
    committed = {}
    for index, entries in enumerate(structures):
        before = state.committed.get(index)
        if before is not None and before[1] == entries and not state.rewrite_all:
            committed[index] = before
            continue
        store.write_batch(index, entries, durable=True, flush=flush, before=before)
        committed[index] = (flush, entries)
    fsync_directory(batch_dir(store.path))  # new batch directories' entries
    store.write_root_attributes(
        complete=complete, num_batches=len(structures), durable=True, flush=flush
    )
    return committed


def _settle(
    placement: Placement,
    state: KeptStructures,
    snapshot: _Snapshot,
    written: list[tuple[TensorRecord, str]],
    inline: dict[int, tuple[InlineTensor, str]],
    committed: dict[int, tuple[int, dict]] | None,
) -> set[str]:
    """Lock held, after the writes: records take the copies written for them; if the
    flush completed (``committed``), what no structure on disk names any more is
    returned for deletion."""
    for record, name in written:
        if not placement.took_copy(record, name):
            state.unowned.add(name)  # the new structures name it; the next flush frees it
    state.unowned |= {array for _, array in inline.values()}
    if committed is None:  # structures on disk may be old or new: both stay named
        state.rewrite_all = True
        return set()
    state.flush += 1
    state.committed = committed
    state.rewrite_all = False
    names = {name for _, name in written} | {array for _, array in inline.values()}
    names |= set(snapshot.on_disk.values())
    doomed = (state.deferred | state.unowned) - names
    state.deferred -= doomed
    state.unowned -= doomed
    state.named = names
    state.inline = inline
    return doomed


def _inline_names(store: TensorStore, state: KeptStructures) -> Iterator[str]:
    """Fresh names for small tensors: none an array (whole or half-written) has."""
    taken = set(os.listdir(tensors_dir(store.path))) | {name for _, name in state.inline.values()}
    return (name for n in itertools.count() if (name := f"i{n}") not in taken)


def _leaf_json(
    leaf: TensorRecord | InlineTensor,
    planned: dict[int, str],
    inline: dict[int, tuple[InlineTensor, str]],
) -> dict:
    if isinstance(leaf, TensorRecord):
        name = planned.get(leaf.rid, leaf.array)
    elif id(leaf) in inline:
        name = inline[id(leaf)][1]
    else:
        return _unstored(leaf)
    return _stored(leaf, name)


def _stored(leaf: TensorRecord | InlineTensor, name: str) -> dict:
    return stored_tensor_node(name, leaf.onload_device, leaf.requires_grad)


def _unstored(leaf: InlineTensor) -> dict:
    return unstored_tensor_node(leaf.onload_device)


# ---------------------------------------------------------------------- close


def complete_on_close(
    pool: SharedPool, tenant: Tenant, batches: list[dict[str, Entry]], only_flushed: bool
) -> None:
    """On close, without the pool's lock (nothing else uses a closed cache's values nor
    writes into its store any more): the kept store completed (``persist``), or with
    ``only_flushed`` left as its last flush committed it (``leave_as_flushed``)."""
    try:
        if only_flushed:
            leave_as_flushed(pool, tenant)
        else:
            pool.make_store(tenant, 0, closing=True)  # kept even if nothing spilled
            persist(pool, tenant, batches)
    except StoreError as error:
        where = tenant.store.path if tenant.has_store else pool.disk_dirs[0]
        note = "the store stays, not marked complete"
        raise naming(error, f"completing the kept store {where}", note) from None


def persist(pool: SharedPool, tenant: Tenant, batches: list[dict[str, Entry]]) -> None:
    """On close, without the pool's lock: every tensor of the cache (from every tier,
    whatever disk_bytes says: a write still marked pending is simply written again,
    atomically) and every batch's structure, durably; then the arrays no structure
    names any more are deleted (those whose background deletion the pool did not get
    to among them); then the root's ``complete`` flag, last: a store marked complete
    holds everything, and nothing but what its structures name."""
    with pool.lock:
        state = _state(tenant)
        # A flush() on another thread writes into the store with the lock released: its
        # structures must not land after these.
        pool.write_finished.wait_for(lambda: not state.flushing)
        values = pool.placement.to_persist(tenant)
        taken = pool.placement.take_deletions(tenant)
        doomed = tenant.deleting | {name for _, _, name in taken}
    store = tenant.store
    for record, tensor in values:
        tensor = transfers.to_host(tensor.detach()).contiguous()
        store.write_tensor(record.array, tensor, owner=record.owner)
    names = _inline_names(store, state)
    known = state.inline
    referenced: set[str] = set()
    structures = []
    for index, batch in enumerate(batches):
        entries = {}
        for key, entry in batch.items():
            described = []
            for leaf in entry.leaves:
                node = _close_leaf(store, leaf, known, names, (index, key))
                if node.get("array"):
                    referenced.add(array_name(node["array"]))
                described.append(node)
            entries[key] = spec_to_json(entry.spec, described.__getitem__)
        structures.append(entries)
    store.sync_written()
    _commit(store, state, structures, complete=True)
    # Last: a crash before this leaves arrays no structure names (the next open drops
    # them), never a structure naming a deleted array.
    superseded = doomed | state.deferred | state.unowned | state.previous | tenant.deleting
    for name in superseded - referenced:
        store.delete_tensor(name)
    tenant.kept = None


def _close_leaf(
    store: TensorStore,
    leaf: TensorRecord | InlineTensor,
    known: dict[int, tuple[InlineTensor, str]],
    names: Iterator[str],
    owner: tuple[int, str],
) -> dict:
    """JSON for one tensor leaf, writing small tensors a flush did not write."""
    if isinstance(leaf, TensorRecord):
        return _stored(leaf, leaf.array)
    if not dtypes.is_tierable(leaf.tensor):
        return _unstored(leaf)
    flushed = known.get(id(leaf))
    if flushed is not None and flushed[0] is leaf:
        return _stored(leaf, flushed[1])
    name = next(names)
    tensor = transfers.to_host(leaf.tensor.detach()).contiguous()
    store.write_tensor(name, tensor, owner=owner)  # synced with the rest before the commit
    known[id(leaf)] = (leaf, name)
    return _stored(leaf, name)
