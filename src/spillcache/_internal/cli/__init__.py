"""The spillcache command's subcommands beside the store commands of spillcache.cli:
config, plan, report, demo, and what they compute.

The rules are checked by tests/unit/test_import_rules.py."""
