"""A store is data, never a path or a program: a tampered store is refused by open()
and reported as damaged by verify, inspect and show (exit 1, one line per problem, no
traceback), and nothing outside it is read; reopening runs no code a store names."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from spill_testing import assert_same, random_tensor
from spillcache import CacheConfig, IntermediatesCache, StoreCorruptError
from spillcache.cli import main

CALLS: list = []  # what the constructors below ran


@dataclass
class Recorded:
    t: torch.Tensor
    n: int

    def __post_init__(self):
        CALLS.append(("Recorded.__post_init__", self.n))


@dataclass(frozen=True, slots=True)
class Settings:
    lr: float
    name: str

    def __post_init__(self):
        CALLS.append(("Settings.__post_init__", self.name))


class Point(collections.namedtuple("_Point", ["x", "y"])):
    def __new__(cls, x, y):
        CALLS.append(("Point.__new__", y))
        return super().__new__(cls, x, y)


H = random_tensor(torch.float32, (64, 64))
SMALL = random_tensor(torch.bfloat16, (4,), 1)


def batch_values() -> dict:
    return {
        "h": H,
        "pair": (SMALL, 3),
        "meta": {"lr": 0.5, "ok": True, "name": "x", "dt": torch.bfloat16, "l": [1, None]},
        "rec": Recorded(random_tensor(torch.int64, (300,), 2), 5),
        "settings": Settings(0.25, "adam"),
        "pt": Point(SMALL, 7),
    }


@pytest.fixture
def store(tmp_path) -> Path:
    """A kept store of 2 batches; an "outside" directory beside it holds a copy of
    batch 0's "h" array: what a path escape would read."""
    config = CacheConfig(host_bytes=0, inline_bytes="1KiB", disk_path=str(tmp_path / "spill"),
                         keep_store=True)  # fmt: skip
    cache = IntermediatesCache([batch_values(), {"h": H}], config=config)
    cache.close()
    path = Path(cache.store_path)
    shutil.copytree(path / "tensors" / array_of(path, "h"), tmp_path / "outside")
    CALLS.clear()
    return path


def group_file(path: Path, batch: int = 0) -> Path:
    return path / "batches" / str(batch) / "zarr.json"


def entries(path: Path, batch: int = 0) -> dict:
    return json.loads(group_file(path, batch).read_text())["attributes"]["spillcache"]["entries"]


def edit_entries(path: Path, change: Callable[[dict], None], batch: int = 0) -> None:
    group = json.loads(group_file(path, batch).read_text())
    change(group["attributes"]["spillcache"]["entries"])
    group_file(path, batch).write_text(json.dumps(group))


def array_of(path: Path, key: str) -> str:
    return entries(path)[key]["array"].removeprefix("tensors/")


def edit_json(file: Path, change: Callable[[dict], None]) -> None:
    value = json.loads(file.read_text())
    change(value)
    file.write_text(json.dumps(value))


def h_metadata(path: Path) -> Path:
    return path / "tensors" / array_of(path, "h") / "zarr.json"


def h_chunk(path: Path) -> Path:
    return path / "tensors" / array_of(path, "h") / "c.0.0"


def set_h(field: str, value) -> Callable[[Path], None]:
    return lambda path: edit_entries(path, lambda e: e["h"].__setitem__(field, value))


def set_item(key: str, index: int, node: dict) -> Callable[[Path], None]:
    return lambda path: edit_entries(path, lambda e: e[key]["items"].__setitem__(index, node))


def set_meta(index: int, node: dict) -> Callable[[Path], None]:
    def change(found: dict) -> None:
        found["meta"]["items"][index][1] = node

    return lambda path: edit_entries(path, change)


def escape_relative(path: Path) -> None:
    # <store>/tensors/../../../outside is the copy beside the store's parent directory
    set_h("array", "tensors/../../../outside")(path)


def escape_absolute(path: Path) -> None:
    set_h("array", str(path.parent.parent / "outside"))(path)


def symlinked_array(path: Path) -> None:
    directory = path / "tensors" / array_of(path, "h")
    shutil.rmtree(directory)
    directory.symlink_to(path.parent.parent / "outside", target_is_directory=True)


def symlinked_file(name: str) -> Callable[[Path], None]:
    def tamper(path: Path) -> None:
        target = path / "tensors" / array_of(path, "h") / name
        target.unlink()
        target.symlink_to(path.parent.parent / "outside" / name)

    return tamper


def huge_shape(path: Path) -> None:
    def change(metadata: dict) -> None:
        metadata["shape"] = [10**6, 10**6]
        metadata["chunk_grid"]["configuration"]["chunk_shape"] = [10**6, 10**6]

    edit_json(h_metadata(path), change)


def truncated_chunk(path: Path) -> None:
    os.truncate(h_chunk(path), 100)


def h_attribute(name: str, value) -> Callable[[Path], None]:
    return lambda path: edit_json(
        h_metadata(path), lambda m: m["attributes"]["spillcache"].__setitem__(name, value)
    )


def gzip_codec(path: Path) -> None:
    edit_json(h_metadata(path), lambda m: m.__setitem__("codecs", [{"name": "gzip"}]))


def root_attribute(name: str, value) -> Callable[[Path], None]:
    return lambda path: edit_json(
        path / "zarr.json", lambda g: g["attributes"]["spillcache"].__setitem__(name, value)
    )


def write_text(relative: str, text: str) -> Callable[[Path], None]:
    return lambda path: (path / relative).write_text(text)


def deep_nesting(path: Path) -> None:
    group = json.loads(group_file(path).read_text())
    deep = '"entries": {"deep": ' + "[" * 100_000 + "]" * 100_000 + ", "
    text = json.dumps(group).replace('"entries": {', deep, 1)
    group_file(path).write_text(text)


def unfinished_flush_without_before(path: Path) -> None:
    edit_json(group_file(path), lambda g: g["attributes"]["spillcache"].__setitem__("flush", 99))


# name: (tamper, the key whose value it damages (None: the whole store), what is said)
CASES = {
    "path escape ../": (escape_relative, "h", "names array 'tensors/../../../outside'"),
    "absolute path": (escape_absolute, "h", "which is not one spillcache writes"),
    "symlinked array": (symlinked_array, "h", "a symbolic link"),
    "symlinked chunk": (symlinked_file("c.0.0"), "h", "is a symbolic link; a store holds none"),
    "symlinked zarr.json": (symlinked_file("zarr.json"), "h", "zarr.json is a symbolic link"),
    "huge shape": (
        huge_shape,
        "h",
        "(1000000, 1000000) float32 with a CRC32C: 4000000000004 bytes",
    ),
    "wrong size": (truncated_chunk, "h", "its chunk file holds 100 bytes"),
    "unknown dtype": (h_attribute("torch_dtype", "float128"), "h", "torch_dtype 'float128'"),
    "unwritten codec": (gzip_codec, "h", "its codecs [{'name': 'gzip'}] is not what"),
    "array metadata not JSON": (
        lambda path: h_metadata(path).write_text("{oops"),
        "h",
        "zarr.json is not valid JSON",
    ),
    "dtype node names a function": (
        set_meta(3, {"type": "dtype", "value": "load"}),
        "meta",
        "names 'load', not a torch dtype",
    ),
    "int not a number": (
        set_item("pair", 1, {"type": "int", "value": "abc"}),
        "pair",
        "'abc' is not an integer",
    ),
    "float not hex text": (set_meta(0, {"type": "float", "value": 3}), "meta", "is 3, not a str"),
    "bool not a bool": (
        set_meta(1, {"type": "bool", "value": "yes"}),
        "meta",
        "is 'yes', not a bool",
    ),
    "list items not a list": (
        set_meta(4, {"type": "list", "items": "[1]"}),
        "meta",
        "'items' is '[1]', not a list",
    ),
    "dict items not pairs": (
        lambda path: edit_entries(path, lambda e: e["meta"].__setitem__("items", [[1, 2, 3]])),
        "meta",
        "are not all [key, value] pairs",
    ),
    "dataclass field name": (
        lambda path: edit_entries(path, lambda e: e["rec"]["fields"][0].__setitem__(0, "a b")),
        "rec",
        "names a field 'a b'",
    ),
    "node not an object": (
        lambda path: edit_entries(path, lambda e: e.__setitem__("h", 5)),
        "h",
        "is int 5",
    ),
    "unknown node type": (
        lambda path: edit_entries(path, lambda e: e.__setitem__("h", {"type": "pickle"})),
        "h",
        "unknown node type 'pickle'",
    ),
    "device not a device": (set_h("device", "not-a-device"), "h", "is no device"),
    "requires_grad not a bool": (set_h("requires_grad", "yes"), "h", "is not a bool"),
    "batch not JSON": (write_text("batches/0/zarr.json", "{not json"), "h", "is not valid JSON"),
    "entries not an object": (
        lambda path: edit_json(
            group_file(path), lambda g: g["attributes"]["spillcache"].__setitem__("entries", [1])
        ),
        "h",
        "records no entries",
    ),
    "structure nested too deeply": (deep_nesting, "h", "is not valid JSON"),
    "forged batch count": (
        root_attribute("num_batches", 10**12),
        "h",
        "records 1000000000000 batches",
    ),
    "forged flush count": (root_attribute("flush", "x"), "h", "flush 'x' is not a count"),
    "unfinished flush without its earlier structure": (
        unfinished_flush_without_before,
        "h",
        "keeps no earlier structure",
    ),
    "a file among the arrays": (write_text("tensors/notes.txt", "hi"), None, "a file where"),
}

INTERNAL = ("Traceback", "unpack", "KeyError", "has no attribute", "NoneType", "Errno")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    for text in INTERNAL:
        assert text not in out + err, out + err
    return status, out, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_tampered_store_is_damaged_everywhere(store, capsys, case):
    tamper, key, said = CASES[case]
    tamper(store)
    assert_damaged_everywhere(store, capsys, key, said, entry=case not in ROOT_CASES)


def assert_damaged_everywhere(
    store: Path, capsys, key: str | None, said: str, entry: bool = True
) -> None:
    """open() refuses the store, naming what is wrong (and where: batch and key, for an
    ``entry``'s damage); verify, inspect and show (of batch 0's ``key``) report it as
    damaged: exit 1, one line."""
    with pytest.raises(StoreCorruptError, match="is damaged, so it is not opened") as refused:
        IntermediatesCache.open(store)
    assert said in str(refused.value) and "\n" not in str(refused.value)
    if key in ("h", "meta", "pair", "rec") and entry:
        assert f"batch 0, key '{key}'" in str(refused.value) or "batch 0:" in str(refused.value)
    # verify: exit 1, one BAD line (for the one problem), the count on the last line
    status, out, _ = run(capsys, "verify", str(store))
    bad = [line for line in out.splitlines() if line.startswith("BAD ")]
    assert status == 1 and len(bad) == 1 and said in bad[0], out
    assert out.splitlines()[-1].endswith("; 1 bad"), out
    # inspect: exit 1, the problem on one line of stderr
    status, out, err = run(capsys, "inspect", str(store))
    assert status == 1 and err.count("\n") == 1, err
    assert err.startswith("spillcache inspect: damaged: ") and said in err, err
    # show: the damaged value (or any, for the whole store) is one line of stderr, exit 1
    if key is not None:
        status, out, err = run(capsys, "show", str(store), "0", key)
        assert status == 1 and err.count("\n") == 1, err
        assert err.startswith("spillcache show: damaged: ") and said in err, err


ROOT_CASES = {"forged batch count", "forged flush count"}


def test_a_sound_store_is_sound_everywhere(store, capsys):
    assert run(capsys, "verify", str(store))[0] == 0
    status, out, err = run(capsys, "inspect", str(store))
    assert status == 0 and err == "" and "'rec'" in out
    for key in batch_values():
        assert run(capsys, "show", str(store), "0", key)[0] == 0
    with IntermediatesCache.open(store) as cache:
        assert_same(cache.fetch(0)["h"], H)


def test_inspect_of_a_run_directory_says_which_store_is_damaged(store, tmp_path, capsys):
    rank0 = tmp_path / "run" / "rank0"
    rank0.mkdir(parents=True)
    moved = Path(shutil.move(store, rank0 / store.name))
    assert run(capsys, "inspect", str(tmp_path / "run"))[0] == 0
    escape_relative(moved)
    status, out, _ = run(capsys, "inspect", str(tmp_path / "run"))
    assert status == 1 and "damaged (1 problem: inspect the store)" in out, out


def test_show_of_a_sound_entry_of_a_damaged_store_still_works(store, capsys):
    escape_relative(store)
    status, out, _ = run(capsys, "show", str(store), "0", "pair")
    assert status == 0 and "tensor #0 (4,) bfloat16" in out


def test_reopening_runs_no_code_of_the_classes_a_store_names(store, capsys):
    with IntermediatesCache.open(store) as cache:
        values = cache.fetch(0)
    assert run(capsys, "show", str(store), "0", "rec")[0] == 0
    assert run(capsys, "show", str(store), "0", "pt")[0] == 0
    assert CALLS == [], "a constructor ran on values read from the store"
    want = batch_values()
    CALLS.clear()
    assert type(values["rec"]) is Recorded and values["rec"].n == 5
    assert_same(values["rec"].t, want["rec"].t)
    assert type(values["settings"]) is Settings and values["settings"] == want["settings"]
    assert type(values["pt"]) is Point and values["pt"].y == 7
    assert_same(values["pt"].x, SMALL)
    assert values["meta"]["lr"] == 0.5 and values["meta"]["dt"] is torch.bfloat16


def test_a_class_of_a_lazy_module_is_looked_up_without_running_its_getattr(store, monkeypatch):
    """transformers' modules are lazy: their __getattr__ imports. A store naming a
    class in one must not call it."""
    lazy = types.ModuleType("spillcache_lazy_module")

    def module_getattr(name):
        CALLS.append(("__getattr__", name))
        return Recorded

    lazy.__getattr__ = module_getattr
    monkeypatch.setitem(sys.modules, lazy.__name__, lazy)
    edit_entries(store, lambda e: e["rec"].__setitem__("class", f"{lazy.__name__}:Recorded"))
    with pytest.warns(UserWarning, match="spillcache_lazy_module:Recorded is not imported"):
        cache = IntermediatesCache.open(store)
    with cache:
        value = cache.fetch(0)["rec"]
    assert CALLS == []
    assert type(value) is dict and value["n"] == 5


def test_a_class_whose_fields_changed_comes_back_as_a_dict(store):
    def rename(found: dict) -> None:
        found["rec"]["fields"][1][0] = "__class__"  # would change the rebuilt value's class

    edit_entries(store, rename)
    with pytest.warns(UserWarning, match="does not have the fields the store gives"):
        cache = IntermediatesCache.open(store)
    with cache:
        value = cache.fetch(0)["rec"]
    assert type(value) is dict and value["__class__"] == 5
    assert not dataclasses.is_dataclass(value)


def test_a_linked_batches_dir_in_a_store_with_no_batch_is_refused_and_nothing_outside_goes(
    tmp_path,
):
    """A kept store whose process died before its first flush records no batch, and
    opening it tidies its ``batches/``: where that is a symbolic link, the store is
    refused before anything is removed, and nothing it points to is touched."""
    import warnings

    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(tmp_path / "spill"), keep_store=True
    )
    cache = IntermediatesCache([{"h": torch.arange(4096.0)}], config=config)
    cache.close()
    path = Path(cache.store_path)
    root = path / "zarr.json"
    document = json.loads(root.read_text())
    own = document["attributes"]["spillcache"]
    own.update(complete=False, num_batches=0, released=True, keep=True)
    own.pop("flush", None)
    root.write_text(json.dumps(document))
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "0").mkdir(parents=True)
    (elsewhere / "0" / "precious").write_text("keep me")
    (elsewhere / "notes.partial").write_text("keep me too")
    shutil.rmtree(path / "batches")
    os.symlink(elsewhere, path / "batches")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(StoreCorruptError, match="batches"):
            IntermediatesCache.open(str(path))
    assert (elsewhere / "0" / "precious").read_text() == "keep me"
    assert (elsewhere / "notes.partial").read_text() == "keep me too"


# ----------------------------------------- rot no check caught (a review found each)


def kept_store(directory: Path, batches: list[dict]) -> Path:
    """A complete kept store of ``batches`` (checksums on), made in ``directory``."""
    config = CacheConfig(host_bytes=0, inline_bytes="1KiB", disk_path=str(directory),
                         keep_store=True)  # fmt: skip
    cache = IntermediatesCache(batches, config=config)
    cache.close()
    return Path(cache.store_path)


def test_a_complete_store_whose_root_counts_fewer_batches_than_it_holds_is_damaged(store, capsys):
    """A rotten num_batches (2 -> 0) is no empty store, and its arrays no orphans that
    `spillcache gc --yes` would delete."""
    from spillcache._internal.store.summary import find_orphans

    root_attribute("num_batches", 0)(store)
    said = "num_batches is 0, but this complete store wrote batches/0"
    assert_damaged_everywhere(store, capsys, "h", said, entry=False)
    attributes = json.loads((store / "zarr.json").read_text())["attributes"]["spillcache"]
    assert find_orphans(store, attributes)["unreferenced"] == []


def test_a_crashed_store_whose_root_counts_fewer_batches_than_a_completed_flush_wrote_is_damaged(
    store, capsys
):
    """Past the count, a crashed store may hold a batch of a flush that did not finish,
    never one of a flush its root says completed."""
    edit_json(store / "zarr.json", lambda g: g["attributes"]["spillcache"].update(
        complete=False, released=True, num_batches=1))  # fmt: skip
    said = "num_batches is 1, but flush 1, which completed, wrote batches/1"
    assert_damaged_everywhere(store, capsys, "h", said, entry=False)


def test_a_batch_past_the_count_that_an_unfinished_flush_wrote_is_still_a_leftover(store):
    """What the two tests above refuse is not what a crash leaves: a batch written by
    the flush the crash cut short (its number past the root's) is dropped on open."""
    edit_json(store / "zarr.json", lambda g: g["attributes"]["spillcache"].update(
        complete=False, released=True, num_batches=1))  # fmt: skip
    edit_json(group_file(store, 1), lambda g: g["attributes"]["spillcache"].update(flush=2))
    with pytest.warns(UserWarning, match="unrecorded batches"):
        cache = IntermediatesCache.open(store)
    with cache:
        assert len(cache) == 1
        assert_same(cache.fetch(0)["h"], H)
    assert not (store / "batches" / "1").exists()


def test_a_dict_key_that_cannot_hash_is_damage_not_a_typeerror_at_fetch(store, capsys):
    """A list node as a dict key would build dict([([], ...)]): a TypeError (unhashable
    type: 'list') at every fetch of the batch, after verify called the store sound."""
    edit_entries(
        store, lambda e: e["meta"]["items"][0].__setitem__(0, {"type": "list", "items": []})
    )
    assert_damaged_everywhere(store, capsys, "meta", "has a key no dict can have")


def test_dict_keys_that_hash_come_back(tmp_path):
    keys = {Settings(0.5, "k"): 1, Point(1, 2): 2, (torch.float16, ("x", None)): 3,
            torch.device("cpu"): 4, 5: 5}  # fmt: skip
    with IntermediatesCache.open(kept_store(tmp_path, [{"d": keys}])) as cache:
        assert cache.fetch(0)["d"] == keys


def test_requires_grad_on_an_integer_tensor_is_damage_not_a_runtimeerror_at_fetch(store, capsys):
    """torch lets only floating-point and complex tensors require grad: an int64 tensor
    marked so failed every fetch of its batch with a RuntimeError."""
    edit_entries(store, lambda e: e["rec"]["fields"][0][1].__setitem__("requires_grad", True))
    said = "its int64 tensor requires grad, which only floating-point and complex ones can"
    assert_damaged_everywhere(store, capsys, "rec", said)


@pytest.mark.parametrize(
    "shape", [[0, 10**30], [0, 2**63], [0, 2**62, 2]], ids=["1e30", "2**63", "strides"]
)
def test_an_empty_array_whose_sizes_overflow_int64_is_damage_not_a_torch_error(
    tmp_path, capsys, shape
):
    """An empty array has no chunk whose size bounds its shape: a size past int64 made
    verify and show print torch's C++ stack, and fetch raise a TypeError."""
    path = kept_store(tmp_path, [{"h": torch.ones(0, 3)}])

    def change(metadata: dict) -> None:
        metadata["shape"] = shape
        metadata["chunk_grid"]["configuration"]["chunk_shape"] = [max(1, n) for n in shape]

    edit_json(path / "tensors" / array_of(path, "h") / "zarr.json", change)
    assert_damaged_everywhere(path, capsys, "h", "is more than torch can hold")


@pytest.mark.parametrize("version", ["missing", "1", 1.0, True, None])
def test_a_root_without_a_numeric_format_version_is_damaged_not_from_a_newer_spillcache(
    store, capsys, version
):
    """No spillcache writes such a root: "upgrade spillcache" would be the wrong fix."""

    def change(own: dict) -> None:
        if version == "missing":
            del own["format_version"]
        else:
            own["format_version"] = version

    edit_json(store / "zarr.json", lambda g: change(g["attributes"]["spillcache"]))
    with pytest.raises(StoreCorruptError) as refused:
        IntermediatesCache.open(store)
    said = f"{store / 'zarr.json'}: its format_version "
    assert str(refused.value).startswith(said) and "is damaged" in str(refused.value)
    assert "upgrade" not in str(refused.value)
    status, out, _ = run(capsys, "verify", str(store))
    assert status == 1 and out.startswith(f"BAD {said}"), out
    for command in (["inspect"], ["show", "0", "h"]):
        status, _, err = run(capsys, command[0], str(store), *command[1:])
        assert status == 1 and f"damaged: {said}" in err, err


@pytest.mark.parametrize("damage", ["cut short", "missing"])
def test_open_of_a_store_whose_root_is_damaged_names_the_file(store, damage):
    """Not "is not a spillcache store (no spillcache attributes)": the CLI's words."""
    root = store / "zarr.json"
    if damage == "missing":
        root.unlink()
    else:
        root.write_bytes(root.read_bytes()[: len(root.read_bytes()) // 2])
    with pytest.raises(StoreCorruptError) as refused:
        IntermediatesCache.open(store)
    said = "is not valid JSON" if damage == "cut short" else "is missing"
    assert str(refused.value).startswith(f"{root} {said}"), str(refused.value)


def test_an_array_numbered_past_what_a_reopened_cache_can_follow_is_damage(store, capsys):
    """A reopened cache numbers new records past the store's largest: from an 18-digit
    name, the next would have 19, which close() refused, losing the value."""
    big = "9" * 18
    os.rename(store / "tensors" / array_of(store, "h"), store / "tensors" / big)
    for batch in (0, 1):
        edit_entries(store, lambda e: e["h"].__setitem__("array", f"tensors/{big}"), batch)
    with pytest.raises(StoreCorruptError, match="is damaged, so it is not opened") as refused:
        IntermediatesCache.open(store)
    assert f"'tensors/{big}', which is not one spillcache writes" in str(refused.value)
    assert "a stored n < 10**17" in str(refused.value)
    status, out, _ = run(capsys, "verify", str(store))
    assert status == 1 and f"tensors/'{big}' is a directory not named as arrays are" in out


def test_a_reopened_cache_goes_on_from_a_large_array_number_it_reads(store):
    """The numbers a reader takes leave the writer room: a name of 16 digits is followed
    by ones of 17, which the next open reads."""
    large = "9" * 16
    os.rename(store / "tensors" / array_of(store, "h"), store / "tensors" / large)
    for batch in (0, 1):
        edit_entries(store, lambda e: e["h"].__setitem__("array", f"tensors/{large}"), batch)
    config = CacheConfig(host_bytes=0, inline_bytes="1KiB")
    with IntermediatesCache.open(store, config=config) as cache:
        cache.update(0, {"h2": torch.full((64, 64), 2.0)})
    with IntermediatesCache.open(store) as again:
        assert torch.equal(again.fetch(0)["h2"], torch.full((64, 64), 2.0))
        assert_same(again.fetch(1)["h"], H)
    assert any(len(name) == 17 for name in os.listdir(store / "tensors"))
