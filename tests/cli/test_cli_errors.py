"""Errors of the store subcommands as one line naming the option and the fix, never an
errno (issue 23); and a store whose root ``zarr.json`` is damaged is a damaged store
(exit 1, naming the file), while a directory that is not a store stays exit 2."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from spillcache import CacheConfig, IntermediatesCache, cli
from spillcache._internal.text import os_error_text
from spillcache.errors import StoreError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "Errno" not in out + err, out + err
    return status, out, err


@pytest.fixture
def store(tmp_path):
    """A kept store of one batch: key 'h', a 4 x 4 float32 tensor."""
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path / "spill"),
                         keep_store=True, remove_dead_stores=False)  # fmt: skip
    with IntermediatesCache([{"h": torch.arange(16.0).reshape(4, 4)}], config=config) as cache:
        path = cache.store_path
    return Path(path)


# ------------------------------------------------------------------ show --export


def test_export_into_a_missing_directory_is_one_line_naming_the_option(store, tmp_path, capsys):
    target = tmp_path / "missing" / "x.pt"
    status, out, err = run(capsys, "show", str(store), "0", "h", "--export", str(target))
    assert status == 2 and out == "" and err.count("\n") == 1, err  # before the value is shown
    assert err.startswith(f"spillcache show: --export: the directory {target.parent} does not")
    assert "create it first" in err


def test_export_into_a_read_only_directory_is_one_line(store, read_only_dir, capsys):
    target = read_only_dir / "x.npy"
    status, out, err = run(capsys, "show", str(store), "0", "h", "--export", str(target))
    assert status == 2 and err.count("\n") == 1, err
    assert f"--export: {read_only_dir} is not writable by this process" in err


def test_export_that_fails_while_writing_is_one_line(store, tmp_path, capsys, monkeypatch):
    def save(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    target = tmp_path / "x.pt"
    status, _, err = run(capsys, "show", str(store), "0", "h", "--export", str(target))
    assert status == 2 and err.count("\n") == 1, err
    assert f"--export: cannot write {target} (No space left on device)" in err


def test_export_still_writes_where_it_can(store, tmp_path, capsys):
    target = tmp_path / "x.pt"
    status, out, _ = run(capsys, "show", str(store), "0", "h", "--export", str(target))
    assert status == 0 and f"wrote {target}" in out
    assert torch.equal(torch.load(target), torch.arange(16.0).reshape(4, 4))


# ------------------------------------------------------------------ a damaged root


def truncate_root(store) -> str:
    root = store / "zarr.json"
    text = root.read_text()
    root.write_text(text[: len(text) // 2])
    return str(root)


def test_a_truncated_root_is_a_damaged_store_for_verify(store, capsys):
    root = truncate_root(store)
    status, out, err = run(capsys, "verify", str(store))
    assert status == 1, out + err
    bad = out.splitlines()[0]
    assert bad.startswith(f"BAD {root} is not valid JSON (") and "root metadata is damaged" in bad
    status, out, _ = run(capsys, "verify", str(store), "--json")
    report = json.loads(out)
    assert status == 1 and report["problems"][0].startswith(f"{root} is not valid JSON")


def test_a_truncated_root_is_a_damaged_store_for_inspect_and_show(store, capsys):
    root = truncate_root(store)
    status, out, err = run(capsys, "inspect", str(store))
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith(f"spillcache inspect: damaged: {root} is not valid JSON")
    status, out, _ = run(capsys, "inspect", str(store), "--json")
    assert status == 1 and json.loads(out)["problems"][0].startswith(root)
    status, _, err = run(capsys, "show", str(store), "0", "h")
    assert status == 1 and err.startswith(f"spillcache show: damaged: {root}"), err


def test_a_missing_root_of_a_store_is_damage_too(store, capsys):
    (store / "zarr.json").unlink()
    status, _, err = run(capsys, "inspect", str(store))
    assert status == 1 and f"{store / 'zarr.json'} is missing" in err, err


@pytest.mark.parametrize("root", [None, '{"zarr_format": 3, "node_type": "group"}'])
def test_a_directory_that_is_not_a_store_stays_exit_2(tmp_path, capsys, root):
    """Nothing laid out as a store (no ``tensors`` group): not damage, not a store."""
    if root is not None:
        (tmp_path / "zarr.json").write_text(root)
    for command in ("verify", "inspect"):
        status, _, err = run(capsys, command, str(tmp_path))
        assert status == 2 and "is not a spillcache store" in err, err


def test_a_readable_root_of_another_kind_stays_what_the_reader_says(store, capsys):
    """A root that reads as JSON but has no spillcache attributes is not damage the
    root check claims: the store format's own answer (not a spillcache store) stands."""
    (store / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    status, _, err = run(capsys, "verify", str(store))
    assert status == 2 and "is not a spillcache store" in err, err


# ------------------------------------------------------------------ any other OSError


def test_an_os_error_is_one_line_with_the_path_and_what_to_do():
    said = os_error_text(PermissionError(errno.EACCES, "Permission denied", "/nvme/spill"))
    assert said == (
        "Permission denied (/nvme/spill): run as a user who may write there, or name another path"
    )
    assert os_error_text(OSError(errno.EIO, "Input/output error")).endswith("try again")
    # spillcache's own errors already say what to do: their message, without "[Errno 5]"
    said = os_error_text(StoreError(errno.EIO, "a chunk cannot be read"))
    assert said == "a chunk cannot be read"
    assert os_error_text(StoreError("no store at x")) == "no store at x"


def test_the_command_prints_an_os_error_as_that_line(capsys, monkeypatch):
    def du(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/nvme/spill/x")

    monkeypatch.setattr(cli, "_du", du)
    status, _, err = run(capsys, "du", "/nvme/spill")
    assert status == 2
    assert err == (
        "spillcache du: Permission denied (/nvme/spill/x): run as a user who may write "
        "there, or name another path\n"
    )
