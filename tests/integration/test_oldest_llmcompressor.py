"""The ``llmcompressor`` extra's lower bound is a version that was tested (issue 11).

CI runs the integration tests against the newest llm-compressor the extra allows (what
``pip install -e '.[llmcompressor]'`` picks). The ``slow`` test here installs the
oldest one the bound allows into a fresh virtual environment, from the package
registry, with this checkout of spillcache, and runs the same integration tests there
(about 3 minutes).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The oldest llm-compressor the extra allows; older ones pin torch below 2.13.
OLDEST = "0.13.0"


def extra_requirement() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = project["optional-dependencies"]["llmcompressor"]
    return requirement


def test_the_extras_lower_bound_is_the_version_tested():
    assert re.fullmatch(r"llmcompressor>=([\d.]+)", extra_requirement()).group(1) == ".".join(
        OLDEST.split(".")[:2]
    )


@pytest.mark.slow
@pytest.mark.integration
def test_the_integration_tests_pass_with_the_oldest_llmcompressor(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    # torch==2.13.0: the CPU build these machines install from local disk.
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "torch==2.13.0"]
        + [f"llmcompressor=={OLDEST}", "-e", f"{ROOT}[test]"],
        check=True,
    )
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == OLDEST
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    run = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    tail = run.stdout[-3000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert re.search(r"\d+ passed", tail) and " failed" not in tail, tail
    print(f"\nllm-compressor {OLDEST}: {tail.strip().splitlines()[-1]}")
