"""spillcache: llm-compressor's IntermediatesCache over GPU, host RAM and zarr on disk."""

from spillcache._internal.stock.stock_api import OverrideEqMode
from spillcache._internal.tree import IntermediateValue
from spillcache.cache import IntermediatesCache
from spillcache.config import CacheConfig
from spillcache.errors import (
    CacheClosedError,
    CapacityError,
    CheckpointError,
    ConfigError,
    DiskFullError,
    IntegrationError,
    SpillCacheError,
    StoreCorruptError,
    StoreError,
    StoreFormatError,
    StoreNotFoundError,
)

__all__ = [
    "CacheClosedError",
    "CacheConfig",
    "CapacityError",
    "ConfigError",
    "DiskFullError",
    "CheckpointError",
    "IntegrationError",
    "IntermediateValue",
    "IntermediatesCache",
    "OverrideEqMode",
    "SpillCacheError",
    "StoreCorruptError",
    "StoreError",
    "StoreFormatError",
    "StoreNotFoundError",
]

__version__ = "0.1.0"
