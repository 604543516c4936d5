"""The crash tests' summary line: how many writers were killed, how many entries of
their kept stores were compared bit for bit after the kill."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import crash_plan  # noqa: E402


def pytest_terminal_summary(terminalreporter) -> None:
    totals = crash_plan.TOTALS
    if totals["kills"]:
        terminalreporter.write_line(
            f"tests/crash: {totals['kills']} writers killed with SIGKILL mid-write, "
            f"{totals['entries checked']} entries of kept stores compared bit for bit after "
            "the kill, 0 lost (a loss fails the test)"
        )
