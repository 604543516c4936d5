"""The public surface is exactly what __all__ says, the tree shows it (everything else
lives in spillcache._internal), and the error tree is as drawn."""

from __future__ import annotations

import builtins
import importlib
import inspect
import pkgutil

import spillcache
from spillcache import errors

PUBLIC = {
    "CacheClosedError",
    "CacheConfig",
    "CapacityError",
    "CheckpointError",
    "ConfigError",
    "DiskFullError",
    "IntegrationError",
    "IntermediateValue",
    "IntermediatesCache",
    "OverrideEqMode",
    "SpillCacheError",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreNotFoundError",
}


def test_all_is_the_public_surface():
    assert set(spillcache.__all__) == PUBLIC
    for name in PUBLIC:
        assert getattr(spillcache, name) is not None


# What users import, and nothing else outside spillcache._internal.
PUBLIC_MODULES = {
    "spillcache": PUBLIC,
    "spillcache.cache": {"IntermediatesCache"},
    "spillcache.config": {"AUTO", "CacheConfig", "parse_size"},
    "spillcache.errors": {n for n in PUBLIC if n.endswith("Error")},
    "spillcache.cli": {"main"},
    "spillcache.integrations": set(),
    "spillcache.integrations.llmcompressor": {"CacheSwitch", "active", "disable", "enable"},
}


def test_the_tree_shows_the_public_surface():
    found = {info.name for info in pkgutil.walk_packages(spillcache.__path__, "spillcache.")}
    outside = {name for name in found if not name.startswith("spillcache._internal")}
    assert outside == set(PUBLIC_MODULES) - {"spillcache"} | {"spillcache.__main__"}
    assert "spillcache._internal.runtime.core" in found  # the walk sees the internals too


def test_every_public_module_exports_exactly_what_it_defines():
    for name, exported in PUBLIC_MODULES.items():
        module = importlib.import_module(name)
        assert set(module.__all__) == exported, name
        for attribute in module.__all__:
            assert hasattr(module, attribute), f"{name}.{attribute}"
        defined_here = {
            attribute
            for attribute, value in vars(module).items()
            if not attribute.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and value.__module__ == name
        }
        assert defined_here <= exported, f"{name} defines public {defined_here - exported}"


def test_errors_subclass_what_callers_already_catch():
    expected = {
        "ConfigError": ValueError,
        "CapacityError": MemoryError,
        "CacheClosedError": RuntimeError,
        "IntegrationError": RuntimeError,
        "CheckpointError": errors.IntegrationError,
        "StoreError": OSError,
        "DiskFullError": errors.StoreError,
        "StoreNotFoundError": FileNotFoundError,
        "StoreFormatError": errors.StoreError,
        "StoreCorruptError": errors.StoreError,
    }
    for name, parent in expected.items():
        cls = getattr(errors, name)
        assert issubclass(cls, errors.SpillCacheError) and issubclass(cls, parent), name
    assert set(errors.__all__) == {n for n in PUBLIC if n.endswith("Error")}
    assert not any(getattr(builtins, n, None) for n in errors.__all__)


def test_override_eq_mode_compares_identity():
    import torch

    a, b = torch.tensor([1, 2, 3]), torch.tensor([1, 2, 3])
    with spillcache.OverrideEqMode():
        assert bool(a == a) is True
        assert bool(a == b) is False
        assert a in [b, a]


def test_no_module_shadows_a_standard_library_module():
    """A module named io.py or format.py reads as the stdlib's (or a builtin) to
    everyone but its author; ruff checks names inside modules, this the modules."""
    import sys
    from pathlib import Path

    root = Path(spillcache.__file__).parent
    stems = {path.stem for path in root.rglob("*.py")} - {"__init__", "__main__"}
    assert "core" in stems  # the walk sees the internals
    assert not stems & set(sys.stdlib_module_names), stems & set(sys.stdlib_module_names)
    assert not stems & set(dir(builtins))
