"""The records a cache keeps: ``TensorRecord``, one tiered tensor as placement tracks
it; ``Entry``, what a batch holds under one key; ``InlineTensor``, a tensor kept with
its entry.

A ``TensorRecord`` is stored once however many entries share it (``refs``), with its
primary copy in a memory tier (``resident``), in the write-behind area (``write_state``)
or only on disk (``on_disk``, in ``array`` on disk ``disk``). ``spillcache.placement`` moves it; the
cache and its reads only look at it, with the pool's lock held.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from .tenants import Tenant

__all__ = ["QUEUED", "WRITING", "Entry", "InlineTensor", "TensorRecord", "records_of"]

# TensorRecord.write_state: where its pending disk write stands.
QUEUED = "queued"  # in the write-behind area, not yet handed to a thread
WRITING = "writing"  # handed to a thread


@dataclass(eq=False)
class TensorRecord:
    rid: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    onload_device: torch.device
    requires_grad: bool
    batch: int = 0  # where the scan policy expects its next use
    label: str = ""  # "batch 3, key 'hidden'", for error messages
    key: str | None = None  # the key it was stored under, recorded in its array's attributes
    refs: int = 0
    on_disk: bool = False
    resident: str | None = None  # "device" or "host"; None when not in a memory tier
    write_state: str | None = None  # QUEUED, WRITING, or None: no pending write
    loading: Future | None = None  # a disk read in flight; others wait on it
    alive: bool = True
    identity: int = 0  # id() of the tensor it was stored from, for sharing
    tenant: Tenant | None = field(default=None, repr=False)  # the cache it belongs to
    array: str = ""  # the store array holding its disk copy (a new name for every write)
    disk: int = 0  # which of the disk directories that array is on
    disk_writes: int = 0
    # Why its last disk write failed; set while it waits in the host tier, unwritten.
    write_error: BaseException | None = field(default=None, repr=False)


class InlineTensor(NamedTuple):
    """A tensor kept with its entry in RAM: too small to tier, or not tierable."""

    tensor: torch.Tensor
    onload_device: torch.device
    requires_grad: bool


@dataclass
class Entry:
    """One key of a batch: the value's spec (``tree.flatten``), its tensor leaves in
    order (tiered records or inline tensors), and its opaque leaves. Never mutated:
    ``update`` replaces the whole entry, so readers may use one outside the lock."""

    spec: tuple
    leaves: list[TensorRecord | InlineTensor]
    opaques: list[Any]


def records_of(entry: Entry) -> Iterable[TensorRecord]:
    return (leaf for leaf in entry.leaves if isinstance(leaf, TensorRecord))
