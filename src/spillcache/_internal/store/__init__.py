"""The store on disk: its format, the zarr v3 store a cache writes, the checks every reader
of stored structures goes through, where stores are and who owns them, fsyncs of a kept
store, checkpoint directories, what a store holds (summary) and what cut-short writes
leave. It may import io and the helpers beside this folder; never the engine.

The rules are checked by tests/unit/test_import_rules.py."""
