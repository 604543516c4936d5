"""docs/benchmarks.md's generated tables are what bench/published/'s JSON renders to."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "benchmarks.md"
PUBLISHED = ROOT / "bench" / "published"


@pytest.fixture(scope="module")
def tables():
    # bench/ is not on the test path (pyproject adds tests/ only): load the file itself.
    spec = importlib.util.spec_from_file_location("bench_tables", ROOT / "bench" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_docs_tables_are_the_published_json(tables):
    # check() also fails on a published file that no table shows, and on a marked table
    # whose file is missing; an empty directory would pass vacuously.
    assert sorted(PUBLISHED.glob("*.json"))
    assert tables.check(DOC, PUBLISHED) == []


def test_a_changed_figure_fails_the_check_and_names_its_table(tables, tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    published = tmp_path / "published"
    shutil.copy(DOC, doc)
    shutil.copytree(PUBLISHED, published)
    path = published / "two_disks.json"
    data = json.loads(path.read_text())
    data["rows"][0]["write GB/s"] *= 2  # as if the benchmark had been rerun
    path.write_text(json.dumps(data))

    assert tables.main(["--check", "--doc", str(doc), "--published", str(published)]) == 1
    assert "table 'two_disks' differs" in capsys.readouterr().err

    # Rewriting brings the doc back in line and touches nothing outside the table.
    before = doc.read_text()
    assert tables.main(["--doc", str(doc), "--published", str(published)]) == 0
    after = doc.read_text()
    assert tables.check(doc, published) == []
    changed = [
        (old, new)
        for old, new in zip(before.splitlines(), after.splitlines(), strict=True)
        if old != new
    ]
    assert len(changed) == 1 and changed[0][0].startswith("| raw, first directory |")
