"""The tiers: plain containers with a byte budget.

Tiers never call each other, start threads or take locks; the cache decides what
moves where (see ``spillcache._internal.engine.placement``).
"""

from .disk import DiskTier
from .memory import MemoryTier

__all__ = ["DiskTier", "MemoryTier"]
