"""CacheConfig: every knob of a cache, parsed and validated once.

Sizes are given as ints (bytes) or strings with a unit ("512MiB", "8GiB", "1.5GB");
they are normalised to int bytes when the config is built, so the rest of the
package only ever sees ints (or the sentinels documented per field).
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import functools
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from spillcache._internal.engine.tiers import POLICIES
from spillcache._internal.text import did_you_mean
from spillcache.errors import ConfigError

__all__ = ["AUTO", "CacheConfig", "parse_size"]

AUTO = "auto"
EVICTION_POLICIES = tuple(POLICIES)
READ_MODES = ("copy", "mmap")
BUDGET_SCOPES = ("node", "rank")
ENV_PREFIX = "SPILLCACHE_"
ENV_CONFIG_FILE = "SPILLCACHE_CONFIG"
# SPILLCACHE_ variables that are not config fields: read elsewhere (the llm-compressor
# integration's enable(): checkpoint_dir, progress, metrics_path), so a cache reading
# its environment passes over them rather than refusing them as unknown.
OTHER_VARIABLES = (
    "SPILLCACHE_CHECKPOINT_DIR",
    "SPILLCACHE_PROGRESS",
    "SPILLCACHE_METRICS_PATH",
)

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_MAX_SIZE = 2**63 - 1
_SIZE_HELP = "an int of bytes or a string such as '512MiB', '8GiB' or '1.5GB'"


def parse_size(field_name: str, value: Any) -> int:
    """Return ``value`` as a non-negative int of bytes, or raise naming ``field_name``."""
    if isinstance(value, bool):
        raise TypeError(f"{field_name}: expected {_SIZE_HELP}, got the bool {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ConfigError(f"{field_name}: {value!r} is not a whole number of bytes")
        number = int(value)
    elif isinstance(value, str):
        number = _parse_size_string(field_name, value)
    else:
        raise TypeError(f"{field_name}: expected {_SIZE_HELP}, got {type(value).__name__}")
    if number < 0:
        raise ConfigError(f"{field_name}: sizes cannot be negative, got {value!r}")
    return number


def _parse_size_string(field_name: str, text: str) -> int:
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        units = ", ".join(u for u in _UNITS if u)
        raise ConfigError(
            f"{field_name}: cannot read {text!r} as a size; use {_SIZE_HELP} "
            f"(units: {units}, any case)"
        )
    # Decimal, not float: "8.2MB" is exactly 8200000 and "9007199254740993" stays exact.
    try:
        with decimal.localcontext() as context:  # exact, or refused: never rounded
            context.prec = 100
            context.traps[decimal.Inexact] = context.traps[decimal.Underflow] = True
            number = decimal.Decimal(match.group(1)) * _UNITS[unit]
    except decimal.Overflow:
        raise ConfigError(f"{field_name}: {text!r} is larger than any disk or memory") from None
    except ArithmeticError:  # digits beyond any size, or a size below one byte
        raise ConfigError(f"{field_name}: {text!r} is not a whole number of bytes") from None
    if number > _MAX_SIZE:
        raise ConfigError(f"{field_name}: {text!r} is larger than any disk or memory")
    if number != number.to_integral_value():
        raise ConfigError(
            f"{field_name}: {text!r} is not a whole number of bytes{_whole_size(number, unit)}"
        )
    return int(number)


# The unit a size that is not whole in a unit can be written in instead.
_SMALLER = {"tib": "GiB", "gib": "MiB", "mib": "KiB", "kib": "B",
            "tb": "GB", "gb": "MB", "mb": "kB", "kb": "B"}  # fmt: skip


def _whole_size(number: decimal.Decimal, unit: str) -> str:
    """The hint for a size of ``number`` bytes that is not whole: the whole size just
    below it in the unit below ``unit`` ("23.4GiB" is 25125558681.6 bytes: "e.g.
    '23961MiB'"); none for bytes, or where that would be 0."""
    smaller = _SMALLER.get(unit)
    if smaller is None:
        return ""
    whole = int(number // _UNITS[smaller.lower()])
    return f"; write it in a smaller unit, e.g. '{whole}{smaller}'" if whole else ""


def _parse_bool(field_name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{field_name}: expected true or false, got {value!r}")


def _parse_count(field_name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{field_name}: expected a whole number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{field_name}: expected a whole number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{field_name}: must be 0 or more, got {value}")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"config file {str(path)!r} does not exist; give the path of an existing TOML file"
        ) from None
    except OSError as error:  # a directory, or not readable: one line, not an errno
        raise ConfigError(
            f"config file {str(path)!r}: cannot read it ({error.strerror or error}); give "
            "the path of a readable TOML file"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None


def _auto_or(value: Any, parse: Callable[[Any], Any]) -> Any:
    """``AUTO`` where the value says "auto" (any case), else the parsed value."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    return parse(value)


def _parse_choice(field_name: str, value: Any, choices: tuple[str, ...], noun: str) -> str:
    if isinstance(value, str) and value.strip().lower() in choices:
        return value.strip().lower()
    raise ConfigError(
        f"{field_name}: unknown {noun} {value!r}; choose one of "
        f"{', '.join(repr(choice) for choice in choices)}"
    )


def _is_none_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() in ("", "none", "null")


@dataclass(frozen=True)
class CacheConfig:
    """How much each tier may hold and where the disk tier lives.

    Fields (see docs/config.md for the long form):

    - ``device_bytes``: budget for values kept on an accelerator. ``"auto"`` means 0
      when values are offloaded to the CPU (the stock behaviour) and no limit when
      ``offload_device`` is None or an accelerator (values stay where they are).
    - ``host_bytes``: all the host memory the caches of this config hold for tiered
      values: one region (the pool's arena) holding the host tier, the values waiting
      for their disk write and the values read back. ``"auto"`` is half of the RAM
      available when the cache is created. 0: no region (values in transit use
      ordinary memory, unbounded; for tests).
    - ``disk_path``: directory in which each cache creates its store; ``None`` turns
      the disk tier off (an empty path is refused). ``"auto"`` is the system temp
      directory (``$TMPDIR``). A list of directories (one per drive;
      ``SPILLCACHE_DISK_PATH`` separates them with ``os.pathsep``) spreads arrays over
      them, most free space first.
    - ``disk_bytes``: budget of the disk tier; ``None`` means no limit but the disk.
    - ``inline_bytes``: tensors smaller than this stay in RAM with their entry's
      structure and never get a file of their own (0 tiers every tensor).
    - ``prefetch_depth``: how many batches ahead ``iter_prefetch`` fetches.
    - ``eviction``: the eviction policy of the memory tiers: ``"scan"`` (furthest next
      use in the pipeline's cyclic order first) or ``"lru"``.
    - ``keep_store``: keep the store on ``close()`` (with every entry written to it)
      instead of deleting it.
    - ``direct_io``: read and write chunk files with O_DIRECT (``True``), through the
      page cache (``False``), or O_DIRECT where the filesystem allows it (``"auto"``).
    - ``read_mode``: ``"copy"`` reads spilled values into memory; ``"mmap"`` maps them
      (zero-copy, for CPU model devices whose caller only reads them).
    - ``write_behind_bytes``: the part of ``host_bytes`` for spilled values waiting
      for their disk write; ``update`` and ``pin_memory`` wait (backpressure) while
      more are in flight. ``"auto"``: an eighth of ``host_bytes``, at most 512 MiB.
    - ``read_buffer_bytes``: the part of ``host_bytes`` kept for values read back from
      disk and values being copied in. ``"auto"``: as ``write_behind_bytes``. The host
      tier holds what the two leave of ``host_bytes``.
    - ``io_threads``: background threads doing disk I/O and prefetch (at least 1).
    - ``checksum``: store a CRC32C with every chunk (zarr's crc32c codec) and check it
      on every read, so a damaged chunk is an error instead of wrong data (the default).
      ``False`` stores plain bytes: bit rot in such a store cannot be detected.
    - ``budget_scope``: under torchrun, whether the explicit sizes ``host_bytes``,
      ``write_behind_bytes``, ``read_buffer_bytes`` and ``disk_bytes`` are for the whole
      node (``"node"``, the default: each rank gets its share, see ``resolved.py``) or for
      each rank (``"rank"``). ``device_bytes`` is always per GPU; outside torchrun the
      scope changes nothing.
    - ``remove_stores_on_signal``: on SIGTERM, SIGHUP (and SIGINT where its action is
      the default one, not Python's KeyboardInterrupt) remove this process's stores
      that are not kept, then end as the signal would have (handlers installed once,
      from the main thread, when the first cache with a disk tier is built there).
    - ``remove_dead_stores``: a new cache removes the stores under its ``disk_path``
      (and its run directories) that were not kept and whose process on this host is
      dead, once per directory per process, logging one warning with what it freed.
    """

    device_bytes: int | str = AUTO
    host_bytes: int | str = AUTO
    disk_path: str | tuple[str, ...] | None = AUTO
    disk_bytes: int | None = None
    inline_bytes: int = 64 * 1024
    prefetch_depth: int = 2
    eviction: str = "scan"
    keep_store: bool = False
    direct_io: bool | str = AUTO
    read_mode: str = "copy"
    write_behind_bytes: int | str = AUTO
    read_buffer_bytes: int | str = AUTO
    io_threads: int = 3
    checksum: bool = True
    budget_scope: str = "node"
    remove_stores_on_signal: bool = True
    remove_dead_stores: bool = True

    def __post_init__(self) -> None:
        for name in ("device_bytes", "host_bytes", "write_behind_bytes", "read_buffer_bytes"):
            self._set(name, _auto_or(getattr(self, name), lambda v, n=name: parse_size(n, v)))
        self._set("disk_path", self._checked_disk_path(self.disk_path))
        if self.disk_bytes is not None and not _is_none_text(self.disk_bytes):
            self._set("disk_bytes", parse_size("disk_bytes", self.disk_bytes))
        else:
            self._set("disk_bytes", None)
        self._set("inline_bytes", parse_size("inline_bytes", self.inline_bytes))
        self._set("prefetch_depth", _parse_count("prefetch_depth", self.prefetch_depth))
        self._set("keep_store", _parse_bool("keep_store", self.keep_store))
        self._set("checksum", _parse_bool("checksum", self.checksum))
        for name in ("remove_stores_on_signal", "remove_dead_stores"):
            self._set(name, _parse_bool(name, getattr(self, name)))
        self._set("eviction", _parse_choice("eviction", self.eviction, EVICTION_POLICIES, "policy"))
        self._set("read_mode", _parse_choice("read_mode", self.read_mode, READ_MODES, "mode"))
        self._set(
            "budget_scope",
            _parse_choice("budget_scope", self.budget_scope, BUDGET_SCOPES, "scope"),
        )
        self._set("direct_io", _auto_or(self.direct_io, lambda v: _parse_bool("direct_io", v)))
        self._set("io_threads", _parse_count("io_threads", self.io_threads))
        if self.io_threads < 1:
            raise ConfigError("io_threads: must be 1 or more, got 0")

    def _set(self, name: str, value: Any) -> None:
        # The dataclass is frozen for callers; normalising in __post_init__ is the
        # one place that writes.
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------ where values came from

    def source_of(self, name: str) -> str | None:
        """Where field ``name``'s value came from: the ``SPILLCACHE_`` variable that set
        it, the config file's path, an option of the ``spillcache`` command ("--..."),
        ``"default"``, or None where code gave it (``CacheConfig(...)``, ``replace()``,
        ``enable()``). Messages about a value name it by this."""
        return self._sources.get(name)

    @property
    def _sources(self) -> dict[str, str | None]:
        # Not a field: two configs with the same values are equal (and share a pool)
        # wherever their values came from.
        return self.__dict__.get("_value_sources", {})

    def _noting(self, sources: dict[str, str | None]) -> CacheConfig:
        """This config (a copy), its fields in ``sources`` said to come from there."""
        noted = copy.copy(self)  # the same values: nothing to check again
        object.__setattr__(noted, "_value_sources", {**self._sources, **sources})
        return noted

    @staticmethod
    def _checked_disk_path(value: Any) -> str | tuple[str, ...] | None:
        """One directory (a str), several (a tuple: one per drive), "auto" or None."""
        if isinstance(value, (list, tuple)):
            paths = [CacheConfig._one_disk_path(item, listed=True) for item in value]
            if not paths:
                raise ConfigError("disk_path: the list is empty; give at least one directory")
            if len(set(map(os.path.realpath, paths))) < len(paths):
                raise ConfigError(f"disk_path: {paths} names a directory twice")
            return paths[0] if len(paths) == 1 else tuple(paths)
        if isinstance(value, str) and not value.strip():  # `disk_path=$SCRATCH`, SCRATCH unset
            raise ConfigError(
                'disk_path: the path is empty; give a directory, "auto" (the temp directory), or '
                '"none" to turn the disk tier off'
            )
        if value is None or _is_none_text(value):
            return None
        path = CacheConfig._one_disk_path(value, listed=False)
        return AUTO if path.strip().lower() == AUTO else path

    @staticmethod
    def _one_disk_path(value: Any, *, listed: bool) -> str:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str) or (listed and not value.strip()):
            raise TypeError(
                "disk_path: expected a directory path, a list of them (one per drive), "
                f"'auto' or None, got {value!r}"
            )
        return value

    # ----------------------------------------------------------------- builders

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_mapping(cls, values: dict[str, Any], source: str = "mapping") -> CacheConfig:
        """Build a config from a dict, rejecting keys that are not fields."""
        unknown = sorted(set(values) - set(cls.field_names()))
        if unknown:
            suggestions = "".join(did_you_mean(key, cls.field_names()) for key in unknown)
            raise ConfigError(
                f"{source}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                f"known settings are {', '.join(cls.field_names())}{suggestions}"
            )
        try:
            config = cls(**values)
        except ConfigError as error:  # say where the bad value was written
            raise ConfigError(f"{source}: {error}") from None
        except TypeError as error:
            raise TypeError(f"{source}: {error}") from None
        return config._noting(dict.fromkeys(values, source))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> CacheConfig:
        """Read a TOML file whose top-level keys are field names."""
        path = Path(path)
        return cls.from_mapping(_read_toml(path), source=str(path))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> CacheConfig:
        """Defaults, then the TOML file named by SPILLCACHE_CONFIG, then SPILLCACHE_<FIELD>."""
        return cls.explain(environ)[0]

    @classmethod
    def explain(
        cls, environ: dict[str, str] | None = None, file: str | os.PathLike[str] | None = None
    ) -> tuple[CacheConfig, dict[str, str]]:
        """``from_env()`` and where each field's value came from ("default", the file's
        path, or the variable's name). ``file`` stands in for ``SPILLCACHE_CONFIG``."""
        environ = dict(os.environ if environ is None else environ)
        values: dict[str, Any] = {}
        sources = dict.fromkeys(cls.field_names(), "default")
        named = environ.pop(ENV_CONFIG_FILE, "").strip()  # not a field; --file wins over it
        config_file = named if file is None else str(file)
        if config_file:
            values.update(_named_file(config_file, from_variable=file is None))
            cls.from_mapping(values, source=config_file)  # the file checked on its own first
            sources.update(dict.fromkeys(values, config_file))
        for name, text in environ.items():
            if not name.startswith(ENV_PREFIX) or name in OTHER_VARIABLES:
                continue
            field_name = name[len(ENV_PREFIX) :].lower()
            if field_name not in cls.field_names():
                raise ConfigError(_unknown_variable(name, cls.field_names()))
            if field_name == "disk_path" and os.pathsep in text:  # one per drive, as in PATH
                values[field_name] = text.split(os.pathsep)
            else:
                values[field_name] = text
            sources[field_name] = name
        try:
            config = cls(**values)
        except (ConfigError, TypeError) as error:  # a variable's value: name the variable
            field_name = str(error).split(":", 1)[0]
            variable = sources.get(field_name, "")
            if not variable.startswith(ENV_PREFIX):
                raise
            said = f"{error}; it came from {variable}: fix or unset it"
            raise type(error)(said) from None
        return config._noting(sources), sources

    def replace(self, **changes: Any) -> CacheConfig:
        """A copy with some fields changed (validated like a new config)."""
        changed = dataclasses.replace(self, **changes)
        kept = {k: v for k, v in self._sources.items() if k not in changes}
        return changed._noting({**dict.fromkeys(changes), **kept})


def _named_file(path: str, *, from_variable: bool) -> dict[str, Any]:
    """The TOML file a config names; read from ``SPILLCACHE_CONFIG``, a problem with it
    names that variable (the file's path alone would not say where it was given)."""
    try:
        return _read_toml(Path(path))
    except FileNotFoundError as error:
        if not from_variable:
            raise
        raise FileNotFoundError(f"{ENV_CONFIG_FILE}: {error}") from None
    except ConfigError as error:
        if not from_variable:
            raise
        raise ConfigError(f"{ENV_CONFIG_FILE}: {error}") from None


def _unknown_variable(name: str, field_names: tuple[str, ...]) -> str:
    variables = [ENV_PREFIX + f.upper() for f in field_names]
    known = ", ".join([ENV_CONFIG_FILE, *variables, *OTHER_VARIABLES])
    suggestion = did_you_mean(name, [ENV_CONFIG_FILE, *variables, *OTHER_VARIABLES])
    return (
        f"environment: unknown variable {name}; known variables are {known}{suggestion} "
        f"(unset {name}, or rename it)"
    )


# CacheConfig(host_byte=...) would be Python's "unexpected keyword argument": the same
# error, with the setting it was probably meant to be; and where each value came from
# starts here (given in code, or the default), for messages that name it.
_dataclass_init = CacheConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: CacheConfig, *args: Any, **kwargs: Any) -> None:
    names = CacheConfig.field_names()
    unknown = [key for key in kwargs if key not in names]
    if unknown:
        raise TypeError(
            f"CacheConfig: unknown setting {unknown[0]!r}{did_you_mean(unknown[0], names)} "
            f"(known settings: {', '.join(names)})"
        )
    _dataclass_init(self, *args, **kwargs)
    given = {*names[: len(args)], *kwargs}
    sources = {name: None if name in given else "default" for name in names}
    object.__setattr__(self, "_value_sources", sources)


CacheConfig.__init__ = _init  # type: ignore[method-assign]
