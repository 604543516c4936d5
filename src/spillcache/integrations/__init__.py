"""Integrations with the frameworks spillcache is a drop-in for (each an optional extra)."""

__all__: list[str] = []  # each integration is its own module, imported by name
