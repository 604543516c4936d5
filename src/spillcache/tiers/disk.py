"""The disk tier: the bytes of tensors on one or more disks, with a byte budget."""

from __future__ import annotations

from collections.abc import Callable

from .budget import BudgetedTier

__all__ = ["DiskTier"]

# Disks whose free space is within this much of the freest one count as equally free.
_EQUAL_FREE_FRACTION = 0.01
_EQUAL_FREE_BYTES = 64 * 2**20


class DiskTier(BudgetedTier[int]):
    """Sizes of the tensors it holds on disk, by record id (``None`` budget: no limit
    over all disks together).

    A tensor's bytes are *reserved* when its background write is queued, so the budget
    holds while writes are in flight. The files themselves are in each cache's stores
    (``Tenant.store_on``), one per disk; writing, reading and deleting them is the
    cache's, on its I/O threads.

    :param disks: how many disk directories there are (``disk_path`` may list several)
    :param free_bytes: free space of disk ``i`` now (a statvfs, given by the pool so
        that the tier itself stays a plain container); ``None``: all equally free
    """

    name = "disk"

    def __init__(
        self,
        budget: int | None,
        disks: int = 1,
        free_bytes: Callable[[int], int] | None = None,
    ) -> None:
        super().__init__(budget)
        self.disks = disks
        self._free_bytes = free_bytes
        self._disk_of: dict[int, int] = {}
        self.bytes_on = [0] * disks  # reserved bytes per disk
        self._last = -1  # the disk chosen last, for round-robin among equals

    def choose(self) -> int:
        """The disk for the next tensor: the one with the most free space, round-robin
        among disks about as free as it (so identical drives take turns)."""
        if self.disks == 1:
            return 0
        if self._free_bytes is None:
            free = [0] * self.disks
        else:
            free = [self._free_bytes(disk) for disk in range(self.disks)]
        most = max(free)
        slack = max(_EQUAL_FREE_BYTES, int(most * _EQUAL_FREE_FRACTION))
        for step in range(1, self.disks + 1):
            disk = (self._last + step) % self.disks
            if free[disk] >= most - slack:
                self._last = disk
                return disk
        raise AssertionError("the freest disk is always a candidate")

    def reserve(self, rid: int, nbytes: int, disk: int = 0) -> None:
        """Count ``nbytes`` on ``disk`` for a tensor whose file is about to be written."""
        self._add(rid, nbytes, nbytes)
        self._disk_of[rid] = disk
        self.bytes_on[disk] += nbytes

    def unreserve(self, rid: int) -> None:
        """Forget a reservation (its file was never written, or is deleted)."""
        nbytes = self._items[rid]
        self._remove(rid, nbytes)
        self.bytes_on[self._disk_of.pop(rid)] -= nbytes
