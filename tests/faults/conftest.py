"""Fixtures of the fault tests: see injection.py."""

from __future__ import annotations

import threading

import pytest

from faults.injection import TOTALS, FreeSpace, Syscalls


@pytest.fixture
def syscalls(monkeypatch) -> Syscalls:
    """Chosen system calls of the disk I/O fail or read short (``Syscalls``)."""
    return Syscalls(monkeypatch)


@pytest.fixture
def free_space(monkeypatch) -> FreeSpace:
    """``os.statvfs`` reports chosen free space per directory (``FreeSpace``)."""
    return FreeSpace(monkeypatch)


@pytest.fixture(autouse=True)
def _no_stray_threads():
    """Every cache a test makes is closed by its end: no I/O thread outlives it."""
    before = set(threading.enumerate())
    yield
    stray = [t for t in threading.enumerate() if t not in before and t.name.startswith("spill")]
    assert not [t for t in stray if t.is_alive()], f"threads still running: {stray}"


def pytest_terminal_summary(terminalreporter) -> None:
    made = {kind: count for kind, count in TOTALS.items() if count}
    if made:
        listed = ", ".join(f"{count} {kind}" for kind, count in sorted(made.items()))
        terminalreporter.write_line(
            f"tests/faults: {sum(made.values())} faults at the system calls ({listed})"
        )
