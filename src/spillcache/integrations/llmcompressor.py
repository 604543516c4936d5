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
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from spillcache._internal.engine.tenants import TIER_COUNTERS, TIERS
from spillcache._internal.llmcompressor.resumable_pipeline import PIPELINE_MODULE, hook_checkpoints
from spillcache._internal.llmcompressor.run_watch import RunWatch, hook_pipeline, watch_options
from spillcache._internal.runtime.core import CacheCore
from spillcache.cache import IntermediatesCache as SpillcacheIntermediatesCache
from spillcache.config import CacheConfig
from spillcache.errors import IntegrationError

__all__ = ["CacheSwitch", "active", "disable", "enable"]

PACKAGE = "llmcompressor"
CACHE_MODULE = "llmcompressor.pipelines.cache"
CLASS_NAME = "IntermediatesCache"
CHECKPOINT_DIR_VARIABLE = "SPILLCACHE_CHECKPOINT_DIR"

# Reentrant: rebinding runs inside an import, and an import may happen while enable()
# or disable() hold the lock (a module's attribute read can import lazily).
_lock = threading.RLock()
_active: CacheSwitch | None = None  # guarded by _lock
_stock_class: type | None = None  # llm-compressor's own class, once seen; guarded by _lock


def enable(
    config: CacheConfig | str | os.PathLike[str] | None = None,
    *,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: bool | None = None,
    metrics_path: str | os.PathLike[str] | None = None,
    **fields: Any,
) -> CacheSwitch:
    """Make llm-compressor build spillcache caches until :func:`disable` is called.

    :param config: a :class:`CacheConfig`, or the path of a TOML config file. None:
        each cache reads ``CacheConfig.from_env()`` when it is built (the defaults, or
        ``SPILLCACHE_*`` variables).
    :param checkpoint_dir: where the sequential pipeline checkpoints after every
        subgraph, and where a rerun of the same calibration resumes from
        (``resumable_pipeline.py``). None: ``SPILLCACHE_CHECKPOINT_DIR`` if set, else no
        checkpoints. The independent pipeline (oneshot's default) with more than one
        modifier that calibrates is refused: pass ``pipeline="sequential"``.
    :param progress: print a line per subgraph of the sequential pipeline on stderr
        (where the caches spill at the start, a summary at the end; docs/watching.md).
        None: ``SPILLCACHE_PROGRESS`` (``0``, ``false``, ``no`` or ``off`` turn it off),
        else on.
    :param metrics_path: a file to append one JSON line to per subgraph and one at the
        end (``spillcache report`` reads it). None: ``SPILLCACHE_METRICS_PATH`` if set,
        else no file.
    :param fields: config fields to override, e.g. ``host_bytes="16GiB"``.
    :returns: a :class:`CacheSwitch`; use it as a context manager to switch back on exit.
    :raises IntegrationError: llm-compressor is not installed, its cache module has no
        ``IntermediatesCache`` (or another tool replaced it), or spillcache is already
        enabled. Nothing is switched then.
    :raises ConfigError: a config field or file is invalid (nothing is switched).
    """
    global _active
    resolved = _resolve_config(config, fields)
    watch_setting = watch_options(progress, metrics_path)
    if checkpoint_dir is None:
        checkpoint_dir = os.environ.get(CHECKPOINT_DIR_VARIABLE) or None
    if importlib.util.find_spec(PACKAGE) is None:
        raise IntegrationError(
            f"llm-compressor is not installed (no '{PACKAGE}' package); install it with "
            "pip install 'spillcache[llmcompressor]'"
        )
    if checkpoint_dir is not None:  # imported before the lock: it imports the cache module
        importlib.import_module(PIPELINE_MODULE)
    _wait_for_an_import_in_progress()
    with _lock:
        if _active is not None:
            raise IntegrationError(
                "spillcache is already enabled for llm-compressor; call disable() (or leave "
                "the `with enable(...)` block) before enabling it again with another config"
            )
        switch = CacheSwitch(resolved)
        switch.watch = RunWatch(switch, **watch_setting) if any(watch_setting.values()) else None
        cache_module = sys.modules.get(CACHE_MODULE)
        if checkpoint_dir is not None:
            switch.checkpoint_dir = Path(checkpoint_dir)
        if cache_module is not None:
            _remember_stock_class(cache_module, during_import=False)
        replaced = _rebind_everywhere(_is_stock, switch.cache_class)
        try:
            if cache_module is not None:
                _check_bound(cache_module, switch.cache_class)
        except BaseException:
            for namespace, old in replaced:  # nothing half-switched
                namespace[CLASS_NAME] = old
            raise
        if _FINDER not in sys.meta_path:
            sys.meta_path.insert(0, _FINDER)
        if switch.checkpoint_dir is not None:
            switch._unhook_checkpoints = hook_checkpoints(
                switch.checkpoint_dir, lambda config: _bind(config, switch), switch.config
            )
        _active = switch
    return switch


def disable() -> None:
    """Put llm-compressor's own class back everywhere. Does nothing when not enabled."""
    global _active
    with _lock:
        if _active is not None:
            _switch_back()
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
        self.checkpoint_dir: Path | None = None
        self._unhook_checkpoints: Callable[[], None] | None = None  # guarded by the module's _lock
        self.watch: RunWatch | None = None  # progress lines and metrics (run_watch.py)
        self._unhook: Callable[[], None] | None = None  # guarded by the module's _lock
        self.cache_class = _bind(config, self)
        self._lock = threading.Lock()
        self._caches_built = 0  # this, _open and _closed_totals are guarded by _lock
        self._open: dict[int, weakref.ref[CacheCore]] = {}
        self._closed_totals = _zero_totals()
        # A cache's figures arrive from its finalizer, which runs wherever the garbage
        # collector does: possibly on a thread inside stats() holding _lock. So the
        # finalizer only queues them (SimpleQueue.put is reentrant); lock holders settle.
        self._closed_figures: queue.SimpleQueue[tuple[int, dict[str, Any]]] = queue.SimpleQueue()

    def disable(self) -> None:
        """Switch back to llm-compressor's own cache (if this switch is still in force)."""
        with _lock:
            if _active is self:
                disable()

    def __enter__(self) -> CacheSwitch:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.watch is not None and exc_info[1] is not None:  # the run's end record says why
            self.watch.safely(self.watch.finish, exc_info[1])
        self.disable()

    def stats(self) -> dict[str, Any]:
        """Totals over every cache built through this switch: ``caches`` built, those
        still ``open``, per tier the hits, misses, bytes read and written and evictions,
        and ``stall_seconds``. A cache counts from the moment it is built; llm-compressor
        never closes its caches, so one is closed when it is garbage-collected."""
        totals, open_figures, built = self._closed_totals_and_open_figures()
        for _, figures in open_figures:
            _add_stats(totals, figures)
        return {"caches": built, "open": len(open_figures), **totals}

    def _closed_totals_and_open_figures(
        self,
    ) -> tuple[dict[str, Any], list[tuple[CacheCore, dict[str, Any]]], int]:
        """The closed caches' totals, each open cache with its ``stats()``, and how many
        caches were built."""
        with self._lock:
            self._settle_closed()
            totals = _copy_totals(self._closed_totals)
            open_cores = [core for ref in self._open.values() if (core := ref()) is not None]
            built = self._caches_built
        # Outside our lock: a core's stats take the core's lock.
        return totals, [(core, core.stats()) for core in open_cores], built

    def _track(self, core: CacheCore) -> int:
        """Count a new cache's core; the token its close reports with."""
        with self._lock:
            self._settle_closed()
            self._caches_built += 1
            token = self._caches_built
            # Weak: a closed cache's core (and its tensors) must not wait for stats().
            self._open[token] = weakref.ref(core)
        return token

    def figures(self, *, reset_peak: bool = False) -> dict[str, Any]:
        """What a run's progress line reports: the caches' disk traffic and stall so
        far, what they hold now, and the most their values took since the last
        ``reset_peak`` (run_watch.py)."""
        totals, open_figures, _ = self._closed_totals_and_open_figures()
        held = dict.fromkeys(("host_bytes", "device_bytes", "disk_bytes", "values_bytes"), 0)
        held |= {"values_peak_bytes": 0, "host_tier_budget_bytes": 0, "host_peak_bytes": 0}
        for core, figures in open_figures:
            _add_stats(totals, figures)
            for tier in TIERS:
                held[f"{tier}_bytes"] += figures[tier]["bytes"]
            values, peak = core.values_held(reset_peak=reset_peak)
            held["values_bytes"] += values
            # Caches' peaks need not coincide: their sum bounds the run's from above.
            held["values_peak_bytes"] += peak
            pool = figures["pool"]["host"]  # a pool's figures: the same for its caches
            held["host_tier_budget_bytes"] = max(held["host_tier_budget_bytes"], pool["budget"])
            held["host_peak_bytes"] = max(held["host_peak_bytes"], pool["peak_bytes"])
        return {
            "disk_written_bytes": totals["disk"]["bytes_written"],
            "disk_read_bytes": totals["disk"]["bytes_read"],
            "stall_seconds": totals["stall_seconds"],
            **held,
        }

    def _watch_run(self, core: CacheCore) -> None:
        """A cache was built: the pipeline's passes are watched from now on, and a run
        starts if none is running."""
        if self.watch is None:
            return
        with _lock:
            module = sys.modules.get(PIPELINE_MODULE)
            if self._unhook is None and module is not None and _active is self:
                self._unhook = hook_pipeline(module, self.watch)
        self.watch.safely(self.watch.cache_built, core)

    def _closed(self, token: int, core: CacheCore) -> None:
        core.close()  # idempotent: the figures are final only once it is closed
        self._closed_figures.put((token, core.stats()))

    def _settle_closed(self) -> None:
        """_lock held: move the figures of closed caches into the totals."""
        while True:
            try:
                token, figures = self._closed_figures.get_nowait()
            except queue.Empty:
                return
            if self._open.pop(token, None) is not None:
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
        spillcache_switch = switch

        def _start(self, core: CacheCore) -> None:
            super()._start(core)
            token = switch._track(core)
            switch._watch_run(core)
            # llm-compressor never calls close(): then the garbage collector reports.
            self._report_close = weakref.finalize(self, switch._closed, token, core)

        def close(self) -> None:
            super().close()
            self._report_close()  # runs once: the collector will not report again

    IntermediatesCache.__qualname__ = "IntermediatesCache"
    return IntermediatesCache


def _is_stock(value: object) -> bool:
    """llm-compressor's own class, also after its module was reloaded."""
    return (
        isinstance(value, type)
        and not issubclass(value, SpillcacheIntermediatesCache)
        and value.__module__ == CACHE_MODULE
        and value.__qualname__ == CLASS_NAME
    )


def _is_switched(value: object) -> bool:
    return isinstance(value, type) and getattr(value, "spillcache_switch", None) is not None


def _remember_stock_class(cache_module: ModuleType, *, during_import: bool) -> None:
    global _stock_class
    found = vars(cache_module).get(CLASS_NAME)
    if _is_stock(found):
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


def _check_bound(cache_module: ModuleType, cache_class: type) -> None:
    found = vars(cache_module).get(CLASS_NAME)
    if found is not cache_class:
        raise IntegrationError(
            f"{CACHE_MODULE}.{CLASS_NAME} is {found!r}, not llm-compressor's own class: "
            "another tool has replaced it; undo that before enabling spillcache"
        )


def _rebind_everywhere(
    replace: Callable[[object], bool], new: type
) -> list[tuple[dict[str, Any], object]]:
    """Bind ``new`` wherever an imported llm-compressor module binds a class ``replace``
    accepts; the (namespace, old class) pairs it changed."""
    replaced = []
    for name, module in list(sys.modules.items()):
        if not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        # Not getattr: a module __getattr__ could import things. Some entries are no modules.
        namespace = getattr(module, "__dict__", None)
        if isinstance(namespace, dict) and replace(old := namespace.get(CLASS_NAME)):
            namespace[CLASS_NAME] = new
            replaced.append((namespace, old))
    return replaced


def _switch_back() -> None:
    """_lock held: the stock class everywhere a switch's class is bound; no import hook;
    llm-compressor's own sequential pipeline back."""
    if _active is not None and _active._unhook_checkpoints is not None:
        _active._unhook_checkpoints()
        _active._unhook_checkpoints = None
    if _active is not None and _active._unhook is not None:
        _active._unhook()
        _active._unhook = None
    if _active is not None and _active.watch is not None:
        _active.watch.safely(_active.watch.finish, "spillcache was disabled before it ended")
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    cache_module = sys.modules.get(CACHE_MODULE)
    current = vars(cache_module).get(CLASS_NAME) if cache_module is not None else None
    stock = current if _is_stock(current) else _stock_class
    if stock is not None:
        _rebind_everywhere(_is_switched, stock)


def _wait_for_an_import_in_progress() -> None:
    """If another thread is importing the cache module, let it finish first (outside
    _lock: that import takes _lock when it rebinds), so its class can be rebound."""
    module = sys.modules.get(CACHE_MODULE)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False):
        importlib.import_module(CACHE_MODULE)  # blocks on the module's import lock


def _rebind_after_import(cache_module: ModuleType) -> None:
    with _lock:
        if _active is None:
            return
        _remember_stock_class(cache_module, during_import=True)
        if _is_stock(vars(cache_module).get(CLASS_NAME)):
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

    def __init__(self) -> None:
        # Set while this thread asks the other finders: one of them may ask every
        # finder in turn too (as this one does), which would ask this one again.
        self._asking = threading.local()

    def find_spec(
        self, fullname: str, path: Any, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != CACHE_MODULE or getattr(self._asking, "active", False):
            return None
        self._asking.active = True
        try:
            for finder in list(sys.meta_path):
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and not isinstance(spec.loader, _RebindingLoader):
                        spec.loader = _RebindingLoader(spec.loader)
                    return spec
            return None
        finally:
            self._asking.active = False


_FINDER = _CacheModuleFinder()


# ------------------------------------------------------------------- totals


def _zero_totals() -> dict[str, Any]:
    return {
        **{tier: dict.fromkeys(TIER_COUNTERS, 0) for tier in TIERS},
        "stall_seconds": 0.0,
    }


def _copy_totals(totals: dict[str, Any]) -> dict[str, Any]:
    return {
        **{tier: dict(totals[tier]) for tier in TIERS},
        "stall_seconds": totals["stall_seconds"],
    }


def _add_stats(totals: dict[str, Any], figures: dict[str, Any]) -> None:
    for tier in TIERS:
        for counter in TIER_COUNTERS:
            totals[tier][counter] += figures[tier][counter]
    totals["stall_seconds"] += figures["stall_seconds"]
