"""What one decision under the pool's lock leaves behind: its effects, what it needs
made first, and how it is taken back.

Placement decides under the pool's lock, and there it never does I/O, never waits
and never calls back into its callers. A decision that moves values to disk leaves
*effects*: the writes and deletions the pool's transaction (``SharedPool.transact``)
hands to the I/O lanes when the decision is over. A decision that can only be made
once slow work is done (a cache's store made on a disk it never wrote to; a device
value copied to host memory) records that work in ``Needs`` and raises ``NeedsFirst``:
the decision is taken back, the transaction does the work with the lock released and
decides again, now finding the store there and the copy made.

Taking a decision back is ``Journal.undo``: placement records, as it goes, the step
that reverses each of its changes (a value put in a tier is taken out, a value taken
out is put back, a queued write leaves the queue); undoing runs them last first, so
that a failed ``admit`` leaves the same values in the same tiers, the same writes
queued and the same counts as before. Nothing has reached the lanes by then: effects
are handed over only when the decision is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .records import TensorRecord
    from .tenants import Tenant

__all__ = ["FINAL", "Journal", "Needs", "NeedsFirst", "copy_key"]


class NeedsFirst(Exception):
    """Raised by a decision that needs slow work done first (see ``Needs``); never
    reaches a caller of the cache: the transaction does the work and decides again."""


def copy_key(tensor: torch.Tensor) -> tuple:
    """What a host copy of a new value is asked for and found by: the bytes it views
    (device, storage, offset, shape, strides, dtype). Its record is made anew each time
    its decision is, with a new id, so a copy made for one try is found by the next
    through its bytes, which the caller's ``update`` holds meanwhile. (A stored value's
    copy is found by its record: its memory may be the caller's again once deleted.)"""
    return (
        tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
        tuple(tensor.shape), tensor.stride(), tensor.dtype,
    )  # fmt: skip


@dataclass
class Needs:
    """The slow work decisions asked for since the transaction began."""

    stores: set[tuple[Tenant, int]] = field(default_factory=set)  # (cache, disk) to make
    copies: dict[tuple, torch.Tensor] = field(default_factory=dict)  # see copy_key
    # Values read from disk whose promotion waits for a store: (record, value, asked).
    promotions: list[tuple[TensorRecord, torch.Tensor, bool]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stores or self.copies or self.promotions)


class Journal:
    """The steps that take back one decision, last first (``undo``), and those that
    wait until it is kept (``commit``)."""

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._at_commit: list[Callable[[], None]] = []

    def on_undo(self, step: Callable[[], None]) -> None:
        self._undo.append(step)

    def at_commit(self, step: Callable[[], None]) -> None:
        self._at_commit.append(step)

    def undo(self) -> None:
        for step in reversed(self._undo):
            step()

    def commit(self) -> None:
        for step in self._at_commit:
            step()


class _Final(Journal):
    """Outside an admit: every step is final as it happens."""

    def on_undo(self, step: Callable[[], None]) -> None:
        pass

    def at_commit(self, step: Callable[[], None]) -> None:
        step()


FINAL = _Final()
