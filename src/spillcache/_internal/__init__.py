"""spillcache's internals: every module behind the public surface.

What users import is ``spillcache`` (``IntermediatesCache``, ``CacheConfig``, the errors),
``spillcache.integrations.llmcompressor`` and the ``spillcache`` command. Nothing here is a
promise: names, signatures and modules change without notice. docs/architecture.md walks it.
"""
