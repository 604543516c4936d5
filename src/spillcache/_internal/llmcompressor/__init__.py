"""The llm-compressor switch's own machinery: the resumable sequential pipeline, the ranks
checkpointing together, the watch of a run.

The rules are checked by tests/unit/test_import_rules.py."""
