"""Integrations with the frameworks spillcache is a drop-in for (each an optional extra)."""
