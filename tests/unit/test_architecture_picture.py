"""docs/img/architecture.svg is drawn by docs/img/draw_architecture.py from the tables in
docs/img/architecture_tables.py: these fail when a module is missing from MODULES, a
function a path names is gone, or the committed picture is not the script's drawing."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "docs" / "img" / "draw_architecture.py"
TABLES = "docs/img/architecture_tables.py"
REDRAW = "python docs/img/draw_architecture.py"


def _load():
    spec = importlib.util.spec_from_file_location("draw_architecture", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


picture = _load()


@pytest.fixture(scope="module")
def files():
    return picture.module_files()


@pytest.fixture(scope="module")
def index(files):
    return picture.CodeIndex(files)


def test_every_module_is_in_the_table(files):
    assert "\n".join(picture.table_problems(files)) == ""
    assert set(files) == set(picture.MODULES)


def test_a_module_missing_from_the_table_is_named_with_the_line_to_add(files):
    added = {**files, "new_module": "_internal/new_module.py"}
    (problem,) = picture.table_problems(added)
    assert f"src/spillcache/_internal/new_module.py is not in MODULES of {TABLES}" in problem
    assert '"new_module": (GROUP, THREAD, "what it owns")' in problem
    assert REDRAW in problem


def test_a_table_line_without_its_module_is_named(files):
    gone = {name: path for name, path in files.items() if name != "aio"}
    (problem,) = picture.table_problems(gone)
    assert f"MODULES of {TABLES} names aio, but src/spillcache has no such module" in problem


def test_every_function_on_the_paths_is_defined_where_it_is_named(files, index):
    assert "\n".join(picture.function_problems(index)) == ""
    calls = {
        call
        for route in picture.PATHS
        for _, step in picture.steps_of(route)
        for call in step.calls
    }
    assert {"Placement._evict", "Store.write_tensor", "chunkio.write_file"} <= calls
    for call in sorted(calls):
        module, problem = index.locate(call)
        assert problem is None, problem
        source = (picture.SRC / files[module]).read_text(encoding="utf-8")
        owner, function = call.split(".")
        assert re.search(rf"^\s*def {function}\(", source, re.MULTILINE), call
        if owner[0].isupper():
            assert re.search(rf"^class {owner}\b", source, re.MULTILINE), call


def test_a_renamed_function_is_reported(index):
    module, problem = index.locate("Placement._no_such_step")
    assert module == "placement"
    assert "has no _no_such_step" in problem
    assert index.locate("chunkio.no_such_write")[1] is not None


def test_a_step_naming_a_gone_function_names_the_tables_file(index, monkeypatch):
    step = dataclasses.replace(picture.UPDATE.steps[0], calls=("Placement._no_such_step",))
    route = dataclasses.replace(picture.UPDATE, steps=(step,), disk_step=1)
    monkeypatch.setattr(picture, "PATHS", (route,))
    (problem,) = picture.function_problems(index)
    assert f"step U1 of PATHS in {TABLES} names Placement._no_such_step" in problem
    assert REDRAW in problem


def test_the_committed_picture_is_the_drawing(index):
    svg, problems = picture.build(index)
    assert "\n".join(problems) == ""
    committed = picture.SVG.read_text(encoding="utf-8")
    assert committed == svg, f"docs/img/architecture.svg is stale: run {REDRAW}"


def test_check_passes():
    assert picture.check() == []


def test_the_script_checks_when_run_from_elsewhere(tmp_path):
    # It finds its sibling modules by its own directory, not the working directory.
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
