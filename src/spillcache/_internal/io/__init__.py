"""Moving bytes: the lanes (I/O threads), chunk files out and in (O_DIRECT, native AIO,
turns on a device), aligned buffers, the pool's host memory (the arena, glibc's heap)
and copies between devices. It holds no cache state and imports only the helpers beside
this folder.

The rules are checked by tests/unit/test_import_rules.py."""
