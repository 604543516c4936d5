"""This process and its node: a config resolved for it (budgets, disks, devices), where it
sits under torchrun, and the cleanup of its stores on a signal or of dead processes'
stores. It may import store, io, the helpers beside this folder and spillcache.config.

The rules are checked by tests/unit/test_import_rules.py."""
