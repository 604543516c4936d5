"""Fixtures shared by the command's tests."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write: by permissions, or (root ignores them) a
    read-only bind mount of it over itself."""
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() != 0:
        directory.chmod(0o500)
        yield directory
        directory.chmod(0o700)
        return
    mount = ["mount", "--bind", "-o", "ro", str(directory), str(directory)]
    done = subprocess.run(mount, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"root ignores permissions, and no read-only bind mount: {done.stderr}")
    yield directory
    subprocess.run(["umount", str(directory)], check=True)
