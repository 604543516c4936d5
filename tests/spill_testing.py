"""Helpers shared by the tests: random tensors of every dtype, bit-exact comparison."""

from __future__ import annotations

import torch

from spillcache.dtypes import byte_view, raw_dtype

# numpy has a type of the same name and bits for exactly these.
NUMPY_KNOWN = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.float32,
    torch.float64, torch.complex64, torch.complex128,
}  # fmt: skip

QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}

# Every dtype this torch has, except quantized ones (those need scales and stay in RAM).
ALL_DTYPES = sorted(
    {d for d in vars(torch).values() if isinstance(d, torch.dtype) and d not in QUANTIZED},
    key=str,
)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bits are random (NaN payloads and all)."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), dtype=torch.uint8, generator=generator)
    if dtype.itemsize == 1:
        return raw.reshape(shape).view(dtype)
    return raw.view(raw_dtype(dtype)).reshape(shape).view(dtype)


def bits(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements, in logical order."""
    raw = tensor.detach().view(raw_dtype(tensor.dtype)).cpu().contiguous()
    return byte_view(raw).numpy().tobytes()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, device and bits."""
    assert isinstance(actual, torch.Tensor), f"expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.device == expected.device, (actual.device, expected.device)
    assert bits(actual) == bits(expected), (
        f"bits differ for {expected.dtype} {tuple(expected.shape)}"
    )


def tensor_variants(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Contiguous, non-contiguous, 0-d and empty tensors of one dtype."""
    base = random_tensor(dtype, (6, 40), seed)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "scalar": random_tensor(dtype, (), seed + 1),
        "empty": random_tensor(dtype, (0, 5), seed + 2),
    }


def console_script() -> str:
    """The installed ``spillcache`` command (pip puts it beside this interpreter)."""
    import shutil
    import sys
    from pathlib import Path

    beside = Path(sys.executable).with_name("spillcache")
    found = str(beside) if beside.exists() else shutil.which("spillcache")
    assert found, "the spillcache console script is not installed: pip install -e ."
    return found
