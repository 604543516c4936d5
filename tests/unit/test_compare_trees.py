"""bench/compare_trees.py really runs each tree's spillcache: the earlier commit's from
its export, the working tree's from src/ (an editable install must not win)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_each_round_imports_the_tree_it_names(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import spillcache\nprint('imported', spillcache.__file__)\n")
    done = subprocess.run(
        [sys.executable, "bench/compare_trees.py", "--rev", "HEAD", "--rounds", "1", "--", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    imported = dict(
        line.split(" | imported ") for line in done.stdout.splitlines() if " | imported " in line
    )
    assert set(imported) == {"          HEAD", "  working tree"}, done.stdout
    assert imported["  working tree"] == str(REPO / "src" / "spillcache" / "__init__.py")
    earlier = Path(imported["          HEAD"])
    assert earlier.name == "__init__.py" and "spillcache-compare-" in str(earlier)
    assert not earlier.exists()  # the export is removed at the end
