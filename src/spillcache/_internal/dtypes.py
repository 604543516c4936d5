"""Torch dtypes <-> on-disk data types, and the raw views that keep every copy bit-exact.

numpy (and so zarr) has no bfloat16, float8, complex32 or sub-byte types. Those are
stored as the raw bits under the unsigned integer type of the same width, and the
torch dtype is recorded beside them, so every dtype round-trips bit for bit. Types
numpy knows are stored as themselves, so plain zarr readers see real values.

Every copy between devices and every compaction (transfers.py) goes through a
same-width unsigned view (``raw_dtype``): copy kernels are missing for some dtypes
(int1..int7, uint1..uint7), but a uint8/16/32/64 copy always exists and carries
exactly the same bits.
"""

from __future__ import annotations

import torch

__all__ = [
    "RAW_DTYPES",
    "byte_view",
    "dtype_from_name",
    "dtype_name",
    "is_storable",
    "is_tierable",
    "raw_dtype",
    "storage_dtype_name",
]

# Same-width unsigned integer type for each element size.
RAW_DTYPES: dict[int, torch.dtype] = {
    1: torch.uint8,
    2: torch.uint16,
    4: torch.uint32,
    8: torch.uint64,
}

# Torch dtypes whose numpy/zarr type has the same name and the same bits.
_NATIVE = {
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
}

_BY_NAME: dict[str, torch.dtype] = {
    name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)
}


def dtype_name(dtype: torch.dtype) -> str:
    """'torch.bfloat16' -> 'bfloat16' (the name recorded in stores)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown torch dtype {name!r} (this torch is {torch.__version__})"
        ) from None


def storage_dtype_name(dtype: torch.dtype) -> str:
    """The zarr data type that holds ``dtype``'s bits."""
    if dtype in _NATIVE:
        return dtype_name(dtype)
    return dtype_name(RAW_DTYPES[dtype.itemsize])


def raw_dtype(dtype: torch.dtype) -> torch.dtype:
    """The same-width unsigned type to move ``dtype``'s bits with.

    16-byte types (complex128) have no such type but have every copy kernel, so they
    move as themselves.
    """
    return RAW_DTYPES.get(dtype.itemsize, dtype)


def is_storable(dtype: torch.dtype) -> bool:
    """A dtype a store holds: a fixed width it has a raw type for, not quantized
    (quantized tensors need scales and stay in RAM)."""
    if dtype_name(dtype).startswith(("qint", "quint")):
        return False
    try:
        storage_dtype_name(dtype)
    except KeyError:
        return False
    return True


def is_tierable(tensor: torch.Tensor) -> bool:
    """Plain dense tensors with a fixed element width can leave RAM; others cannot (a
    nested tensor is strided too, but has no one shape to store)."""
    return (
        tensor.layout == torch.strided
        and not tensor.is_nested
        and not tensor.is_quantized
        and not tensor.is_meta
        and (tensor.dtype.itemsize in RAW_DTYPES or tensor.dtype in _NATIVE)
        and type(tensor) in (torch.Tensor, torch.nn.Parameter)
    )


def byte_view(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of a contiguous tensor as a 1-D uint8 tensor sharing its memory.

    ``view(-1)`` is not enough: a contiguous tensor may keep any stride on a size-1 or
    empty dimension (``t[::2].clone()`` of a 2-element ``t``), and byte views refuse a
    last stride other than 1. Contiguous means the elements are dense from the storage
    offset on, so restriding to (1,) addresses exactly the same bytes.
    """
    if not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor; call .contiguous() first")
    return tensor.as_strided((tensor.numel(),), (1,)).view(torch.uint8)
