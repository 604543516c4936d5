"""Crash images of a kept store for the pool machine's ``crash_and_open`` rule: the
store's files as a SIGKILL would leave them, and its owner recorded as dead."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def files_in(store: Path) -> set[Path]:
    return {p.relative_to(store) for p in store.rglob("*") if p.is_file()}


def copy_as_a_crash_leaves_it(store: Path, image: Path) -> None:
    """Every file of ``store`` as it is now, while its writer threads run: a chunk being
    written is copied part-written, a file renamed or removed meanwhile is missed, as
    a SIGKILL at this instant would leave them. (The flushed structures and the arrays
    they name do not change until the next flush.)"""
    for directory, _, names in os.walk(store):
        target = image / Path(directory).relative_to(store)
        target.mkdir(parents=True, exist_ok=True)
        for name in names:
            try:
                shutil.copyfile(Path(directory, name), target / name)
            except FileNotFoundError:
                pass


def tear(image: Path, written: Path, fate: str, length: int) -> None:
    """What a kill can leave of a file written after the flush: all of it, nothing, or
    its first ``length`` bytes under the ``.partial`` name it is written to before its
    rename."""
    path = image / written
    if fate == "missing":
        path.unlink()
    elif fate == "torn":
        torn = path.with_name(f"{path.name}.0badf00d.partial")
        torn.write_bytes(path.read_bytes()[:length])
        path.unlink()


def record_owner_dead(image: Path) -> None:
    """The image's root records a process that has ended: this pid, but started at
    another time (how a reused pid shows)."""
    root = image / "zarr.json"
    document = json.loads(root.read_text())
    state = document["attributes"]["spillcache"]
    assert isinstance(state["start_time"], int), "this test needs /proc"
    state["start_time"] += 1
    root.write_text(json.dumps(document))
