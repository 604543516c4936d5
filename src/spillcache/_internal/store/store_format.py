"""The on-disk format (docs/format.md): the only module that knows the store's layout.

A store is a zarr v3 hierarchy on the local filesystem::

    <store>/zarr.json                   group; attributes["spillcache"]: format version, state
    <store>/tensors/zarr.json           group
    <store>/tensors/<id>/zarr.json      array, bytes codec, one chunk; attributes["spillcache"]
    <store>/tensors/<id>/c.0.0          the chunk: the tensor's raw little-endian bytes
    <store>/batches/zarr.json           group
    <store>/batches/<index>/zarr.json   group; attributes["spillcache"]["entries"]: structures

Stores are made directly under ``disk_path``, or, for rank R of a torchrun job, under
``<disk_path>/<run>/rank<R>/`` (a *run directory* holds ``rank<R>`` directories only).

The hot path writes and reads chunk files itself rather than through zarr-python
(whose per-array overhead is milliseconds), and the result stays plain zarr: any
zarr v3 reader opens the store. User keys never become paths: they live only as JSON
strings inside attributes, so no key can escape the store or collide with another.

Every file is written to a ``.partial`` name and renamed into place, and an array's
``zarr.json`` is written after its chunk, so a reader (or a crash) never sees half
an array.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from spillcache.errors import StoreFormatError, StoreNotFoundError

from .. import dtypes
from ..io.checksums import CRC32C_BYTES
from .small_files import read_small_file

__all__ = [
    "ARRAY_PREFIX",
    "ATTRS_KEY",
    "BATCHES",
    "FORMAT_VERSION",
    "STORE_PREFIX",
    "SUPPORTED_VERSIONS",
    "TENSORS",
    "array_metadata",
    "array_metadata_text",
    "array_ref",
    "batch_attributes",
    "batch_dir",
    "chunk_bytes",
    "chunk_name",
    "group",
    "read_root_attributes",
    "stored_tensor_node",
    "tensors_dir",
    "unstored_tensor_node",
]

FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
STORE_PREFIX = "spillcache-"
_ROOT_BYTES = 1 << 20  # a root zarr.json is a few hundred bytes
ATTRS_KEY = "spillcache"
# The store's two groups: arrays under TENSORS, batch structures under BATCHES.
TENSORS = "tensors"
BATCHES = "batches"
ARRAY_PREFIX = f"{TENSORS}/"  # how a batch structure names an array


def tensors_dir(store_path: str | os.PathLike[str]) -> Path:
    return Path(store_path) / TENSORS


def batch_dir(store_path: str | os.PathLike[str], index: int | None = None) -> Path:
    """The batches group, or batch ``index``'s group in it."""
    batches = Path(store_path) / BATCHES
    return batches if index is None else batches / str(index)


def array_ref(name: str) -> str:
    """How a batch structure names array ``name``."""
    return ARRAY_PREFIX + name


# A batch's structures (docs/format.md, "Batches"): its group's attributes hold
# {"entries": {key: structure}, "flush": n, "before": {"flush": m, "entries": ...}},
# each structure as tree.spec_to_json writes it, with these tensor nodes inside.


def stored_tensor_node(name: str, device: torch.device, requires_grad: bool) -> dict:
    """A structure's node for a tensor stored as array ``name``."""
    return {"array": array_ref(name), "device": str(device), "requires_grad": requires_grad}


def unstored_tensor_node(device: torch.device) -> dict:
    """A structure's node for a tensor its run kept in RAM only (read back as None)."""
    return {"array": None, "device": str(device), "note": "kept in RAM only; not stored"}


def batch_attributes(
    entries: dict[str, dict], flush: int | None, before: tuple[int, dict] | None
) -> dict:
    """A batch group's spillcache attributes: its structures as of flush ``flush``,
    keeping the ones of the last completed flush (``before``) until the root says
    this flush completed."""
    own: dict[str, Any] = {"entries": entries}
    if flush is not None:
        own["flush"] = flush
    if before is not None:
        own["before"] = {"flush": before[0], "entries": before[1]}
    return own


if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError(
        "spillcache stores raw little-endian bytes; big-endian hosts are not supported"
    )


def _fill_value(data_type: str) -> Any:
    if data_type == "bool":
        return False
    if data_type.startswith("complex"):
        return [0.0, 0.0]
    if data_type.startswith("float"):
        return 0.0
    return 0


CRC32C_CODEC = {"name": "crc32c"}


def array_metadata(shape: tuple[int, ...], dtype: torch.dtype, checksum: bool = False) -> dict:
    """zarr v3 metadata for one tensor stored as a single uncompressed chunk (with a
    CRC32C of the chunk appended, zarr's ``crc32c`` codec, when ``checksum``)."""
    data_type = dtypes.storage_dtype_name(dtype)
    bytes_codec: dict[str, Any] = {"name": "bytes"}
    if dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(shape),
        "data_type": data_type,
        # zarr chunks must have a positive size; an empty dimension has no chunks.
        "chunk_grid": {
            "name": "regular",
            "configuration": {"chunk_shape": [max(1, n) for n in shape]},
        },
        # "." keeps the chunk a single file beside zarr.json: no directory per dimension.
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "."}},
        "fill_value": _fill_value(data_type),
        "codecs": [bytes_codec, CRC32C_CODEC] if checksum else [bytes_codec],
        "attributes": {ATTRS_KEY: {"torch_dtype": dtypes.dtype_name(dtype)}},
    }


def array_metadata_text(
    shape: tuple[int, ...], dtype: torch.dtype, checksum: bool, owner: tuple[int, str] | None
) -> bytes:
    """An array's zarr.json, encoded, with the (batch, key) it was stored under."""
    head, tail = _array_metadata_parts(shape, dtype, checksum)
    if owner is None:
        return head + tail
    batch, key = owner
    return head + b',\n   "batch": %d,\n   "key": %s' % (batch, json.dumps(key).encode()) + tail


@functools.lru_cache(maxsize=256)
def _array_metadata_parts(shape: tuple, dtype: torch.dtype, checksum: bool) -> tuple[bytes, bytes]:
    """An array's zarr.json (the same for every tensor of a shape and dtype), split
    after its torch_dtype: where the owner goes."""
    text = json.dumps(array_metadata(shape, dtype, checksum), indent=1).encode()
    marker = b'"torch_dtype": ' + json.dumps(dtypes.dtype_name(dtype)).encode()
    cut = text.rindex(marker) + len(marker)
    return text[:cut], text[cut:]


def chunk_name(ndim: int) -> str:
    """The key of the only chunk of an ndim-dimensional array ('c' for 0-d)."""
    return ".".join(["c"] + ["0"] * ndim)


def group(attributes: dict | None = None) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes or {}}


def chunk_bytes(nbytes: int, checksum: bool) -> int:
    """The size of the chunk file of an array of ``nbytes`` (with its CRC32C, if any)."""
    return nbytes + (CRC32C_BYTES if checksum else 0)


def read_root_attributes(path: str | os.PathLike[str]) -> dict:
    """The spillcache attributes of the store at ``path``, or a clear error."""
    path = Path(path)
    if not path.exists():
        raise StoreNotFoundError(f"no store at {path}: the path does not exist")
    if not path.is_dir():
        raise StoreFormatError(f"{path} is not a spillcache store (not a directory)")
    try:
        text = read_small_file(path / "zarr.json", _ROOT_BYTES)  # never through a link
        attributes = json.loads(text)["attributes"][ATTRS_KEY]
    except FileNotFoundError:
        raise StoreFormatError(f"{path} is not a spillcache store (no zarr.json)") from None
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        attributes = None
    if not isinstance(attributes, dict):
        raise StoreFormatError(f"{path} is not a spillcache store (no spillcache attributes)")
    return attributes
