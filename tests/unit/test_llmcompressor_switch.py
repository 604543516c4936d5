"""The llm-compressor switch, against a stand-in package laid out as llm-compressor 0.14
binds its cache (the cache module, the sequential pipeline and the AWQ modifier import
the class by name). The real package is exercised in tests/integration."""

from __future__ import annotations

import gc
import importlib
import itertools
import sys
import threading
import types
import warnings

import pytest
import torch

from spillcache import CacheConfig, ConfigError, IntegrationError
from spillcache import IntermediatesCache as SpillcacheIntermediatesCache
from spillcache.integrations import llmcompressor as integration

_names = itertools.count()

STOCK = "class IntermediatesCache:\n    def __init__(self, *args, **kwargs):\n        pass\n"
IMPORTS_IT = "from {package}.pipelines.cache import IntermediatesCache\n"
BINDERS = ("pipelines.sequential.pipeline", "modifiers.transform.awq.base")


@pytest.fixture
def fake_llmcompressor(tmp_path, monkeypatch):
    """Writes a stand-in package and points the integration at it; returns a function
    that imports one of its modules by relative name."""
    package = f"fake_llmcompressor_{next(_names)}"
    files = {
        "__init__.py": "__version__ = '0.0-stand-in'\n",
        "pipelines/__init__.py": "",
        "pipelines/cache.py": STOCK,
        "pipelines/sequential/__init__.py": "",
        "modifiers/__init__.py": "",
        "modifiers/transform/__init__.py": "",
        "modifiers/transform/awq/__init__.py": "",
        **{
            binder.replace(".", "/") + ".py": IMPORTS_IT.format(package=package)
            for binder in BINDERS
        },
    }
    for relative, text in files.items():
        path = tmp_path / package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(integration, "PACKAGE", package)
    monkeypatch.setattr(integration, "CACHE_MODULE", f"{package}.pipelines.cache")
    monkeypatch.setattr(integration, "_stock_class", None)
    importlib.invalidate_caches()

    def load(relative: str):
        return importlib.import_module(f"{package}.{relative}")

    load.package = package
    load.root = tmp_path / package
    yield load
    integration.disable()
    for name in [name for name in sys.modules if name.split(".")[0] == package]:
        del sys.modules[name]


def bound_classes(load) -> list[type]:
    return [load(module).IntermediatesCache for module in ("pipelines.cache", *BINDERS)]


def test_enable_after_import_rebinds_every_module_and_disable_restores(fake_llmcompressor):
    stock = bound_classes(fake_llmcompressor)
    assert len(set(stock)) == 1
    switch = integration.enable(host_bytes="1MiB")
    assert bound_classes(fake_llmcompressor) == [switch.cache_class] * 3
    assert issubclass(switch.cache_class, SpillcacheIntermediatesCache)
    integration.disable()
    assert bound_classes(fake_llmcompressor) == stock
    assert integration.active() is None


def test_enable_before_import_rebinds_modules_imported_later(fake_llmcompressor):
    assert fake_llmcompressor.package not in sys.modules
    with integration.enable(host_bytes="1MiB") as switch:
        assert bound_classes(fake_llmcompressor) == [switch.cache_class] * 3
    # Modules first imported while enabled get the stock class back too.
    restored = bound_classes(fake_llmcompressor)
    assert len(set(restored)) == 1
    assert not issubclass(restored[0], SpillcacheIntermediatesCache)
    assert integration._FINDER not in sys.meta_path


def test_the_hooked_module_keeps_its_source(fake_llmcompressor):
    with integration.enable():
        module = fake_llmcompressor("pipelines.cache")
        assert module.__loader__.get_source(module.__name__) == STOCK


def test_caches_built_through_the_switch_use_its_config_and_count(fake_llmcompressor, tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path / "spill"))
    with integration.enable(config) as switch:
        cache_class = fake_llmcompressor("pipelines.sequential.pipeline").IntermediatesCache
        collected = cache_class(None, offload_device=None)  # as AWQ builds them: never closed
        collected.append({"hidden": torch.arange(64.0)})
        closed = cache_class.empty(1, "cpu")
        closed.update(0, {"hidden": torch.arange(32.0)})
        assert closed.config is config
        collected.flush()  # close() drops writes still queued (the store goes anyway)
        closed.flush()
        assert switch.stats()["open"] == 2
        closed.close()
        del collected
        totals = switch.stats()
    assert totals["caches"] == 2 and totals["open"] == 0
    assert totals["disk"]["bytes_written"] == (64 + 32) * 4, totals
    assert list((tmp_path / "spill").iterdir()) == []


def test_config_given_as_a_toml_path(fake_llmcompressor, tmp_path):
    path = tmp_path / "spill.toml"
    path.write_text('host_bytes = "3MiB"\n')
    with integration.enable(path, prefetch_depth=3) as switch:
        cache = fake_llmcompressor("pipelines.cache").IntermediatesCache.empty(1, "cpu")
        assert (cache.config.host_bytes, cache.config.prefetch_depth) == (3 * 2**20, 3)
        cache.close()
    assert switch.config.prefetch_depth == 3


def test_without_config_each_cache_reads_the_environment(fake_llmcompressor, monkeypatch):
    with integration.enable():
        monkeypatch.setenv("SPILLCACHE_HOST_BYTES", "5MiB")
        cache = fake_llmcompressor("pipelines.cache").IntermediatesCache.empty(1, "cpu")
        assert cache.config.host_bytes == 5 * 2**20
        cache.close()


def test_enabling_twice_is_refused_and_leaves_the_first_in_force(fake_llmcompressor):
    first = integration.enable(host_bytes="1MiB")
    with pytest.raises(IntegrationError, match=r"already enabled.*disable\(\)"):
        integration.enable(host_bytes="2MiB")
    assert integration.active() is first
    assert fake_llmcompressor("pipelines.cache").IntermediatesCache is first.cache_class


def test_invalid_config_switches_nothing(fake_llmcompressor):
    stock = bound_classes(fake_llmcompressor)
    with pytest.raises(ConfigError):
        integration.enable(host_bytes="lots")
    with pytest.raises(TypeError, match="CacheConfig or the path of a TOML file"):
        integration.enable({"host_bytes": 1})
    assert integration.active() is None
    assert bound_classes(fake_llmcompressor) == stock


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setattr(integration, "PACKAGE", "no_such_llmcompressor_package")
    with pytest.raises(IntegrationError, match=r"not installed.*spillcache\[llmcompressor\]"):
        integration.enable()
    assert integration.active() is None


def test_a_version_without_the_class_is_refused_at_enable(fake_llmcompressor):
    (fake_llmcompressor.root / "pipelines" / "cache.py").write_text("# moved elsewhere\n")
    fake_llmcompressor("pipelines.cache")
    with pytest.raises(IntegrationError, match=r"0\.0-stand-in has no IntermediatesCache"):
        integration.enable()
    assert integration.active() is None


def test_a_version_without_the_class_only_warns_when_imported_later(fake_llmcompressor):
    (fake_llmcompressor.root / "pipelines" / "cache.py").write_text("# moved elsewhere\n")
    with integration.enable():
        with pytest.warns(UserWarning, match="keeps its own cache"):
            module = fake_llmcompressor("pipelines.cache")
    assert not hasattr(module, "IntermediatesCache")


def test_switch_disable_is_idempotent_and_spares_a_later_switch(fake_llmcompressor):
    first = integration.enable()
    first.disable()
    first.disable()
    second = integration.enable()
    first.disable()  # no longer in force: must not switch the second one off
    assert integration.active() is second
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        integration.disable()
        integration.disable()
    assert integration.active() is None


def test_a_cache_closed_then_collected_counts_once(fake_llmcompressor, tmp_path):
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    with integration.enable(config) as switch:
        cache = fake_llmcompressor("pipelines.cache").IntermediatesCache.empty(1, "cpu")
        cache.update(0, {"hidden": torch.arange(16.0)})
        cache.flush()
        cache.close()
        del cache
        gc.collect()
        totals = switch.stats()
    assert (totals["caches"], totals["open"]) == (1, 0)
    assert totals["disk"]["bytes_written"] == 16 * 4


def test_stats_survives_a_collection_that_closes_a_cache_inside_it(
    fake_llmcompressor, tmp_path, monkeypatch
):
    """The collector may run a cache's finalizer on the thread that is inside stats()."""
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=str(tmp_path))
    switch = integration.enable(config)
    cache = fake_llmcompressor("pipelines.cache").IntermediatesCache.empty(1, "cpu")
    cache.update(0, {"hidden": torch.arange(8.0)})
    cache.flush()
    cache.cycle = cache  # only the cyclic collector frees it
    del cache
    copy_totals = integration._copy_totals

    def collect_then_copy(totals):
        gc.collect()  # the finalizer runs here, with the switch's lock held
        return copy_totals(totals)

    monkeypatch.setattr(integration, "_copy_totals", collect_then_copy)
    results = []
    thread = threading.Thread(target=lambda: results.append(switch.stats()), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "stats() deadlocked on a finalizer"
    assert results[0]["open"] == 0
    monkeypatch.setattr(integration, "_copy_totals", copy_totals)
    assert switch.stats()["disk"]["bytes_written"] == 8 * 4  # settled by the next call


def test_enable_waits_for_another_thread_importing_the_cache_module(
    fake_llmcompressor, monkeypatch
):
    gate_module = f"{fake_llmcompressor.package}_gate"
    gate = types.ModuleType(gate_module)
    gate.importing, gate.release = threading.Event(), threading.Event()
    monkeypatch.setitem(sys.modules, gate_module, gate)
    (fake_llmcompressor.root / "pipelines" / "cache.py").write_text(
        f"import {gate_module} as gate\ngate.importing.set()\ngate.release.wait()\n" + STOCK
    )
    importer = threading.Thread(target=fake_llmcompressor, args=("pipelines.cache",))
    importer.start()
    assert gate.importing.wait(timeout=60)
    # enable() must wait for that import; release it once enable() is about to wait.
    real_import_module = importlib.import_module

    def import_module(name, *args):
        gate.release.set()
        return real_import_module(name, *args)

    monkeypatch.setattr(integration.importlib, "import_module", import_module)
    switch = integration.enable()
    importer.join(timeout=60)
    assert gate.release.is_set(), "enable() did not notice the import in progress"
    assert fake_llmcompressor("pipelines.cache").IntermediatesCache is switch.cache_class


def test_another_finder_that_asks_every_finder_does_not_recurse(fake_llmcompressor):
    class AskingFinder:
        def find_spec(self, fullname, path, target=None):
            for finder in list(sys.meta_path):
                if finder is not self and hasattr(finder, "find_spec"):
                    spec = finder.find_spec(fullname, path, target)
                    if spec is not None:
                        return spec
            return None

    with integration.enable() as switch:
        other = AskingFinder()
        sys.meta_path.insert(0, other)
        try:
            module = fake_llmcompressor("pipelines.cache")
        finally:
            sys.meta_path.remove(other)
        assert module.IntermediatesCache is switch.cache_class


def test_a_replaced_class_is_refused_and_nothing_is_switched(fake_llmcompressor):
    stock = fake_llmcompressor("pipelines.sequential.pipeline").IntermediatesCache
    fake_llmcompressor("pipelines.cache").IntermediatesCache = type("IntermediatesCache", (), {})
    with pytest.raises(IntegrationError, match="another tool has replaced it"):
        integration.enable()
    assert integration.active() is None
    assert integration._FINDER not in sys.meta_path
    assert fake_llmcompressor("pipelines.sequential.pipeline").IntermediatesCache is stock


def test_a_reloaded_cache_module_is_still_switched_everywhere(fake_llmcompressor):
    stock_modules = bound_classes(fake_llmcompressor)
    importlib.reload(fake_llmcompressor("pipelines.cache"))  # a new stock class object
    assert fake_llmcompressor("pipelines.cache").IntermediatesCache is not stock_modules[0]
    with integration.enable() as switch:
        assert bound_classes(fake_llmcompressor) == [switch.cache_class] * 3
    restored = bound_classes(fake_llmcompressor)
    assert not any(issubclass(cls, SpillcacheIntermediatesCache) for cls in restored)


def test_entries_of_sys_modules_that_are_not_modules_are_skipped(fake_llmcompressor, monkeypatch):
    fake_llmcompressor("pipelines.cache")
    monkeypatch.setitem(sys.modules, f"{fake_llmcompressor.package}.placeholder", None)
    monkeypatch.setitem(sys.modules, f"{fake_llmcompressor.package}.odd", 42)
    with integration.enable() as switch:
        assert fake_llmcompressor("pipelines.cache").IntermediatesCache is switch.cache_class
