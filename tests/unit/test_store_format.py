"""store/store_format.py: the on-disk store, bit-exact and readable by plain zarr."""

from __future__ import annotations

import json
import os
import re
import stat

import numpy as np
import pytest
import torch
import zarr

from spill_testing import ALL_DTYPES, NUMPY_KNOWN, random_tensor
from spillcache._internal.dtypes import RAW_DTYPES
from spillcache._internal.io import chunkio
from spillcache._internal.store import store_dirs
from spillcache._internal.store import store_format as fmt
from spillcache._internal.store.store_format import SUPPORTED_VERSIONS
from spillcache._internal.store.tensor_store import Store
from spillcache.errors import StoreCorruptError, StoreError, StoreFormatError, StoreNotFoundError

SHAPES = {"contiguous": (3, 5), "zero_d": (), "empty": (0, 4), "three_d": (2, 1, 3)}


def bits(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype.itemsize in RAW_DTYPES:
        return tensor.view(RAW_DTYPES[tensor.dtype.itemsize])
    return torch.view_as_real(tensor).view(torch.uint64)  # complex128


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(bits(got), bits(want))


@pytest.fixture
def store(tmp_path):
    return Store.create(tmp_path / "parent")


def partial_files(root) -> list:
    return [p for p in root.rglob("*") if ".partial" in p.name]


# ------------------------------------------------------------------ create


@pytest.mark.parametrize("umask", [0, 0o022, 0o077])
def test_create_makes_a_private_directory(tmp_path, umask):
    old = os.umask(umask)
    try:
        store = Store.create(tmp_path)
    finally:
        os.umask(old)
    assert store.path.parent == tmp_path and store.path.is_dir()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o700


def test_create_makes_distinct_stores(tmp_path):
    assert Store.create(tmp_path).path != Store.create(tmp_path).path


def test_root_metadata(store):
    root = json.loads((store.path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    attributes = root["attributes"]["spillcache"]
    assert attributes["format_version"] == 1 == fmt.FORMAT_VERSION
    assert attributes["complete"] is False
    group = zarr.open_group(store.path, mode="r")
    assert group.attrs["spillcache"]["format_version"] == 1
    assert isinstance(group["tensors"], zarr.Group) and isinstance(group["batches"], zarr.Group)


@pytest.mark.parametrize("make_parent", ["file", "under_file"])
def test_create_where_impossible_names_disk_path(tmp_path, make_parent):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    parent = blocker if make_parent == "file" else blocker / "sub"
    with pytest.raises(StoreError, match="disk_path") as info:
        Store.create(parent)
    assert isinstance(info.value, OSError)
    assert blocker.read_text() == "not a directory"


def test_create_failing_metadata_write_is_a_store_error_and_leaves_nothing(tmp_path, monkeypatch):
    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StoreError):
        Store.create(tmp_path)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", list(SHAPES))
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_tensor_round_trip_bit_exact_and_plain_zarr(store, dtype, kind):
    tensor = random_tensor(dtype, SHAPES[kind], ALL_DTYPES.index(dtype))
    name = f"t-{kind}"
    store.write_tensor(name, tensor)
    assert_same_bits(store.read_tensor(name, tuple(tensor.shape), dtype), tensor)
    assert partial_files(store.path) == []

    array = zarr.open_group(store.path, mode="r")[f"tensors/{name}"]
    assert tuple(array.shape) == tuple(tensor.shape)
    assert array.attrs["spillcache"]["torch_dtype"] == str(dtype).removeprefix("torch.")
    data = torch.from_numpy(np.array(array[...]))
    assert data.shape == tensor.shape
    if dtype == torch.bool:  # numpy may normalize random bool bytes (0-d scalars): values
        assert torch.equal(bits(data) != 0, bits(tensor) != 0)
    elif dtype in NUMPY_KNOWN:
        assert_same_bits(data, tensor)
    else:
        assert data.dtype == RAW_DTYPES[dtype.itemsize]
        assert torch.equal(data, bits(tensor))


def test_read_tensor_returns_fresh_memory(store):
    tensor = random_tensor(torch.float32, (8,))
    store.write_tensor("x", tensor)
    first = store.read_tensor("x", (8,), torch.float32)
    first.zero_()
    assert_same_bits(store.read_tensor("x", (8,), torch.float32), tensor)


def test_non_contiguous_tensor_is_stored_in_logical_order(store):
    tensor = random_tensor(torch.bfloat16, (4, 6)).t()
    store.write_tensor("t", tensor)
    assert_same_bits(store.read_tensor("t", (6, 4), torch.bfloat16), tensor)


def test_delete_tensor_removes_its_files(store):
    store.write_tensor("gone", random_tensor(torch.int32, (3,)))
    store.delete_tensor("gone")
    assert not (store.path / "tensors" / "gone").exists()
    store.delete_tensor("never-written")  # harmless


def test_zarr_json_is_written_during_the_chunk_write_and_renamed_after_it(tmp_path, monkeypatch):
    store = Store.create(tmp_path / "parent", direct_io=True, writers=1)
    events = []
    real_write_partial, real_replace = chunkio.write_partial, os.replace

    def write_partial(path, data, *, durable=False):
        # The chunk is still a .partial file: its bytes are on their way, not in place.
        chunk = [p.name for p in path.parent.iterdir() if p.name.startswith("c.")]
        events.append(("metadata written", chunk))
        return real_write_partial(path, data, durable=durable)

    def replace(src, dst):
        events.append(("renamed", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(chunkio, "write_partial", write_partial)
    monkeypatch.setattr(os, "replace", replace)
    tensor = random_tensor(torch.float32, (64, 1024 + 1))  # staged: not page-aligned
    store.write_tensor("t", tensor)
    (written,) = [e for e in events if e[0] == "metadata written"]
    assert len(written[1]) == 1 and written[1][0].endswith(".partial")
    assert [e for e in events if e[0] == "renamed"] == [
        ("renamed", "c.0.0"),
        ("renamed", "zarr.json"),
    ]
    monkeypatch.undo()
    assert_same_bits(store.read_tensor("t", (64, 1025), torch.float32), tensor)
    assert json.loads((store.path / "tensors" / "t" / "zarr.json").read_text()) == (
        fmt.array_metadata((64, 1025), torch.float32)
    )


def test_empty_tensor_gets_its_metadata_and_no_chunk(store):
    store.write_tensor("e", torch.empty(0, 3))
    assert sorted(p.name for p in (store.path / "tensors" / "e").iterdir()) == ["zarr.json"]
    assert store.read_tensor("e", (0, 3), torch.float32).shape == (0, 3)


# ------------------------------------------------------------ write errors


@pytest.mark.parametrize("fail_at", [1, 2], ids=["chunk", "metadata"])
def test_failed_write_raises_store_error_and_leaves_no_array(store, monkeypatch, fail_at):
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_at:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(StoreError, match="tensor-17") as info:
        store.write_tensor("tensor-17", random_tensor(torch.float32, (16, 16)))
    monkeypatch.undo()
    assert isinstance(info.value, OSError)
    assert info.value.errno == 28
    assert len(calls) == fail_at
    assert not (store.path / "tensors" / "tensor-17").exists()
    assert partial_files(store.path) == []
    # The store still works afterwards.
    tensor = random_tensor(torch.float16, (2,))
    store.write_tensor("tensor-17", tensor)
    assert_same_bits(store.read_tensor("tensor-17", (2,), torch.float16), tensor)


# ------------------------------------------------------------- corruption


def chunk_file(store: Store, name: str):
    files = [p for p in (store.path / "tensors" / name).iterdir() if p.name != "zarr.json"]
    assert len(files) == 1
    return files[0]


@pytest.mark.parametrize("damage", ["truncate", "extend", "empty", "delete", "delete_array"])
def test_damaged_chunk_is_store_corrupt_error(store, damage):
    tensor = random_tensor(torch.float32, (4, 5))
    store.write_tensor("victim-3", tensor)
    path = chunk_file(store, "victim-3")
    data = path.read_bytes()
    assert len(data) == tensor.nbytes
    if damage == "truncate":
        path.write_bytes(data[:-1])
    elif damage == "extend":
        path.write_bytes(data + b"\0")
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "delete":
        path.unlink()
    else:
        for child in path.parent.iterdir():
            child.unlink()
        path.parent.rmdir()
    with pytest.raises(StoreCorruptError, match="victim-3") as info:
        store.read_tensor("victim-3", (4, 5), torch.float32)
    assert isinstance(info.value, StoreError)


# ----------------------------------------------------------------- batches


def stored_entries(store: Store, index: int) -> dict:
    """Batch ``index``'s structures as plain zarr reads them."""
    group = zarr.open_group(store.path, mode="r")
    return group[f"batches/{index}"].attrs["spillcache"]["entries"]


def test_batch_round_trip_with_awkward_keys(store, tmp_path):
    entries = {
        "../x": {"array": "tensors/0"},
        "a/b": {"value": [1, 2, {"c": None}]},
        "": {"value": 3.5},
        "ключ-鍵-🔑": {"value": "ünïcödé"},
        "..": {},
        "/abs": {"value": True},
    }
    store.write_batch(0, entries)
    store.write_batch(7, {"only": {}})
    assert stored_entries(store, 0) == entries
    assert stored_entries(store, 7) == {"only": {}}
    assert not (store.path / "batches" / "3").exists()
    # Keys never became paths.
    assert sorted(p.name for p in (store.path / "batches").iterdir()) == ["0", "7", "zarr.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["parent"]
    assert not (store.path / "x").exists() and not (store.path / "batches" / "0" / "a").exists()
    group = zarr.open_group(store.path, mode="r")
    assert group["batches/0"].attrs["spillcache"]["entries"] == entries


def test_write_batch_again_replaces_it(store):
    store.write_batch(1, {"a": {}})
    store.write_batch(1, {"b": {"v": 1}})
    assert stored_entries(store, 1) == {"b": {"v": 1}}
    assert partial_files(store.path) == []


# -------------------------------------------------------------------- open


def test_open_a_created_store(store):
    store.write_tensor("t", random_tensor(torch.int64, (3,)))
    opened = Store.open(store.path)
    assert opened.path == store.path
    assert_same_bits(opened.read_tensor("t", (3,), torch.int64), random_tensor(torch.int64, (3,)))


def test_open_missing_path(tmp_path):
    with pytest.raises(StoreNotFoundError, match="no-such-store") as info:
        Store.open(tmp_path / "no-such-store")
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, StoreError)


@pytest.mark.parametrize(
    "root",
    [
        None,
        "not json",
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}),
        "[1, 2]",
    ],
    ids=["no-zarr-json", "bad-json", "plain-zarr-group", "json-list"],
)
def test_open_a_directory_that_is_not_a_store(tmp_path, root):
    if root is not None:
        (tmp_path / "zarr.json").write_text(root)
    with pytest.raises(StoreFormatError):
        Store.open(tmp_path)


def test_open_a_regular_file_is_a_format_error(tmp_path):
    path = tmp_path / "file"
    path.write_text("hello")
    with pytest.raises(StoreFormatError):
        Store.open(path)


def test_open_with_non_object_attributes_is_a_format_error(tmp_path):
    (tmp_path / "zarr.json").write_text(json.dumps({"attributes": {"spillcache": "v1"}}))
    with pytest.raises(StoreFormatError):
        Store.open(tmp_path)


# A missing or non-integer version is damage, not another version: test_tampered_store.py
@pytest.mark.parametrize("version", [99, 0])
def test_open_unsupported_version_lists_supported_ones(store, version):
    root_path = store.path / "zarr.json"
    root = json.loads(root_path.read_text())
    root["attributes"]["spillcache"]["format_version"] = version
    root_path.write_text(json.dumps(root))
    with pytest.raises(StoreFormatError) as info:
        Store.open(store.path)
    message = str(info.value).replace(str(store.path), "<path>")
    assert repr(version) in message or str(version) in message
    for supported in SUPPORTED_VERSIONS:
        assert re.search(rf"(?<![\w.]){supported}(?![\w.])", message.replace(repr(version), "")), (
            message
        )


def test_regression_another_users_private_store_is_skipped_not_fatal(tmp_path, monkeypatch):
    """On a shared temp directory another user's store (mode 0700) cannot be read:
    listing stores skips it instead of failing with PermissionError (du, gc, inspect)."""
    parent = tmp_path / "parent"
    mine, theirs = Store.create(parent), Store.create(parent)
    real = fmt.read_root_attributes

    def unreadable(path):
        if os.fspath(path) == os.fspath(theirs.path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(store_dirs, "read_root_attributes", unreadable)
    assert list(store_dirs.find_stores(parent)) == [mine.path]
