"""Where a cache's calls run: CacheCore (one cache's calls), the shared pool (its lock, the
engine it runs and the effects it hands to the lanes), values prepared before the lock
(offload) and read after it (reads), kept stores made durable (persist) and opened again
(reopen). It may import every folder but stock, llmcompressor and cli.

The rules are checked by tests/unit/test_import_rules.py."""
