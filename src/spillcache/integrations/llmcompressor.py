"""Switch llm-compressor's pipelines over to spillcache's ``IntermediatesCache``.

llm-compressor binds its ``IntermediatesCache`` by name in several modules: its cache
module, the sequential pipeline and the AWQ modifier (0.14). :func:`enable` rebinds
that name, in every llm-compressor module already imported, to a spillcache class
carrying the given config. So that it also works when llm-compressor is imported after
the call, it hooks the import of the cache module: every module imported later takes
the name from there. :func:`disable`, or leaving the ``with`` block, puts the stock
class back in every module, those imported in between included::

    from spillcache.integrations.llmcompressor import enable

    enable(host_bytes="16GiB", disk_path="/nvme/spill")   # for the rest of the process
    with enable(CacheConfig.from_file("spill.toml")):     # or only inside the block
        oneshot(model=..., pipeline="sequential", ...)

Nothing here imports llm-compressor: it is an optional extra
(``pip install 'spillcache[llmcompressor]'``).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import threading
import warnings
import weakref
from types import ModuleType
from typing import Any

from ..cache import IntermediatesCache as SpillcacheIntermediatesCache
from ..config import CacheConfig
from ..core import CacheCore
from ..errors import IntegrationError

__all__ = ["CacheSwitch", "active", "disable", "enable"]

PACKAGE = "llmcompressor"
CACHE_MODULE = "llmcompressor.pipelines.cache"
CLASS_NAME = "IntermediatesCache"

_TIERS = ("device", "host", "disk")
_TIER_COUNTERS = ("hits", "misses", "bytes_read", "bytes_written", "evictions")

# Reentrant: rebinding runs inside an import, and an import may happen while enable()
# or disable() hold the lock (a module's attribute read can import lazily).
_lock = threading.RLock()
_active: CacheSwitch | None = None  # guarded by _lock
_stock_class: type | None = None  # llm-compressor's own class, once seen; guarded by _lock


def enable(
    config: CacheConfig | str | os.PathLike[str] | None = None, **fields: Any
) -> CacheSwitch:
    """Make llm-compressor build spillcache caches until :func:`disable` is called.

    :param config: a :class:`CacheConfig`, or the path of a TOML config file. None:
        each cache reads ``CacheConfig.from_env()`` when it is built (the defaults, or
        ``SPILLCACHE_*`` variables).
    :param fields: config fields to override, e.g. ``host_bytes="16GiB"``.
    :returns: a :class:`CacheSwitch`; use it as a context manager to switch back on exit.
    :raises IntegrationError: llm-compressor is not installed, its cache module has no
        ``IntermediatesCache``, or spillcache is already enabled.
    :raises ConfigError: a config field or file is invalid (nothing is switched).
    """
    global _active
    resolved = _resolve_config(config, fields)
    if importlib.util.find_spec(PACKAGE) is None:
        raise IntegrationError(
            f"llm-compressor is not installed (no '{PACKAGE}' package); install it with "
            "pip install 'spillcache[llmcompressor]'"
        )
    with _lock:
        if _active is not None:
            raise IntegrationError(
                "spillcache is already enabled for llm-compressor; call disable() (or leave "
                "the `with enable(...)` block) before enabling it again with another config"
            )
        switch = CacheSwitch(resolved)
        cache_module = sys.modules.get(CACHE_MODULE)
        if cache_module is not None:
            _remember_stock_class(cache_module, during_import=False)
        _active = switch
        _rebind_everywhere(_stock_class, switch.cache_class)
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
    return switch


def disable() -> None:
    """Put llm-compressor's own class back everywhere. Does nothing when not enabled."""
    global _active
    with _lock:
        if _active is None:
            return
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        _rebind_everywhere(_active.cache_class, _stock_class)
        _active = None


def active() -> CacheSwitch | None:
    """The switch in force, or None when llm-compressor uses its own cache."""
    with _lock:
        return _active


class CacheSwitch:
    """What :func:`enable` returns: the class llm-compressor now builds, the totals of
    the caches it built, and the way back (:meth:`disable`, or the ``with`` block)."""

    def __init__(self, config: CacheConfig | None) -> None:
        self.config = config
        self.cache_class = _bind(config, self)
        self._lock = threading.Lock()
        self._caches_built = 0  # the counters below are guarded by _lock
        self._open_cores: set[CacheCore] = set()
        self._closed_totals = _zero_totals()

    def disable(self) -> None:
        """Switch back to llm-compressor's own cache (if this switch is still in force)."""
        with _lock:
            if _active is self:
                disable()

    def __enter__(self) -> CacheSwitch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.disable()

    def stats(self) -> dict[str, Any]:
        """Totals over every cache built through this switch: ``caches`` built, those
        still ``open``, per tier the hits, misses, bytes read and written and evictions,
        and ``stall_seconds``. A cache counts from the moment it is built; llm-compressor
        never closes its caches, so one is closed when it is garbage-collected."""
        with self._lock:
            totals = _copy_totals(self._closed_totals)
            open_cores = list(self._open_cores)
            built = self._caches_built
        for core in open_cores:  # outside our lock: a core's stats take the core's lock
            _add_stats(totals, core.stats())
        return {"caches": built, "open": len(open_cores), **totals}

    def _track(self, cache: SpillcacheIntermediatesCache, core: CacheCore) -> None:
        with self._lock:
            self._caches_built += 1
            self._open_cores.add(core)
        # llm-compressor never calls close(): the figures are taken when it collects them.
        weakref.finalize(cache, self._closed, core)

    def _closed(self, core: CacheCore) -> None:
        core.close()  # idempotent: the figures below are final only once it is closed
        figures = core.stats()
        with self._lock:
            if core in self._open_cores:
                self._open_cores.discard(core)
                _add_stats(self._closed_totals, figures)

    def __repr__(self) -> str:
        state = "enabled" if active() is self else "disabled"
        return f"CacheSwitch({state}, config={self.config!r})"


# ------------------------------------------------------------------ binding


def _resolve_config(
    config: CacheConfig | str | os.PathLike[str] | None, fields: dict[str, Any]
) -> CacheConfig | None:
    if isinstance(config, (str, os.PathLike)):
        config = CacheConfig.from_file(config)
    elif config is not None and not isinstance(config, CacheConfig):
        raise TypeError(
            f"config must be a CacheConfig or the path of a TOML file, got "
            f"{type(config).__name__}; or pass fields, e.g. enable(host_bytes='16GiB')"
        )
    if fields:
        config = (config or CacheConfig.from_env()).replace(**fields)
    return config


def _bind(config: CacheConfig | None, switch: CacheSwitch) -> type[SpillcacheIntermediatesCache]:
    """A spillcache cache class whose caches use ``config`` and report to ``switch``:
    llm-compressor builds its caches without a config, so the class must carry it."""

    class IntermediatesCache(SpillcacheIntermediatesCache):
        __doc__ = SpillcacheIntermediatesCache.__doc__
        default_config = config

        def _start(self, core: CacheCore) -> None:
            super()._start(core)
            switch._track(self, core)

        def close(self) -> None:
            super().close()
            switch._closed(self._core)

    IntermediatesCache.__qualname__ = "IntermediatesCache"
    return IntermediatesCache


def _remember_stock_class(cache_module: ModuleType, *, during_import: bool) -> None:
    global _stock_class
    found = vars(cache_module).get(CLASS_NAME)
    if isinstance(found, type) and not issubclass(found, SpillcacheIntermediatesCache):
        _stock_class = found
        return
    if found is None:
        version = getattr(sys.modules.get(PACKAGE), "__version__", "unknown")
        message = (
            f"llm-compressor {version} has no {CLASS_NAME} in {CACHE_MODULE}; spillcache "
            "supports versions that have it (tested with 0.14)"
        )
        if during_import:  # raising would break the user's import of llm-compressor
            warnings.warn(message + "; llm-compressor keeps its own cache", stacklevel=3)
            return
        raise IntegrationError(message)


def _rebind_everywhere(old: type | None, new: type | None) -> None:
    """Replace ``old`` by ``new`` wherever an imported llm-compressor module binds it."""
    if old is None or new is None:
        return
    for name, module in list(sys.modules.items()):
        if module is None or not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        namespace = vars(module)  # not getattr: a module __getattr__ could import things
        if namespace.get(CLASS_NAME) is old:
            namespace[CLASS_NAME] = new


def _rebind_after_import(cache_module: ModuleType) -> None:
    with _lock:
        if _active is None:
            return
        _remember_stock_class(cache_module, during_import=True)
        if vars(cache_module).get(CLASS_NAME) is _stock_class and _stock_class is not None:
            vars(cache_module)[CLASS_NAME] = _active.cache_class


class _RebindingLoader(importlib.abc.Loader):
    """Runs the real loader, then rebinds the class in the freshly executed module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _rebind_after_import(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_resource_reader, ...
        return getattr(self._loader, name)


class _CacheModuleFinder(importlib.abc.MetaPathFinder):
    """Finds llm-compressor's cache module with the other finders and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != CACHE_MODULE:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RebindingLoader(spec.loader)
                return spec
        return None


_FINDER = _CacheModuleFinder()


# ------------------------------------------------------------------- totals


def _zero_totals() -> dict[str, Any]:
    return {
        **{tier: dict.fromkeys(_TIER_COUNTERS, 0) for tier in _TIERS},
        "stall_seconds": 0.0,
    }


def _copy_totals(totals: dict[str, Any]) -> dict[str, Any]:
    return {
        **{tier: dict(totals[tier]) for tier in _TIERS},
        "stall_seconds": totals["stall_seconds"],
    }


def _add_stats(totals: dict[str, Any], figures: dict[str, Any]) -> None:
    for tier in _TIERS:
        for counter in _TIER_COUNTERS:
            totals[tier][counter] += figures[tier][counter]
    totals["stall_seconds"] += figures["stall_seconds"]
