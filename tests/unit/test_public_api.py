"""The public surface is exactly what __all__ says, and the error tree is as drawn."""

from __future__ import annotations

import builtins

import spillcache
from spillcache import errors

PUBLIC = {
    "CacheClosedError",
    "CacheConfig",
    "CapacityError",
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


def test_errors_subclass_what_callers_already_catch():
    expected = {
        "ConfigError": ValueError,
        "CapacityError": MemoryError,
        "CacheClosedError": RuntimeError,
        "IntegrationError": RuntimeError,
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
