"""spillcache._internal.dtypes: bit-exact copies and moves for every torch dtype."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from spill_testing import ALL_DTYPES, NUMPY_KNOWN, random_tensor
from spillcache._internal import dtypes
from spillcache._internal.dtypes import RAW_DTYPES
from spillcache._internal.io import transfers

CPU = torch.device("cpu")


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A same-shape unsigned view of ``tensor``'s bits (works on non-contiguous tensors)."""
    if tensor.dtype.itemsize in RAW_DTYPES:
        return tensor.view(RAW_DTYPES[tensor.dtype.itemsize])
    assert tensor.dtype == torch.complex128
    return torch.view_as_real(tensor).view(torch.uint64)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


def variants(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Compact, non-compact, 0-d and empty tensors of ``dtype``."""
    base = random_tensor(dtype, (6, 5), ALL_DTYPES.index(dtype) if dtype in ALL_DTYPES else 0)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "strided": base[:, ::2],
        "offset_slice": base[2:],
        "prefix_slice": base[:2],
        "zero_d": random_tensor(dtype, (), 1),
        "empty": random_tensor(dtype, (0, 3)),
    }


def test_every_dtype_is_covered():
    names = {str(d) for d in ALL_DTYPES}
    assert {
        "torch.bfloat16",
        "torch.complex32",
        "torch.complex128",
        "torch.int4",
        "torch.bits8",
    } <= names
    assert "torch.float8_e4m3fn" in names and "torch.bool" in names


def test_random_bits_really_are_random():
    t = random_tensor(torch.float32, (64,))
    assert len(torch.unique(bits(t))) > 32


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(variants(torch.uint8)))
def test_compact_copy_is_new_contiguous_and_bit_exact(dtype, kind):
    tensor = variants(dtype)[kind]
    before = bits(tensor).clone()
    copy = transfers.compact_copy(tensor, CPU)
    assert_same_bits(copy, tensor)
    assert copy.device == CPU
    assert copy.is_contiguous()
    assert copy.untyped_storage().nbytes() == tensor.nbytes
    if tensor.numel():
        assert copy.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()
        # An independent copy: changing it leaves the source alone.
        bits(copy).reshape(-1)[0] ^= 1
        assert torch.equal(bits(tensor), before)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(variants(torch.uint8)))
def test_move_to_the_same_device_is_the_same_object(dtype, kind):
    tensor = variants(dtype)[kind]
    assert transfers.move(tensor, CPU) is tensor


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_move_to_meta_keeps_shape_and_dtype(dtype):
    tensor = variants(dtype)["transposed"]
    moved = transfers.move(tensor, torch.device("meta"))
    assert moved.is_meta
    assert moved.dtype == dtype and moved.shape == tensor.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_move_to_cuda_and_back_is_bit_exact():
    cuda = torch.device("cuda")
    for dtype in ALL_DTYPES:
        for kind, tensor in variants(dtype).items():
            on_gpu = transfers.move(tensor, cuda)
            assert on_gpu.device.type == "cuda", (dtype, kind)
            assert transfers.move(on_gpu, cuda) is on_gpu
            assert_same_bits(transfers.move(on_gpu, CPU), tensor)
            assert_same_bits(transfers.to_host(on_gpu), tensor)
            copy = transfers.compact_copy(tensor, cuda)
            assert copy.device.type == "cuda" and copy.is_contiguous()
            assert_same_bits(transfers.move(copy, CPU), tensor)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", list(variants(torch.uint8)))
def test_to_host_keeps_compact_tensors_and_copies_views(dtype, kind):
    tensor = variants(dtype)[kind]
    host = transfers.to_host(tensor)
    assert_same_bits(host, tensor)
    assert host.device == CPU and host.is_contiguous()
    # Whatever it returns holds exactly the tensor's bytes, not a bigger base.
    assert host.untyped_storage().nbytes() == tensor.nbytes
    if kind in ("contiguous", "zero_d", "empty"):
        assert host is tensor
    else:
        assert host is not tensor
        assert host.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()


def test_to_host_of_expanded_tensor_materializes_it():
    tensor = torch.arange(3, dtype=torch.int16).unsqueeze(0).expand(4, 3)
    host = transfers.to_host(tensor)
    assert host.is_contiguous() and host.untyped_storage().nbytes() == 4 * 3 * 2
    assert torch.equal(host, tensor)


def test_requires_grad_views_can_be_copied_to_host():
    leaf = torch.randn(4, 3, requires_grad=True)
    host = transfers.to_host(leaf.t())
    assert host.is_contiguous()
    assert torch.equal(bits(host), bits(leaf.detach().t()))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_storage_dtype_name(dtype):
    name = dtypes.storage_dtype_name(dtype)
    if dtype in NUMPY_KNOWN:
        assert name == str(dtype).removeprefix("torch.")
    else:
        assert name == f"uint{8 * dtype.itemsize}"
    # Whatever it is, numpy knows it and it has the same width.
    assert np.dtype(name).itemsize == dtype.itemsize


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (torch.bfloat16, "uint16"),
        (torch.float8_e4m3fn, "uint8"),
        (torch.float8_e5m2, "uint8"),
        (torch.float8_e8m0fnu, "uint8"),
        (torch.complex32, "uint32"),
        (torch.int4, "uint8"),
        (torch.uint3, "uint8"),
        (torch.bits8, "uint8"),
        (torch.bits16, "uint16"),
        (torch.float4_e2m1fn_x2, "uint8"),
        (torch.float32, "float32"),
        (torch.complex128, "complex128"),
        (torch.bool, "bool"),
    ],
    ids=str,
)
def test_storage_dtype_name_examples(dtype, expected):
    assert dtypes.storage_dtype_name(dtype) == expected


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_dtype_names_round_trip(dtype):
    assert dtypes.dtype_from_name(dtypes.dtype_name(dtype)) is dtype


def test_unknown_dtype_name_is_a_value_error():
    with pytest.raises(ValueError, match="float128"):
        dtypes.dtype_from_name("float128")


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_dense_tensors_of_every_dtype_are_tierable(dtype):
    assert dtypes.is_tierable(random_tensor(dtype, (2, 3)))
    assert dtypes.is_tierable(random_tensor(dtype, (2, 3)).t())


def test_parameters_are_tierable():
    assert dtypes.is_tierable(torch.nn.Parameter(torch.randn(3)))


@pytest.mark.parametrize("qdtype", [torch.qint8, torch.quint8, torch.qint32], ids=str)
def test_quantized_tensors_are_not_tierable(qdtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, qdtype)
    assert quantized.is_quantized
    assert not dtypes.is_tierable(quantized)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.eye(3).to_sparse(),
        lambda: torch.eye(3).to_sparse_csr(),
        lambda: torch.eye(3).to_sparse_csc(),
    ],
    ids=["coo", "csr", "csc"],
)
def test_sparse_tensors_are_not_tierable(make):
    assert not dtypes.is_tierable(make())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_nested_tensors_are_not_tierable():
    """torch.nested.nested_tensor's default layout is strided, yet it has no one shape
    to store (its sizes() is an internal error): it stays in RAM, as sparse ones do."""
    nested = torch.nested.nested_tensor([torch.randn(200), torch.randn(300)])
    assert nested.layout == torch.strided
    assert not dtypes.is_tierable(nested)


def test_meta_tensors_are_not_tierable():
    assert not dtypes.is_tierable(torch.empty(3, 4, device="meta"))
    assert dtypes.is_tierable(torch.empty(3, 4))
