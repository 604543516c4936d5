"""Faults injected at the system-call boundary, deterministically (tests/faults).

``syscalls`` wraps the calls spillcache's disk I/O makes (``os.pwrite``, ``os.preadv``,
``os.pread``, ``os.open``, ``os.replace``, ``os.fsync``, chunkio's ``fallocate``, native
AIO's submissions and completions) so that a chosen call on a chosen file fails with an
errno, or reads short, a chosen number of times. Which call and which file are named,
never left to timing; a ``gate`` Event holds the faulty call until the test lets it go.

``free_space`` makes ``os.statvfs`` report a chosen number of free bytes per directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from spillcache._internal.io import aio, buffers, chunkio

CALLS = ("pwrite", "preadv", "pread", "open", "replace", "fsync", "fallocate", "aio")

# Over the whole run, for the summary line (conftest.py): faults made on purpose.
TOTALS: Counter[str] = Counter()


@dataclass
class Rule:
    call: str
    path: str  # applies to files whose path contains this
    times: int  # how many more calls it applies to
    code: int | None = None  # fail with this errno
    short: int | None = None  # a short read: report at most this many bytes (0: EOF)
    skip: int = 0  # matching calls to let through first
    gate: threading.Event | None = None  # the call waits for it first
    hits: list[str] = field(default_factory=list)  # paths it was applied to
    arrived: threading.Event = field(default_factory=threading.Event)  # set on the first hit


class Syscalls:
    """Makes chosen system calls of spillcache's disk I/O fail or read short.

    ``injected`` counts the faults made; ``calls`` counts calls per kind on files
    under a store's ``tensors`` directory (what a test expects its value to go through).
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rules: list[Rule] = []
        self.injected = 0
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._aio_paths: dict[tuple[int, int], str] = {}
        self._install(monkeypatch)

    def fail(self, call: str, code: int, *, path: str = "/tensors/", times: int = 1, **kw) -> Rule:
        """The next ``times`` calls (after ``skip``) on files matching ``path`` fail."""
        assert call in CALLS, call
        return self._add(Rule(call, path, times, code=code, **kw))

    def read_short(
        self, call: str, short: int = 0, *, path: str = "/tensors/", times: int = 1, **kw
    ) -> Rule:
        """Those reads report at most ``short`` bytes (0: the end of the file)."""
        assert call in ("preadv", "pread"), call
        return self._add(Rule(call, path, times, short=short, **kw))

    def hold(self, call: str, gate: threading.Event, *, path: str, times: int = 1) -> Rule:
        """Those calls wait until ``gate`` is set, then run as usual."""
        return self._add(Rule(call, path, times, gate=gate))

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """On the way out (a failed assertion included), every gate opens: a cache
        closing after it then does not wait for a held call."""
        try:
            yield
        finally:
            for rule in self.rules:
                if rule.gate is not None:
                    rule.gate.set()

    def _add(self, rule: Rule) -> Rule:
        with self._lock:
            self.rules.append(rule)
        return rule

    def _match(self, call: str, path: str) -> Rule | None:
        with self._lock:
            if "/tensors/" in path:
                self.calls[call] += 1
            for rule in self.rules:
                if rule.call != call or rule.path not in path or rule.times <= 0:
                    continue
                if rule.skip > 0:
                    rule.skip -= 1
                    continue
                rule.times -= 1
                rule.hits.append(path)
                rule.arrived.set()
                injected = rule.code is not None or rule.short is not None
                self.injected += injected
                TOTALS[f"{call} {'failed' if rule.code else 'cut short'}"] += injected
                break
            else:
                return None
        if rule.gate is not None:
            assert rule.gate.wait(timeout=60), "the test never opened the gate"
        return rule

    def _install(self, mp: pytest.MonkeyPatch) -> None:
        real = {name: getattr(os, name) for name in ("pwrite", "preadv", "pread", "open")}
        real |= {"replace": os.replace, "fsync": os.fsync, "readlink": os.readlink}

        def fd_path(fd: int) -> str:
            try:
                return real["readlink"](f"/proc/self/fd/{fd}")
            except OSError:
                return ""

        def failing(rule: Rule) -> OSError:
            return OSError(rule.code, os.strerror(rule.code))

        def pwrite(fd, data, offset):
            rule = self._match("pwrite", fd_path(fd))
            if rule is not None and rule.code is not None:
                raise failing(rule)
            return real["pwrite"](fd, data, offset)

        def read_call(name):
            def read(fd, target, offset):
                rule = self._match(name, fd_path(fd))
                if rule is not None and rule.code is not None:
                    raise failing(rule)
                got = real[name](fd, target, offset)
                if rule is None or rule.short is None:
                    return got
                if name == "pread":
                    return got[: rule.short]
                return min(got, rule.short)

            return read

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            rule = self._match("open", os.fspath(path))
            if rule is not None and rule.code is not None:
                raise failing(rule)
            return real["open"](path, flags, mode, dir_fd=dir_fd)

        def replace(src, dst, **kw):
            rule = self._match("replace", os.fspath(dst))
            if rule is not None and rule.code is not None:
                raise failing(rule)
            return real["replace"](src, dst, **kw)

        def fsync(fd):
            rule = self._match("fsync", fd_path(fd))
            if rule is not None and rule.code is not None:
                raise failing(rule)
            return real["fsync"](fd)

        mp.setattr(os, "pwrite", pwrite)
        mp.setattr(os, "preadv", read_call("preadv"))
        mp.setattr(os, "pread", read_call("pread"))
        mp.setattr(os, "open", open_)
        mp.setattr(os, "replace", replace)
        mp.setattr(os, "fsync", fsync)

        real_fallocate = chunkio._fallocate
        if real_fallocate is not None:

            def fallocate(fd, mode, offset, length):
                rule = self._match("fallocate", fd_path(fd))
                if rule is not None and rule.code is not None:
                    ctypes.set_errno(rule.code)
                    return -1
                return real_fallocate(fd, mode, offset, length)

            mp.setattr(chunkio, "_fallocate", fallocate)

        # Native AIO: a queued write's completion carries -errno (as the kernel reports a
        # failed direct request), or reports fewer bytes, found by the file its
        # submission named.
        real_write = aio.Context.submit_write
        real_wait = aio.Context.wait
        paths = self._aio_paths

        def recorded(real):
            def submit(ctx, fd, address, nbytes, offset, tag):
                real(ctx, fd, address, nbytes, offset, tag)
                paths[(id(ctx), tag)] = fd_path(fd)

            return submit

        def wait(ctx, least=1):
            done = []
            for tag, result in real_wait(ctx, least):
                rule = self._match("aio", paths.pop((id(ctx), tag), ""))
                if rule is not None and rule.code is not None:
                    result = -rule.code
                elif rule is not None and rule.short is not None:
                    result = min(result, rule.short)
                done.append((tag, result))
            return done

        mp.setattr(aio.Context, "submit_write", recorded(real_write))
        mp.setattr(aio.Context, "wait", wait)


class FreeSpace:
    """``os.statvfs`` as if each directory given to ``set`` were a filesystem of its
    own with that many bytes free to start with: less what the files under it take
    now (their allocated blocks), as a real filesystem would report."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.free: dict[str, int] = {}
        self.calls: list[str] = []
        self.on_call = lambda path: None  # a test's check, run on every call
        real = os.statvfs

        def statvfs(path):
            path = os.fspath(path)
            self.calls.append(path)
            self.on_call(path)
            got = real(path)
            under = [d for d in self.free if path == d or path.startswith(d.rstrip("/") + "/")]
            if not under:
                return got
            root = max(under, key=len)
            free = max(0, self.free[root] - used(root))
            return os.statvfs_result((1, 1, got.f_blocks, free, free, *tuple(got)[5:10]))

        monkeypatch.setattr(os, "statvfs", statvfs)

    def set(self, directory, nbytes: int) -> None:
        """``directory`` has ``nbytes`` free, besides what its files take now."""
        self.free[str(directory)] = nbytes + used(str(directory))


def used(directory: str) -> int:
    total = 0
    for path in Path(directory).rglob("*"):
        try:
            total += path.lstat().st_blocks * 512
        except FileNotFoundError:  # renamed or deleted meanwhile
            pass
    return total


def leftovers(directory: Path) -> list[str]:
    """Everything under ``directory`` (after a cache closed there: nothing)."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*"))


def unaligned(nbytes: int, seed: int) -> torch.Tensor:
    """Random float32 bytes 64 bytes past a page boundary, in memory of their own (so the
    cache keeps them by reference): a direct write copies them through a staging
    buffer, with pwrite, or queued with native AIO above 2 MiB."""
    return _random_bytes(nbytes, seed, offset=64)


def aligned(nbytes: int, seed: int) -> torch.Tensor:
    """Random float32 bytes starting on a page, in memory of their own: written
    zero-copy with pwrite."""
    return _random_bytes(nbytes, seed, offset=0)


def _random_bytes(nbytes: int, seed: int, offset: int) -> torch.Tensor:
    mapping = mmap.mmap(-1, nbytes + buffers.PAGE)
    raw = torch.frombuffer(mapping, dtype=torch.uint8, offset=offset, count=nbytes)
    gen = torch.Generator().manual_seed(seed)
    raw.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen))
    assert raw.data_ptr() % buffers.PAGE == offset
    return raw.view(torch.float32)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        got.dtype == want.dtype and got.shape == want.shape and torch.equal(bits(got), bits(want))
    )
