"""A process that spills into a store, then meets a signal, for tests/cleanup.

python signal_child.py DISK_DIR SCENARIO

It sets the signals' actions first (a test runner may start it with some ignored),
builds a cache that spills (host budget 0), prints "store <path>" once the store holds
a flushed value, then, by scenario:

- ``writing``: keeps updating (every value spilled, writes in flight) until SIGTERM;
- ``under-lock``: sends itself SIGHUP while holding the pool's lock;
- ``sigint-default``: SIGINT's action is SIG_DFL; waits on stdin for it;
- ``previous-exits``: a handler installed before the cache calls sys.exit(3);
- ``keyboard-interrupt``: Python's own SIGINT handler: catches the first
  KeyboardInterrupt, checks its values, prints "intact", then waits for a second one
  that it does not catch;
- ``fork``: forks a child that sends itself SIGTERM; prints how the child ended and
  whether the store is still there, then closes the cache and exits 0.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from spillcache import CacheConfig, IntermediatesCache

VALUE = torch.arange(4096, dtype=torch.float32).reshape(64, 64)


def say(*words: object) -> None:
    print(*words, flush=True)


def main() -> None:
    disk_dir, scenario = sys.argv[1], sys.argv[2]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if scenario == "sigint-default":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    if scenario == "previous-exits":

        def previous(signum: int, frame: object) -> None:
            say("previous handler")
            sys.exit(3)

        signal.signal(signal.SIGTERM, previous)
    config = CacheConfig(host_bytes=0, inline_bytes=0, disk_path=disk_dir, io_threads=2)
    if scenario == "keyboard-interrupt":
        # SIGINT blocked in the I/O threads (they inherit the mask they are started
        # with): the kernel then delivers it to the main thread, whose read of stdin it
        # interrupts. Delivered to an I/O thread, Python's handler would only run once
        # that read returned, and the caught KeyboardInterrupt would never come.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    cache = IntermediatesCache([{"h": VALUE}, {"h": VALUE + 1}], config=config)
    cache.flush()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if scenario != "keyboard-interrupt":
        say("store", cache.store_path)
    if scenario == "writing":
        step = 0
        while True:
            step += 1
            cache.update(step % 2, {"h": VALUE + step})
    elif scenario == "under-lock":
        with cache._core.pool.lock:
            os.kill(os.getpid(), signal.SIGHUP)
            say("still running")  # not reached: the handler ended the process
    elif scenario == "keyboard-interrupt":
        try:  # a SIGINT that comes once the line is out is caught
            say("store", cache.store_path)
            sys.stdin.readline()
        except KeyboardInterrupt:
            say("caught")
        same = torch.equal(cache.fetch(1)["h"], VALUE + 1)
        say("intact" if same and Path(cache.store_path).is_dir() else "LOST")
        sys.stdin.readline()  # the second SIGINT is not caught
    elif scenario == "fork":
        pid = os.fork()
        if pid == 0:
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(0)  # not reached
        _, status = os.waitpid(pid, 0)
        say("child signal", os.WTERMSIG(status) if os.WIFSIGNALED(status) else None)
        say("store there" if Path(cache.store_path).is_dir() else "store gone")
        cache.close()
    else:
        sys.stdin.readline()


if __name__ == "__main__":
    main()
