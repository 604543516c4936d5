"""CRC-32C, the checksum of zarr's ``crc32c`` codec: a chunk file's last
``CRC32C_BYTES`` bytes, after its data (little-endian).

Computed by google_crc32c's own library called through ctypes where it can be found:
that lets other threads run while it computes (see ``_load_crc32c_extend``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import google_crc32c
import torch

__all__ = ["CRC32C_BYTES", "crc32c", "crc32c_extend"]

CRC32C_BYTES = 4  # the codec's trailer: a chunk file's last bytes, after the data


def crc32c(data: torch.Tensor) -> bytes:
    """zarr's crc32c codec: CRC-32C of the chunk's bytes (1-D uint8, CPU, contiguous),
    4 bytes little-endian."""
    return crc32c_extend(0, data).to_bytes(CRC32C_BYTES, "little")


def crc32c_extend(crc: int, data: torch.Tensor) -> int:
    """The CRC-32C of the bytes ``crc`` covers followed by ``data`` (1-D uint8, CPU,
    contiguous); ``crc`` 0 starts one."""
    if _crc32c_extend is None or not data.numel():
        return google_crc32c.extend(crc, data.numpy())
    return _crc32c_extend(crc, data.data_ptr(), data.numel())


def _load_crc32c_extend():
    """google_crc32c's own library called through ctypes, which lets other threads run
    while it computes: google_crc32c's module holds the interpreter's lock for anything
    but a ``bytes`` object, so one I/O thread's checksum would stall every other
    thread (the other reads and writes, and the caller). None where the library cannot
    be found (a build linked to a system library elsewhere): then google_crc32c's
    function, holding the lock."""
    package = Path(google_crc32c.__file__).parent
    candidates = sorted(package.parent.glob("google_crc32c.libs/libcrc32c*.so*"))
    if (found := ctypes.util.find_library("crc32c")) is not None:
        candidates.append(Path(found))
    for candidate in candidates:
        try:
            function = ctypes.CDLL(str(candidate)).crc32c_extend
        except (OSError, AttributeError):
            continue
        function.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        function.restype = ctypes.c_uint32
        return function
    return None


_crc32c_extend = _load_crc32c_extend()
