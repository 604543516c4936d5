"""One fetch's disk reads: planned under the cache's lock, done outside it.

``plan`` (lock held) takes what memory has and *holds* every record that must come
from disk, so a concurrent delete cannot remove its file. ``read`` (lock not held)
reads those records, or waits for a read of the same record already in flight on
another thread (its ``loading`` Future), so no record is read twice at once. The
cache then finishes under the lock: promotion, release, and clearing ``loading``.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any, NamedTuple

import torch

from spillcache.errors import StoreError

from ..engine.placement import Placement, TensorRecord
from ..io.transfers import Ready
from ..store.failures import naming

__all__ = ["Fetched", "Loads", "maps", "plan", "read"]


class Fetched(NamedTuple):
    """What a fetch gives back (``CacheCore.fetch_versioned``)."""

    generation: int
    values: dict[str, Any]
    ready: Ready
    read: list[tuple[TensorRecord, torch.Tensor]]  # promoted when the caller takes them


class Loads:
    """The records one fetch needs: found in memory, to read, or being read by another."""

    def __init__(self) -> None:
        self.found: dict[int, torch.Tensor] = {}
        self.held: list[TensorRecord] = []
        self.to_read: list[TensorRecord] = []
        self.to_wait: list[tuple[TensorRecord, Future]] = []
        self.read: dict[int, torch.Tensor] = {}  # filled by read()


def plan(placement: Placement, records: Iterable[TensorRecord]) -> Loads:
    """Lock held: take what memory has; hold every record that must come from disk."""
    loads = Loads()
    for record in records:
        if record.rid in loads.found or record in loads.held:
            continue
        tensor = placement.begin_load(record)
        if tensor is not None:
            loads.found[record.rid] = tensor
            continue
        placement.hold(record)
        loads.held.append(record)
        if record.loading is None:
            record.loading = Future()
            loads.to_read.append(record)
        else:
            loads.to_wait.append((record, record.loading))
    return loads


def read(loads: Loads, *, pin_host: bool, read_mode: str) -> BaseException | None:
    """Lock not held: read (or wait for) the held records; the first error, if any.
    ``pin_host``: values for an accelerator are read into pinned memory.

    Every read's outcome goes to its ``loading`` Future too, for whoever waits on it.
    """
    error: BaseException | None = None
    for record in loads.to_read:
        try:
            tensor = _read_record(record, pin_host, read_mode)
        except BaseException as caught:
            record.loading.set_exception(caught)
            error = error or caught
        else:
            record.loading.set_result(tensor)
            loads.read[record.rid] = tensor
    for record, future in loads.to_wait:
        try:
            loads.found[record.rid] = future.result()
        except BaseException as caught:
            error = error or caught
    return error


def maps(record: TensorRecord, read_mode: str) -> bool:
    """read_mode "mmap": a value for the CPU is mapped, not read (nor promoted)."""
    return read_mode == "mmap" and record.onload_device.type == "cpu"


def _read_record(record: TensorRecord, pin_host: bool, read_mode: str) -> torch.Tensor:
    pin = pin_host and record.onload_device.type != "cpu"
    try:
        return record.tenant.store_on(record.disk).read_tensor(
            record.array, record.shape, record.dtype, pin=pin, mapped=maps(record, read_mode)
        )
    except StoreError as error:  # name the entry, not just the file
        raise naming(error, record.label) from None
