"""What code written for llm-compressor's stock cache reaches past the documented methods:
batch_intermediates as a live view, one batch as a dict, the stock classmethods, OverrideEqMode.

The rules are checked by tests/unit/test_import_rules.py."""
