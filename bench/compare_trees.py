"""One benchmark, run alternately against an earlier commit and the working tree.

A machine's speed drifts from day to day (and within a day, on a shared VM) by more
than most changes move a figure, so "did this change make it slower?" is answered by
interleaving: the same benchmark script (the working tree's), round after round, once
with the earlier commit's ``src`` first on ``PYTHONPATH`` and once with the working
tree's. Each run's output lines are printed with the tree they ran against.

    python bench/compare_trees.py --rev 3ed0e1c --rounds 3 -- bench/overhead.py
    python bench/compare_trees.py --rev HEAD~1 -- bench/calibration_sim.py --modes covered

The benchmark must use only spillcache's public API (the earlier tree's internals may
differ). The earlier commit is exported with ``git archive`` into a temporary
directory, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def export(rev: str, into: Path) -> Path:
    """The ``src`` directory of commit ``rev``, exported under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "xf", "-", "-C", str(into)], input=archive, check=True)
    return into / "src"


def run(label: str, src: Path, command: list[str]) -> int:
    """The benchmark with ``src`` first on PYTHONPATH, each output line labelled."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, *command], cwd=REPO, env=env, capture_output=True, text=True
    )
    for line in (done.stdout + done.stderr).splitlines():
        print(f"{label:>14} | {line}")
    return done.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--rounds", type=int, default=2, help="runs per tree, interleaved")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- bench/NAME.py [options]")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the benchmark after --, e.g. -- bench/overhead.py")
    work = Path(tempfile.mkdtemp(prefix="spillcache-compare-"))
    try:
        trees = [(args.rev, export(args.rev, work)), ("working tree", REPO / "src")]
        for round_number in range(1, args.rounds + 1):
            for label, src in trees:
                print(f"=== round {round_number}: {label}", flush=True)
                if run(label, src, command) != 0:
                    print(f"{label}: the benchmark failed", file=sys.stderr)
                    return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
