"""The docs' examples, run as the pages write them (issue 23): docs/analysis.md (a demo's
kept store read with plain zarr), docs/plan.md's worked example, the `spillcache plan`
figure of docs/llmcompressor.md, docs/70b-one-node.md from the plan to the clean-up,
and docs/stats.md against what `stats()` and `switch.stats()` return.

Commands come from the pages' ```console blocks: `$ ` starts a command (a line ending in
`\\` goes on), the lines after it are what the page shows it printing, `...` standing
for lines left out. A `spillcache` command runs in this process (`cli.main`, so that
the disk probe can be shortened); `mkdir` runs as a program. What a command prints must
be what the page shows, whitespace aside; only figures that measure this machine (free
space, disk speed, a process id) may differ. A change to a page is what gets tested:
nothing here repeats an example.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from spill_testing import run_preloaded_python
from spillcache import CacheConfig, IntermediatesCache, cli
from spillcache._internal.cli import plan_figures
from spillcache._internal.engine.tenants import TIERS

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# The disk probe measures for 10 s; its figures are not compared, so a short one will do.
PROBE_SECONDS = 0.4
# Lines that report a measurement of this machine: their numbers are not compared.
MEASURED = re.compile(r" free; measured |^disk I/O at that speed: |\bpid \d+")
STORE_NAME = re.compile(r"spillcache-\d+-[0-9a-f]{12}")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID")


# ------------------------------------------------------------------ reading pages


@dataclass
class Example:
    command: str
    shown: list[str] = field(default_factory=list)


def page(name: str) -> str:
    return (DOCS / name).read_text()


def section(text: str, heading: str) -> str:
    """The part of a page under the `## ` heading that starts with ``heading``."""
    found = re.search(rf"^## {re.escape(heading)}.*?(?=^## |\Z)", text, re.M | re.S)
    assert found, f"no section '## {heading}...'"
    return found.group(0)


def fenced(text: str, language: str) -> list[str]:
    """The blocks fenced as ``language``, indented ones (in a list item) dedented."""
    pattern = rf"^( *)```{language}\n(.*?)^\1```"
    return [
        "".join(line[len(indent) :] for line in body.splitlines(keepends=True))
        for indent, body in re.findall(pattern, text, re.M | re.S)
    ]


def examples(text: str) -> list[Example]:
    """Every command of the ```console blocks in ``text``, with what it is shown printing."""
    found: list[Example] = []
    for block in fenced(text, "console"):
        lines = iter(block.splitlines())
        for line in lines:
            if line.startswith("$ "):
                command = line[2:]
                while command.endswith("\\"):
                    command = command[:-1].rstrip() + " " + next(lines).strip()
                found.append(Example(command))
            else:
                assert found, f"output before any command: {line!r}"
                found[-1].shown.append(line)
    return found


# ------------------------------------------------------------------ running them


def normal(line: str) -> str:
    """A line as compared: whitespace runs as one space, store names without their
    process and id, and no numbers in a line that measures this machine."""
    line = STORE_NAME.sub("spillcache-PID-ID", " ".join(line.split()))
    if MEASURED.search(line):
        line = re.sub(r"\d+(\.\d+)?( [KMGT]iB| B)?", "N", line)  # 659.3 MiB/s, 1.2 GiB/s
    return line


def assert_prints(example: Example, printed: list[str]) -> None:
    """Every line shown is printed, in order; lines shown together are printed together;
    `...` stands for lines left out (without one at the start or the end, the page shows
    the output from its first line or to its last)."""
    parts: list[list[str]] = [[]]
    for line in example.shown:
        if line.strip() == "...":
            parts.append([])
        else:
            parts[-1].append(normal(line))
    got = [normal(line) for line in printed]
    problem = (
        f"`{example.command}` printed other lines than the page shows; it printed:\n"
        + "\n".join(printed)
    )
    position = 0
    for number, part in enumerate(parts):
        if not part:
            continue
        starts = [0] if number == 0 else range(position, len(got) - len(part) + 1)
        found = next((k for k in starts if got[k : k + len(part)] == part), None)
        assert found is not None, f"{problem}\n\nthe page shows, not printed:\n" + "\n".join(part)
        position = found + len(part)
    if parts[-1]:
        assert position == len(got), f"{problem}\n\nthe page shows the output ending earlier"


def run(example: Example, capsys, monkeypatch, paths: dict[str, str] | None = None) -> list[str]:
    """Run one example as written (with ``paths``, the page's directories, mapped to the
    test's) and check what it printed against the page. Returns the printed lines, with
    the test's directories mapped back to the page's."""
    paths = paths or {}
    command = example.command
    for shown, real in paths.items():
        command = command.replace(shown, real)
    argv = shlex.split(command)
    with monkeypatch.context() as scope:
        while "=" in argv[0]:  # leading VAR=value assignments: for this command only
            name, _, value = argv.pop(0).partition("=")
            scope.setenv(name, value)
        if argv[0] != "spillcache":
            assert argv[0] == "mkdir", f"this test runs spillcache and mkdir, not {argv[0]!r}"
            subprocess.run(argv, check=True)
            return []
        capsys.readouterr()
        status = cli.main(argv[1:])
        out, err = capsys.readouterr()
    assert status == 0, f"`{example.command}` exited {status}: {err}"
    printed = out.splitlines()
    for shown, real in paths.items():
        printed = [line.replace(real, shown) for line in printed]
    if example.shown:
        assert_prints(example, printed)
    return printed


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """The pages' commands run without this shell's spillcache settings or torchrun."""
    for name in list(os.environ):
        if name.startswith("SPILLCACHE_") or name in TORCHRUN_VARIABLES:
            monkeypatch.delenv(name)
    monkeypatch.setattr(plan_figures, "PROBE_SECONDS", PROBE_SECONDS)


# ------------------------------------------------------------------ docs/analysis.md


def test_analysis_reads_the_store_a_demo_keeps(capsys, monkeypatch):
    text = page("analysis.md")
    demo, inspect = examples(text)
    assert demo.command.startswith("spillcache demo ") and "--keep-store" in demo.command
    # The demo keeps its store where the page says (the temp directory); removed below.
    printed = run(demo, capsys, monkeypatch, {"/tmp/": tempfile.gettempdir() + "/"})
    (kept,) = [line.split(": ", 1)[1].strip() for line in printed if "store kept at" in line]
    kept = kept.replace("/tmp/", tempfile.gettempdir() + "/", 1)
    try:
        (shown_store,) = STORE_NAME.findall(inspect.command)
        (shown_path,) = [w for w in inspect.command.split() if shown_store in w]
        run(inspect, capsys, monkeypatch, {shown_path: kept})
        (code,) = fenced(text, "python")
        exec(compile(code, "analysis.md", "exec"), {"store_path": kept})
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    format_line, hidden_line = capsys.readouterr().out.splitlines()
    # What the page says the snippet prints on the demo's store.
    assert format_line == "1 True"
    assert hidden_line.startswith("torch.Size([1, 256, 256]) torch.float32 ")
    assert f"`{format_line}`" in text and "`torch.Size([1, 256, 256]) torch.float32`" in text


# ------------------------------------------------------------------ docs/plan.md


def test_plans_worked_example_runs_as_written(capsys, monkeypatch):
    made, plan = examples(section(page("plan.md"), "Worked example"))
    assert made.command.startswith("mkdir -p ") and plan.command.startswith("spillcache plan ")
    monkeypatch.chdir(ROOT)  # the page's config path is the clone's
    directories = [Path(word) for word in shlex.split(made.command)[2:]]
    tops = {Path(*path.parts[:3]) for path in directories}  # /tmp/nvme0, /tmp/nvme1
    ours = [top for top in tops if not top.exists()]  # made here: removed here
    try:
        run(made, capsys, monkeypatch)
        run(plan, capsys, monkeypatch)
    finally:
        for top in ours:
            shutil.rmtree(top, ignore_errors=True)


# ------------------------------------------------------------------ docs/llmcompressor.md


@pytest.mark.slow
def test_llmcompressor_page_gives_plans_per_layer_figures(capsys, monkeypatch):
    """The per-layer disk traffic the page gives for a 70B model is what `spillcache plan`
    says: its command run as written (one rank of 512 samples, every layer replayed:
    minutes, hence slow), and the page's per-layer figures worked out from its totals."""
    advice = section(page("llmcompressor.md"), "Which config to start from")
    (plan,) = examples(advice)
    monkeypatch.chdir(ROOT)
    printed = run(plan, capsys, monkeypatch)
    (whole,) = [line for line in printed if line.startswith("whole run, disk: ")]
    written, read = (float(n) for n in re.findall(r"([0-9.]+) GiB", whole))
    layers = 80  # the example config's num_hidden_layers
    prose = " ".join(advice.split())
    assert f"{read:g} GiB read and {written:g} GiB written over the {layers}" in prose
    per_layer = (
        f"{read / layers:.0f} GiB read and about {written / layers:.0f} GiB written per layer"
    )
    assert per_layer in prose


# ------------------------------------------------------------------ docs/70b-one-node.md

# A rank of a torchrun job killed with SIGKILL while its values were on disk: what the
# page's clean-up section finds. Its stores are made with the page's config file.
KILLED_RANK = """
import os, signal, sys, torch
from spillcache import CacheConfig, IntermediatesCache
config = CacheConfig.from_file(sys.argv[1]).replace(host_bytes=0)  # everything to disk
cache = IntermediatesCache.empty(4, "cpu", config=config)
for index in range(4):
    cache.update(index, {"hidden": torch.ones(64, 1024)})
cache.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_70b_page_runs_from_plan_to_clean_up(tmp_path, capsys, monkeypatch):
    """Every command of the page that this machine can run, in the page's order, with
    the drives' directories (/nvme0, /nvme1) under the test's directory. The torchrun
    command is not run: it needs a node of 8 GPUs and the model's weights (the script
    is compiled; tests/integration/test_ddp_oneshot.py runs torchrun with gloo ranks)."""
    text = page("70b-one-node.md")
    paths = {"/nvme0/": f"{tmp_path}/nvme0/", "/nvme1/": f"{tmp_path}/nvme1/"}
    (tmp_path / "docs").symlink_to(DOCS)  # the page's --model is the clone's example
    monkeypatch.chdir(tmp_path)

    # Plan, and the config file it writes (shown on the page as it is written).
    for example in examples(section(text, "1. Plan")):
        run(example, capsys, monkeypatch, paths)
    config_section = section(text, "2. The config file")
    (shown_toml,) = fenced(config_section, "toml")
    written = (tmp_path / "spill.toml").read_text()
    for shown, real in paths.items():
        written = written.replace(real, shown)
    assert written == shown_toml, f"plan --write wrote, unlike the page:\n{written}"
    settings = tomllib.loads(written)
    assert settings["budget_scope"] == "node" and len(settings["disk_path"]) == 2
    for example in examples(config_section):
        run(example, capsys, monkeypatch, paths)

    # The script: compiled, not run (above); it switches spillcache on from the file.
    (script,) = fenced(section(text, "3. The script"), "python")
    compile(script, "calibrate.py", "exec")
    assert re.search(r"enable\(\s*\"spill.toml\"", script) and "checkpoint_dir=" in script

    # Cleaning up after a rank killed with SIGKILL: its stores on both drives.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_")}
    env.update(RANK="3", WORLD_SIZE="8", LOCAL_RANK="3", LOCAL_WORLD_SIZE="8")
    env.update(TORCHELASTIC_RUN_ID="llama70b-gptq")
    killed = run_preloaded_python("-c", KILLED_RANK, "spill.toml", env=env)
    assert killed.returncode == -9, killed.stderr
    left = sorted(tmp_path.glob("nvme*/spill/llama70b-gptq/rank3/spillcache-*"))
    assert len(left) == 2, left
    clean_up = examples(section(text, "6. Cleaning up"))
    assert [e.command.split()[-1] for e in clean_up] == ["du", "gc", "--yes", "du"], clean_up
    du, dry_run, gc, du_after = clean_up
    run(du, capsys, monkeypatch, paths)
    run(dry_run, capsys, monkeypatch, paths)
    assert all(path.exists() for path in left), "a dry run removed a store"
    run(gc, capsys, monkeypatch, paths)
    assert not any(path.exists() for path in left)
    assert not list(tmp_path.glob("nvme*/spill/*")), "gc left the run's directories"
    run(du_after, capsys, monkeypatch, paths)


# ------------------------------------------------------------------ docs/stats.md


def documented_keys(text: str) -> set[str]:
    """The keys of a page's tables (first column), `<tier>` spelt out for each tier."""
    keys = set()
    for key in re.findall(r"^\| `([^`]+)` \|", text, re.M):
        keys |= {key.replace("<tier>", tier) for tier in TIERS} if "<tier>" in key else {key}
    return keys


def key_paths(value: object, prefix: str = "") -> set[str]:
    """Every leaf of a stats dict as a path: `host.hits`, `disk.disks[].path`;
    `pool.counters` is one value (its names are counters' names, checked apart)."""
    if isinstance(value, dict) and prefix != "pool.counters":
        return set().union(
            *(key_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in value.items())
        )
    if isinstance(value, list):
        return set().union(set(), *(key_paths(item, f"{prefix}[]") for item in value))
    return {prefix}


def test_every_stats_key_is_documented_and_every_documented_key_exists(tmp_path):
    text = page("stats.md")
    documented = documented_keys(
        section(text, "The cache's own figures") + section(text, "The pool's figures")
    )
    config = CacheConfig(
        host_bytes="1MiB", write_behind_bytes="256KiB", read_buffer_bytes="256KiB",
        inline_bytes=0, disk_path=[str(tmp_path / "a"), str(tmp_path / "b")],
    )  # fmt: skip
    with IntermediatesCache.empty(8, "cpu", config=config) as cache:
        for index in range(8):  # 2 MiB of values against a host tier of 512 KiB
            cache.update(index, {"hidden": torch.full((64, 1024), float(index))})
        for _ in cache.iter_prefetch(["hidden"]):
            pass
        cache.flush()
        stats = cache.stats()
    json.dumps(stats)  # the page: json.dumps takes it as it is
    returned = key_paths(stats)
    assert not returned - documented, f"undocumented in docs/stats.md: {returned - documented}"
    assert not documented - returned, f"documented, not returned: {documented - returned}"
    assert len(stats["disk"]["disks"]) == 2 and stats["disk"]["bytes_written"] > 0
    counters = set(stats["pool"]["counters"])
    assert counters and counters <= documented, counters - documented
    # The zeros the page warns about: always 0, and 0 once every write has landed.
    assert stats["disk"]["misses"] == stats["disk"]["evictions"] == 0
    assert stats["write_behind"]["writes"] == 0 and stats["disk"]["hits"] > 0


@pytest.mark.skipif(
    importlib.util.find_spec("llmcompressor") is None,
    reason="switch.stats() needs llm-compressor: pip install -e '.[llmcompressor]'",
)
def test_every_switch_stats_key_is_documented_and_exists(tmp_path):
    from spillcache.integrations.llmcompressor import enable

    documented = documented_keys(section(page("stats.md"), "`switch.stats()`"))
    with enable(host_bytes="1MiB", inline_bytes=0, disk_path=str(tmp_path)) as switch:
        cache = switch.cache_class.empty(4, "cpu")
        for index in range(4):
            cache.update(index, {"hidden": torch.ones(256, 1024)})
        cache.flush()
        figures = switch.stats()
        cache.close()
    returned = key_paths(figures)
    assert returned == documented, (returned - documented, documented - returned)
    assert figures["caches"] == 1 and figures["disk"]["bytes_written"] > 0
