"""An in-memory ``TensorStore``: the cache's machinery run with no file at all.

What the cache asks of a store is the ``TensorStore`` Protocol (tensor_store.py); this
implementation keeps each array's bytes in a dict, so a test can run the core, its
placement and its I/O threads against it and look at exactly what reached the store.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from spillcache._internal import dtypes


class MemoryStore:
    """Arrays as (bytes, shape, dtype) in a dict; safe to call from several I/O threads."""

    keep = False
    syncs_background_writes = False  # memory has no power loss to survive

    def __init__(self, path: Path) -> None:
        self.path = path  # named in messages only; nothing is made there
        self.arrays: dict[str, tuple[torch.Tensor, tuple[int, ...], torch.dtype]] = {}
        self.batches: dict[int, dict] = {}
        self.root: dict | None = None
        self.attributes: dict = {}  # the root's, as a kept store's flush sets its note
        self.written: list[str] = []  # every array name written, in order
        self.deleted: list[str] = []
        self.removed = False
        self.closed = False
        self._lock = threading.Lock()

    def write_tensor(self, name, tensor, *, durable=False, owner=None) -> None:
        assert tensor.device.type == "cpu", "the cache hands a store host tensors only"
        data = dtypes.byte_view(tensor.contiguous()).clone()  # bits, for every dtype
        with self._lock:
            self.arrays[name] = (data, tuple(tensor.shape), tensor.dtype)
            self.written.append(name)

    def read_tensor(self, name, shape, dtype, *, pin=False, mapped=False, checksum=None):
        with self._lock:
            data, stored_shape, stored_dtype = self.arrays[name]
        assert (stored_shape, stored_dtype) == (tuple(shape), dtype), name
        return data.clone().view(dtypes.raw_dtype(dtype)).view(shape).view(dtype)

    def delete_tensor(self, name: str) -> None:
        with self._lock:
            self.arrays.pop(name, None)
            self.deleted.append(name)

    def write_batch(self, index, entries, *, durable=False, flush=None, before=None) -> None:
        self.batches[index] = entries

    def write_root_attributes(self, *, complete, num_batches, durable=False, flush=None):
        self.root = {"complete": complete, "num_batches": num_batches, "flush": flush}

    def sync_written(self) -> None:
        pass  # memory has no power loss to survive

    def close(self) -> None:
        self.closed = True

    def remove(self) -> None:
        self.close()
        with self._lock:
            self.arrays.clear()
        self.removed = True
