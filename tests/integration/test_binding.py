"""The switch covers every place the real llm-compressor binds its cache class, whether
llm-compressor is imported before ``enable()`` or after it."""

from __future__ import annotations

import sys
import textwrap

import pytest

pytest.importorskip(
    "llmcompressor",
    reason="llm-compressor is not installed: pip install -e '.[llmcompressor]'",
)

from spill_testing import run_preloaded_python  # noqa: E402
from spillcache.integrations import llmcompressor as integration  # noqa: E402

pytestmark = pytest.mark.integration

# The modules of llm-compressor 0.14 that bind the class by name.
BINDERS = (
    "llmcompressor.pipelines.cache",
    "llmcompressor.pipelines.sequential.pipeline",
    "llmcompressor.modifiers.transform.awq.base",
)


def bindings() -> dict[str, type]:
    """Every imported llm-compressor module that binds a class named IntermediatesCache."""
    return {
        name: vars(module)["IntermediatesCache"]
        for name, module in list(sys.modules.items())
        if name.split(".")[0] == "llmcompressor"
        and module is not None
        and isinstance(vars(module).get("IntermediatesCache"), type)
    }


def test_imported_before_enable(tmp_path):
    import importlib

    for name in BINDERS:
        importlib.import_module(name)
    stock = bindings()
    assert set(BINDERS) <= set(stock)
    with integration.enable(disk_path=str(tmp_path)) as switch:
        assert set(bindings().values()) == {switch.cache_class}
    assert bindings() == stock


def test_imported_after_enable():
    script = textwrap.dedent(
        f"""
        import importlib, sys
        from spillcache.integrations import llmcompressor as integration
        assert "llmcompressor" not in sys.modules
        switch = integration.enable(host_bytes="1MiB")
        modules = [importlib.import_module(name) for name in {BINDERS!r}]
        print("bound:", all(m.IntermediatesCache is switch.cache_class for m in modules))
        integration.disable()
        stock = sys.modules["llmcompressor.pipelines.cache"].IntermediatesCache
        print("restored:", stock.__module__, all(m.IntermediatesCache is stock for m in modules))
        """
    )
    # A process where llm-compressor was never imported (forked from one that imported
    # torch and spillcache, not llm-compressor: see spill_testing.run_preloaded_python).
    result = run_preloaded_python("-c", script, timeout=300)
    assert result.returncode == 0, result.stderr
    # llm-compressor logs to stdout too: read only the script's own lines.
    lines = [
        line for line in result.stdout.splitlines() if line.startswith(("bound:", "restored:"))
    ]
    assert lines == ["bound: True", "restored: llmcompressor.pipelines.cache True"]
