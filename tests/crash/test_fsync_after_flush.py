"""flush() of a kept store fsyncs everything the store holds, seen from outside: under
strace, a child fills a store through a 1 MiB host tier (the I/O threads write most
values in the background), flushes, and says so on stdout; by then every file and
directory of the store must have been fsynced after its last change (a write, pwrite or
native AIO submission to a file; a create, rename, unlink or mkdir in a directory), and
the store's parent after the store's entry was made in it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import power_loss  # noqa: E402

WRITER = Path(__file__).parent / "fsync_writer.py"
TRACED = "%file,%desc,fsync,fdatasync,io_submit"

# A call's line: "<pid> <name>(<args>) = <result>"; a call cut by another thread's line
# ends in "<unfinished ...>" and goes on in "<pid> <... <name> resumed><rest>".
_LINE = re.compile(r"^(\d+) +(.*)$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)$")
_RESULT = re.compile(r"^(.*)\) +=\s+(\S.*)$")  # the last ") = ": strings may hold one
# A descriptor (or AT_FDCWD) that strace -y annotates with its path.
_FD = re.compile(r"(?:\d+|AT_FDCWD)<([^>]*)>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_AIO_WRITE = re.compile(r"aio_lio_opcode=IOCB_CMD_PWRITEV?, aio_fildes=\d+<([^>]*)>")
_FILE_WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2", "ftruncate", "fallocate"}


@dataclass
class Call:
    line: int  # where it started in the trace (an fsync covers what finished before)
    done: int  # where it returned (a change counts from there)
    name: str
    args: str
    result: str


def _calls(text: str):
    """Each finished system call of an strace -f -y log, in the order they returned."""
    pending: dict[str, tuple[int, str]] = {}  # pid -> (line, the call's text so far)
    for number, raw in enumerate(text.splitlines()):
        match = _LINE.match(raw)
        if not match:
            continue
        pid, body = match.groups()
        start = number
        resumed = _RESUMED.match(body)
        if resumed:
            if pid not in pending:
                continue
            start, head = pending.pop(pid)
            body = head + resumed.group(2)
        elif body.endswith("<unfinished ...>"):
            pending[pid] = (number, body.removesuffix("<unfinished ...>").rstrip())
            continue
        name, _, rest = body.partition("(")
        returned = _RESULT.match(rest)
        if returned and name.isidentifier():
            yield Call(start, number, name, returned.group(1), returned.group(2))


def _fd_path(args: str) -> str | None:
    match = _FD.match(args)
    return match.group(1).removesuffix(" (deleted)") if match else None


def _strings(args: str) -> list[str]:
    return [value.encode().decode("unicode_escape") for value in _STRING.findall(args)]


def _at(args: str, index: int) -> str:
    """The path in the ``index``-th string argument of a call: absolute, or relative to
    the ``index``-th directory descriptor (``unlinkat(4</d>, "name", 0)``)."""
    name = _strings(args)[index]
    if os.path.isabs(name):
        return name
    descriptors = _FD.findall(args)
    return os.path.join(descriptors[index] if index < len(descriptors) else "", name)


@dataclass
class Durability:
    """Per path: the trace line of its last change and of its last fsync."""

    changed: dict[str, tuple[int, str]] = field(default_factory=dict)  # path -> (line, what)
    # path -> (line, what) of the last change of its entry in its directory
    entries: dict[str, tuple[int, str]] = field(default_factory=dict)
    synced: dict[str, int] = field(default_factory=dict)
    fsyncs: list[tuple[int, str]] = field(default_factory=list)  # (line, path) of each

    def change(self, path: str, line: int, what: str) -> None:
        self.changed[os.path.normpath(path)] = (line, what)

    def entry_changed(self, path: str, line: int, what: str) -> None:
        path = os.path.normpath(path)
        self.change(os.path.dirname(path), line, f"{what} {os.path.basename(path)}")
        self.entries[path] = (line, what)

    def move(self, source: str, target: str) -> None:
        """A rename: what was known of ``source`` (and below it) is now ``target``'s."""
        source, target = os.path.normpath(source), os.path.normpath(target)
        for table in (self.changed, self.synced):
            for path in [p for p in table if p == source or p.startswith(source + "/")]:
                table[target + path[len(source) :]] = table.pop(path)

    def forget(self, path: str) -> None:
        path = os.path.normpath(path)
        for table in (self.changed, self.synced):
            for gone in [p for p in table if p == path or p.startswith(path + "/")]:
                del table[gone]


def _follow(calls, until: int) -> Durability:
    """What the calls that returned before line ``until`` changed and fsynced."""
    seen = Durability()
    for call in calls:
        if call.done >= until:
            break
        if call.result.startswith("-1") or call.result.startswith("?"):
            continue  # failed: changed nothing
        name, args, line = call.name, call.args, call.done
        if name in ("fsync", "fdatasync"):
            path = _fd_path(args)
            if path is not None:
                seen.synced[os.path.normpath(path)] = call.line
                seen.fsyncs.append((call.line, path))
        elif name in _FILE_WRITES:
            path = _fd_path(args)
            if path is not None:
                seen.change(path, line, name)
        elif name == "io_submit":
            for path in _AIO_WRITE.findall(args):
                seen.change(path.removesuffix(" (deleted)"), line, name)
        elif name in ("open", "openat", "creat") and ("O_CREAT" in args or name == "creat"):
            path = _fd_path(call.result)
            if path is not None:
                seen.entry_changed(path, line, "create")
        elif name in ("mkdir", "mkdirat"):
            seen.entry_changed(_at(args, 0), line, "mkdir")
        elif name in ("rename", "renameat", "renameat2"):
            source, target = _at(args, 0), _at(args, 1)
            seen.forget(target)
            seen.move(source, target)
            seen.entry_changed(source, line, "rename from")
            seen.entry_changed(target, line, "rename to")
        elif name in ("unlink", "unlinkat", "rmdir"):
            path = _at(args, 0)
            seen.forget(path)
            seen.entry_changed(path, line, "unlink" if "REMOVEDIR" not in args else "rmdir")
    return seen


def _not_durable(seen: Durability, store: str, paths: list[str]) -> list[str]:
    """Each of ``paths`` (the store and what it holds) whose last change no fsync
    followed, and the store's entry in its parent if no fsync of the parent followed
    its last change (other changes there are not the store's): path, and what changed."""
    store = os.path.normpath(store)
    parent = os.path.dirname(store)
    checks = [(store, seen.entries.get(store), parent, f"its entry in {parent}")]
    for path in map(os.path.normpath, paths):
        checks.append((path, seen.changed.get(path), path, ""))
    missing = []
    for path, change, synced_path, where in checks:
        if change is None:
            continue
        line, what = change
        synced = seen.synced.get(synced_path)
        if synced is None or synced < line:
            name = os.path.relpath(path, parent)
            when = "never fsynced" if synced is None else f"last fsynced on line {synced + 1}"
            missing.append(f"{name}{' (' + where + ')' if where else ''}: {what} on line "
                           f"{line + 1}, {when}")  # fmt: skip
    return missing


def _printed(calls: list[Call], word: str) -> int:
    """The trace line where the writer printed the line starting with ``word``."""
    for call in calls:
        if call.name == "write" and call.args.startswith("1<") and f'"{word}' in call.args:
            return call.done
    raise AssertionError(f"the writer's {word!r} line is not in the strace log")


def _strace_usable(tmp_path: Path) -> str | None:
    """Why strace cannot trace a child here, or None."""
    if shutil.which("strace") is None:
        return "strace is not installed (apt-get install strace)"
    probe = subprocess.run(
        ["strace", "-f", "-o", str(tmp_path / "probe.txt"), sys.executable, "-c", "pass"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"strace cannot trace a child here (ptrace refused?): {probe.stderr.strip()}"
    return None


def _run_traced(disk: Path, log: Path) -> tuple[str, list[str]]:
    """Run the writer under strace until it has flushed; return its store and the
    paths the store holds then (its parent, directories, files)."""
    command = ["strace", "-f", "-y", "-e", f"trace={TRACED}", "-o", str(log)]
    command += [sys.executable, str(WRITER), str(disk)]
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = child.stdout.readline()
        if line.startswith("flushing"):
            line = child.stdout.readline()
        if not line.startswith("flushed "):
            child.kill()
            pytest.fail(f"the writer did not flush: {line!r} {child.stderr.read()}")
        store = line.split(" ", 1)[1].strip()
        paths = [store]
        for directory, names, files in os.walk(store):
            paths += [os.path.join(directory, name) for name in names + files]
        child.stdin.close()  # the writer ends without closing its cache
        child.wait(timeout=120)
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
        for pipe in (child.stdin, child.stdout, child.stderr):
            pipe.close()  # stdin too: a writer strace left behind then ends
    return store, paths


def test_flush_fsyncs_every_file_and_directory_of_the_store(tmp_path, request):
    """Every path of the store at flush() return, and the store's entry in its parent,
    fsynced after its last change; the summary says how many fsyncs flush() made."""
    why = _strace_usable(tmp_path)
    if why is not None:
        pytest.skip(why)
    disk = tmp_path / "disk"
    disk.mkdir()
    log = tmp_path / "strace.txt"
    store, paths = _run_traced(disk, log)
    calls = list(_calls(log.read_text(errors="replace")))
    flushing, flushed = (_printed(calls, word) for word in ("flushing", "flushed"))
    seen = _follow(calls, flushed)
    during = [path for line, path in seen.fsyncs if line > flushing]
    directories = sum(os.path.isdir(path) for path in during)
    summary = (
        f"fsync after flush: {len(paths) - 1} files and directories in the store; flush() "
        f"made {len(during) - directories} file and {directories} directory fsyncs"
    )
    power_loss.say_at_end(request.config, summary)
    missing = _not_durable(seen, store, paths)
    more = f"\n  ... and {len(missing) - 40} more" if missing[40:] else ""
    shown = "\n  ".join(missing[:40]) + more
    assert not missing, (
        f"{len(missing)} of the store's {len(paths)} paths (the store's entry in its parent "
        f"included) changed after their last fsync when flush() returned ({summary}), "
        f"lines of {log}:\n  {shown}"
    )


def test_the_log_parser_follows_renames_and_threads():
    """The parser on a hand-written log: a call cut by another thread's line, a rename
    carrying a file's fsync to its new name, an fsync that began before a change."""
    log = "\n".join([
        '10 openat(AT_FDCWD</d>, "/d/s/a.partial", O_WRONLY|O_CREAT, 0666) = 3</d/s/a.partial>',
        '10 pwrite64(3</d/s/a.partial>, "xx"..., 2, 0 <unfinished ...>',
        '11 mkdir("/d/s/t", 0777) = 0',
        "10 <... pwrite64 resumed>) = 2",
        "10 fsync(3</d/s/a.partial>) = 0",
        '10 rename("/d/s/a.partial", "/d/s/a") = 0',
        "11 fsync(4</d/s> <unfinished ...>",
        '10 openat(AT_FDCWD</d>, "/d/s/b", O_WRONLY|O_CREAT|O_EXCL, 0666) = 5</d/s/b>',
        "11 <... fsync resumed>)     = 0",
        '10 write(5</d/s/b>, "y", 1) = 1',
        '11 openat(AT_FDCWD</d>, "/d/probe", O_WRONLY|O_CREAT|O_EXCL, 0666) = 6</d/probe>',
        '10 unlinkat(4</d/s>, "gone", 0) = -1 ENOENT (No such file or directory)',
        '10 write(1<pipe:[7]>, "flushed /d/s\\n", 13) = 13',
    ])  # fmt: skip
    calls = list(_calls(log))
    assert [c.name for c in calls] == [
        "openat", "mkdir", "pwrite64", "fsync", "rename", "openat", "fsync", "write", "openat",
        "unlinkat", "write",
    ]  # fmt: skip
    seen = _follow(calls, calls[-1].done)
    missing = _not_durable(seen, "/d/s", ["/d/s", "/d/s/a", "/d/s/b", "/d/s/t"])
    # a: written, fsynced, renamed (its bytes are durable); b: written, never fsynced;
    # s: its fsync began before b was created in it; t: never changed after mkdir; s's
    # entry in /d was never made here (a probe file made there is not the store's).
    assert [m.split(":")[0] for m in missing] == ["s", "s/b"], missing
    assert "create b on line 8" in missing[0] and "last fsynced on line 7" in missing[0]
    assert "write on line 10, never fsynced" in missing[1]
    # Made here, the store's entry must be fsynced in its parent.
    made = _follow(_calls('12 mkdir("/d/s", 0700) = 0\n' + log), until=len(calls) + 1)
    assert _not_durable(made, "/d/s", [])[0].startswith("s (its entry in /d): mkdir on line 1")
