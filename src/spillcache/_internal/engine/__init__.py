"""The engine: what a pool decides with its lock held — where each value lives (placement,
its promotions, kept copies), its records, the write-behind area, the eviction policies,
the tiers' books, each cache's share and counters (tenants), and a transaction's needs
and undo steps (transaction). It may import io, store and the helpers beside this
folder; never runtime, process, stock, llmcompressor or cli.

The rules are checked by tests/unit/test_import_rules.py."""
