"""The exceptions spillcache raises, in one tree.

Each one also subclasses the built-in exception that callers already catch for the
same kind of trouble, so code written for the stock cache keeps working::

    SpillCacheError                        base of everything below
    ├── ConfigError (ValueError)           a config value, file or variable is invalid
    ├── CapacityError (MemoryError)        no tier has room for a value; nothing was stored
    ├── CacheClosedError (RuntimeError)    the cache was used after close()
    ├── IntegrationError (RuntimeError)    llm-compressor is missing, or already switched over
    │   └── CheckpointError                  a checkpoint_dir of another run, or damaged
    └── StoreError (OSError)               the disk tier could not do its job
        ├── DiskFullError                            no room on disk (errno ENOSPC)
        ├── StoreNotFoundError (FileNotFoundError)   no store at that path
        ├── StoreFormatError                         not a spillcache store, or an unknown version
        └── StoreCorruptError                        a chunk on disk is missing or damaged

Type errors in arguments (a key that is not a str, a batch index that is not an int)
are plain ``TypeError``; a batch index out of range is a plain ``IndexError``, and
deleting an absent key a plain ``KeyError``, as with the stock cache.
"""

from __future__ import annotations

import errno

__all__ = [
    "CacheClosedError",
    "CapacityError",
    "CheckpointError",
    "ConfigError",
    "DiskFullError",
    "IntegrationError",
    "SpillCacheError",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreNotFoundError",
]


class SpillCacheError(Exception):
    """Base class of every error spillcache raises on purpose."""


class ConfigError(SpillCacheError, ValueError):
    """A configuration value, file or environment variable is invalid."""


class CapacityError(SpillCacheError, MemoryError):
    """No tier has room for a value; the cache is left as it was (the update or append
    that raised it stored nothing, and values moved to make room are moved back)."""


class CacheClosedError(SpillCacheError, RuntimeError):
    """The cache was used after ``close()``."""


class IntegrationError(SpillCacheError, RuntimeError):
    """llm-compressor cannot be switched over to spillcache (not installed, an
    unsupported version, or already switched over)."""


class CheckpointError(IntegrationError):
    """A calibration cannot resume from its ``checkpoint_dir``: the checkpoint there is
    another run's (the message names what differs) or is damaged. Nothing of it was
    loaded; the message says how to start afresh."""


class StoreError(SpillCacheError, OSError):
    """The disk tier could not read or write its store."""


class DiskFullError(StoreError):
    """A disk under ``disk_path`` has no room for a value that must spill (``errno`` is
    ENOSPC). Raised by ``update``/``append`` before they store anything (the cache is
    left as it was), or by a later call reporting background writes that failed for
    lack of space (their values stay readable from RAM)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __reduce__(self):  # pickles (to another process) with the one argument it takes
        return type(self), (self.strerror,)


class StoreNotFoundError(StoreError, FileNotFoundError):
    """There is no store at the given path."""


class StoreFormatError(StoreError):
    """The path is not a spillcache store, or its format version is not supported."""


class StoreCorruptError(StoreError):
    """A chunk in the store is missing, truncated or damaged."""
