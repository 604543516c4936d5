"""The crash tests' writer: runs ``crash_plan.steps(seed)`` through a cache with
write-behind and a tiny host tier, printing "step <i>" after each step returns and
"flushed <i>" after each flush() returns, then waits on stdin to be killed.

python crash_writer.py DISK_DIR SEED KEEP(0|1)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import crash_plan  # noqa: E402

from spillcache import CacheConfig, IntermediatesCache  # noqa: E402


def main() -> None:
    disk_dir, seed, keep = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    config = CacheConfig(
        # A host tier of 128 KiB; 8 MiB may wait for disk writes (many writes in flight
        # when the kill comes) and 1 MiB is kept for reads: all parts of host_bytes.
        host_bytes=128 * 1024 + 9 * 2**20,
        inline_bytes=0,
        disk_path=disk_dir,
        keep_store=keep,
        write_behind_bytes=8 * 2**20,
        read_buffer_bytes=2**20,
        io_threads=2,
    )
    cache = IntermediatesCache.empty(0, "cpu", config=config)
    for index, step in enumerate(crash_plan.steps(seed)):
        if step.kind == "append":
            cache.append(crash_plan.batch_values(seed, step.batch))
        elif step.kind == "update":
            new = crash_plan.value(seed, step.batch, step.key, step.version)
            cache.update(step.batch, {step.key: new})
        elif step.kind == "delete":
            cache.delete(step.batch, [step.key])
        else:
            cache.flush()
            print(f"flushed {index}", flush=True)
        print(f"step {index}", flush=True)
    print("done", flush=True)
    sys.stdin.read()  # killed here, at the latest


if __name__ == "__main__":
    main()
