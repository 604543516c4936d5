"""Every `$ spillcache ...` example in docs/cli.md, run against real stores."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from spill_testing import run_console
from spillcache import CacheConfig, IntermediatesCache

PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
DOC_STORE = "/nvme/spill/spillcache-28318-a51fab82b091"
DOC_DIR = "/nvme/spill"
DOC_RUN = "llama70b-gptq"  # the run directory the page's examples use, under DOC_DIR


def examples() -> list[tuple[str, list[str]]]:
    """(command, the output the page shows) for each example block."""
    found = []
    for block in re.findall(r"```\n(.*?)```", PAGE.read_text(), flags=re.DOTALL):
        lines = block.splitlines()
        if lines and lines[0].startswith("$ "):
            found.append((lines[0][2:], lines[1:]))
    return found


def words(line: str) -> list[str]:
    return line.split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("docs")
    hidden = torch.tensor([[1.0, float("nan")], [float("inf"), 3.0]]).to(torch.bfloat16)
    config = CacheConfig(
        host_bytes=0, inline_bytes=0, disk_path=str(base / "spill"), keep_store=True,
        checksum=True,
    )  # fmt: skip
    cache = IntermediatesCache([{"h": hidden, "pos": torch.arange(300)}], config=config)
    cache.close()
    # A torchrun job's run directory, as the page's run examples show (rank 0's store).
    rank0 = config.replace(disk_path=str(base / "spill" / DOC_RUN / "rank0"))
    IntermediatesCache([{"h": torch.ones(8, 64)}], config=rank0).close()
    (base / "spill.toml").write_text("host_bytes = 'lots'\n")
    return {"store": cache.store_path, "dir": str(base / "spill"), "cwd": base,
            "h": cache._core._batches[0]["h"].leaves[0].array}  # fmt: skip


@pytest.mark.parametrize(("command", "shown"), examples(), ids=lambda v: str(v)[:40])
def test_cli_example(world, command, shown):
    command = command.replace(DOC_STORE, world["store"]).replace(DOC_DIR, world["dir"])
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_")}
    argv = shlex.split(command)
    while "=" in argv[0]:  # leading VAR=value assignments
        name, _, value = argv.pop(0).partition("=")
        environ[name] = value
    assert argv[0] == "spillcache"
    if argv[1] == "verify":  # the page shows a damaged chunk being found
        chunk = Path(world["store"], "tensors", world["h"], "c.0.0")
        data = bytearray(chunk.read_bytes())
        data[0] ^= 0xFF
        chunk.write_bytes(bytes(data))
    done = run_console(*argv[1:], cwd=world["cwd"], env=environ)
    expected = 2 if shown[0].startswith("spillcache ") else 1 if shown[0].startswith("BAD") else 0
    assert done.returncode == expected, (done.stdout, done.stderr)
    actual = (done.stdout or done.stderr).splitlines()
    first = shown[0]
    if "..." in first:  # shown up to the ellipsis
        assert actual[0].startswith(first.split("...")[0].rstrip())
    elif not re.search(r"[0-9/]", first):  # a table header: exactly as shown
        assert words(actual[0]) == words(first)
    elif argv[1] == "show":
        assert actual[:2] == shown[:2]
    else:  # the same kind of line: its first word (or the error's command)
        assert words(actual[0])[0] == words(first)[0]
