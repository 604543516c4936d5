"""What a power loss can leave of a directory tree, from a recording of the calls that
decide durability.

``Recorder`` wraps the ``os`` functions that create, rename, remove and fsync files and
directories (``Path.mkdir``, ``Path.unlink`` and ``shutil.rmtree`` go through them too)
and records, for paths under one directory, what each call did: names added to and
removed from directories, and at each fsync what became durable (a file's bytes, a
directory's listing). Writes are not recorded: spillcache writes every file once,
under a fresh ``.partial`` name, so a file's durable bytes are those it held at its
last fsync, and a file never fsynced may hold anything after a power loss (nothing,
zeros, a prefix) even where its name survived.

``Trace.state(point, ...)`` rebuilds what the disk may hold if the power went after the
first ``point`` events. The pessimistic state keeps only what was fsynced: every
directory as its last fsync listed it (a directory never fsynced is empty; the tree
starts at the recorded directory, so a store whose entry in its parent was never
fsynced is gone), every file as its last fsync held it. ``replay=j`` also applies, on
top of each directory's last fsync, the names added and removed after it by events
before ``j``, in order: a journal that committed some later operations. A file that
was never fsynced holds what ``unsynced`` says: nothing, zeros or the first half of
its final bytes (the size it had when closed), all of them, or what a function of its
path says.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Event", "Recorder", "Trace", "UNSYNCED", "fingerprint", "materialize", "say_at_end"
]  # fmt: skip

# What a file that was never fsynced holds in a state: see Trace.state.
UNSYNCED = ("empty", "zeros", "torn", "whole")

_WRAPPED = ("open", "close", "fsync", "fdatasync", "replace", "rename", "unlink", "remove",
            "rmdir", "mkdir")  # fmt: skip


@dataclass(frozen=True)
class Event:
    """One recorded call. ``effects``: (directory node, name, node added or None for a
    name removed), applied together (a rename is atomic). ``synced``: the node an fsync
    made durable and what it holds (bytes of a file; name -> node of a directory).
    ``closed``: a created file's node and its bytes when closed. ``mark``: a marker."""

    kind: str
    path: str = ""
    effects: tuple[tuple[int, str, int | None], ...] = ()
    synced: tuple[int, bytes | dict[str, int]] | None = None
    closed: tuple[int, bytes] | None = None
    mark: str = ""


@dataclass
class Trace:
    """What a Recorder recorded: the events, each node's kind and first path, and what
    existed when recording began (taken as durable): each directory's listing, each
    file's bytes."""

    root: int
    events: list[Event] = field(default_factory=list)
    kinds: dict[int, str] = field(default_factory=dict)  # node -> "file" or "dir"
    paths: dict[int, str] = field(default_factory=dict)  # node -> path where it was made
    initial: dict[int, dict[str, int]] = field(default_factory=dict)
    initial_bytes: dict[int, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # what the recorder could not follow

    def markers(self) -> list[tuple[int, str]]:
        """(index, text) of every marker, in order."""
        return [(i, event.mark) for i, event in enumerate(self.events) if event.kind == "mark"]

    def fsyncs(self) -> list[int]:
        """The index of every fsync (or fdatasync), in order."""
        return [i for i, event in enumerate(self.events) if event.synced is not None]

    def state(
        self,
        point: int,
        *,
        replay: int | None = None,
        unsynced: str | Callable[[str, bytes], bytes] = "empty",
    ) -> dict:
        """The tree a power loss after ``events[:point]`` may leave: name -> bytes (a
        file) or a dict (a directory), from the recorded directory down. ``unsynced``
        is one of UNSYNCED, or a function of a never-fsynced file's path when it was
        made and its final bytes that returns what it holds."""
        if not callable(unsynced) and unsynced not in UNSYNCED:
            raise ValueError(f"unsynced must be one of {UNSYNCED}, not {unsynced!r}")
        synced: dict[int, tuple[int, bytes | dict[str, int]]] = {}
        closed: dict[int, bytes] = {}
        for index, event in enumerate(self.events[:point]):
            if event.synced is not None:
                synced[event.synced[0]] = (index, event.synced[1])
            if event.closed is not None:
                closed[event.closed[0]] = event.closed[1]
        until = point if replay is None else min(point, replay)

        def listing(directory: int) -> dict[str, int]:
            since, names = synced.get(directory, (-1, self.initial.get(directory, {})))
            names = dict(names)
            for event in self.events[since + 1 : until] if replay is not None else ():
                for where, name, node in event.effects:
                    if where != directory:
                        continue
                    if node is None:
                        names.pop(name, None)
                    else:
                        names[name] = node
            return names

        def content(node: int) -> bytes:
            if node in synced:
                return synced[node][1]
            if node in self.initial_bytes:
                return self.initial_bytes[node]
            final = closed.get(node, b"")
            if callable(unsynced):
                return unsynced(self.paths[node], final)
            if unsynced == "zeros":
                return bytes(len(final))
            if unsynced == "torn":
                return final[: len(final) // 2]
            return final if unsynced == "whole" else b""

        def tree(directory: int, seen: frozenset[int]) -> dict:
            out: dict = {}
            for name, node in sorted(listing(directory).items()):
                if self.kinds.get(node) == "dir":
                    if node not in seen:  # a cycle no file system makes: not followed
                        out[name] = tree(node, seen | {node})
                else:
                    out[name] = content(node)
            return out

        return tree(self.root, frozenset({self.root}))


def fingerprint(tree: dict) -> str:
    """A digest of a tree's names and bytes: equal states open alike."""
    digest = hashlib.blake2b(digest_size=16)

    def walk(node: dict, prefix: str) -> None:
        for name in sorted(node):
            value = node[name]
            digest.update(f"{prefix}/{name}\0".encode())
            if isinstance(value, dict):
                digest.update(b"d")
                walk(value, f"{prefix}/{name}")
            else:
                digest.update(b"f%d\0" % len(value))
                digest.update(value)

    walk(tree, "")
    return digest.hexdigest()


def materialize(tree: dict, target: Path) -> None:
    """Write ``tree`` under the existing directory ``target``."""
    for name, value in tree.items():
        path = target / name
        if isinstance(value, dict):
            path.mkdir()
            materialize(value, path)
        else:
            path.write_bytes(value)


class _SummaryLines:
    """The lines the power-loss tests print at the end of the run."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        for line in self.lines:
            terminalreporter.write_line(line)


def say_at_end(config, line: str) -> None:
    """Print ``line`` in pytest's terminal summary (``config``: the pytest config)."""
    plugin = config.pluginmanager.get_plugin("power-loss-summary")
    if plugin is None:
        plugin = _SummaryLines()
        config.pluginmanager.register(plugin, "power-loss-summary")
    plugin.lines.append(line)


class Recorder:
    """Records the durability-deciding calls on paths under ``root`` (see the module's
    docstring); ``install(monkeypatch)`` wraps them, ``mark(text)`` inserts a marker.
    Thread-safe: every wrapped call runs and is recorded under one lock, so the events
    are in the order the calls took effect."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = os.path.realpath(root)
        self._real = {name: getattr(os, name) for name in _WRAPPED}
        self._lock = threading.RLock()
        self._ids = itertools.count()
        self._by_inode: dict[int, int] = {}  # st_ino -> node, for the inodes there now
        self._created: dict[int, int] = {}  # fd -> node of a file created through it
        self.trace = Trace(root=0)
        self.trace.root = self._new_node(self.root, "dir")
        self._scan(self.root, self.trace.root)

    # ------------------------------------------------------------ bookkeeping

    def _new_node(self, path: str, kind: str) -> int:
        node = next(self._ids)
        self._by_inode[os.lstat(path).st_ino] = node
        self.trace.kinds[node] = kind
        self.trace.paths[node] = path
        return node

    def _scan(self, path: str, node: int) -> None:
        """Nodes for what exists under ``root`` already (it counts as durable)."""
        names = {}
        for entry in os.scandir(path):
            kind = "dir" if entry.is_dir(follow_symlinks=False) else "file"
            child = self._new_node(entry.path, kind)
            names[entry.name] = child
            if kind == "dir":
                self._scan(entry.path, child)
            else:
                with open(entry.path, "rb") as handle:
                    self.trace.initial_bytes[child] = handle.read()
        self.trace.initial[node] = names

    def _node(self, path: str) -> int:
        """The node of an existing path: one the recorder saw made (or found)."""
        inode = os.lstat(path).st_ino
        if inode not in self._by_inode:
            self.trace.problems.append(f"{path} was made by a call the recorder does not wrap")
            return self._new_node(path, "dir" if os.path.isdir(path) else "file")
        return self._by_inode[inode]

    def _resolve(self, path, dir_fd: int | None = None) -> str | None:
        """The absolute path of ``path`` (relative to ``dir_fd``), or None outside root."""
        if isinstance(path, int):
            return None
        text = os.fsdecode(os.fspath(path))
        if dir_fd is not None and not os.path.isabs(text):
            text = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), text)
        head, tail = os.path.split(os.path.abspath(text))
        full = os.path.join(os.path.realpath(head), tail)
        return full if full == self.root or full.startswith(self.root + os.sep) else None

    def _record(self, event: Event) -> None:
        self.trace.events.append(event)

    def _split(self, path: str) -> tuple[int, str]:
        head, tail = os.path.split(path)
        return self._node(head), tail

    @staticmethod
    def _bytes_of(fd: int) -> bytes:
        """The bytes of the file open as ``fd`` (a second, buffered descriptor: the
        first may be O_DIRECT or write-only)."""
        with open(f"/proc/self/fd/{fd}", "rb") as handle:
            return handle.read()

    # ------------------------------------------------------------ wrappers

    def mark(self, text: str) -> None:
        with self._lock:
            self._record(Event("mark", mark=text))

    def install(self, monkeypatch) -> None:
        """Wrap the calls (undone by monkeypatch; stop every thread using the tree first)."""
        for name in _WRAPPED:
            monkeypatch.setattr(os, name, getattr(self, f"_{name}"))

    def _open(self, path, flags, mode=0o777, *, dir_fd=None):
        full = self._resolve(path, dir_fd)
        if full is None:
            return self._real["open"](path, flags, mode, dir_fd=dir_fd)
        with self._lock:
            new = bool(flags & os.O_CREAT) and not os.path.lexists(full)
            fd = self._real["open"](path, flags, mode, dir_fd=dir_fd)
            if new:
                directory, name = self._split(full)
                node = self._new_node(full, "file")
                self._created[fd] = node
                self._record(Event("create", full, effects=((directory, name, node),)))
            return fd

    def _close(self, fd):
        with self._lock:
            node = self._created.pop(fd, None)
            if node is not None:
                data = self._bytes_of(fd)
                self._record(Event("close", self.trace.paths[node], closed=(node, data)))
            return self._real["close"](fd)

    def _sync(self, name: str, fd: int) -> None:
        with self._lock:
            self._real[name](fd)
            target = os.readlink(f"/proc/self/fd/{fd}")
            if self._resolve(target.removesuffix(" (deleted)")) is None:
                return
            status = os.fstat(fd)
            node = self._by_inode.get(status.st_ino)
            if node is None:
                self.trace.problems.append(f"fsync of {target}, made by an unwrapped call")
                return
            if stat.S_ISDIR(status.st_mode):
                names = {entry: self._node(os.path.join(target, entry)) for entry in os.listdir(fd)}
                self._record(Event("fsync", target, synced=(node, names)))
            else:
                self._record(Event("fsync", target, synced=(node, self._bytes_of(fd))))

    def _fsync(self, fd):
        self._sync("fsync", fd)

    def _fdatasync(self, fd):
        self._sync("fdatasync", fd)

    def _move(self, name: str, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        source = self._resolve(src, src_dir_fd)
        target = self._resolve(dst, dst_dir_fd)
        if source is None and target is None:
            return self._real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
        with self._lock:
            node = self._node(source) if source is not None else None
            self._real[name](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)
            effects = []
            if source is not None:
                effects.append((*self._split(source), None))
            if target is not None:
                node = self._node(target) if node is None else node
                effects.append((*self._split(target), node))
            self._record(Event(name, f"{source} -> {target}", effects=tuple(effects)))

    def _replace(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        self._move("replace", src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def _rename(self, src, dst, *, src_dir_fd=None, dst_dir_fd=None):
        self._move("rename", src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def _removal(self, name: str, path, dir_fd) -> None:
        full = self._resolve(path, dir_fd)
        if full is None:
            return self._real[name](path, dir_fd=dir_fd)
        with self._lock:
            directory, entry = self._split(full)
            self._real[name](path, dir_fd=dir_fd)
            self._record(Event(name, full, effects=((directory, entry, None),)))

    def _unlink(self, path, *, dir_fd=None):
        self._removal("unlink", path, dir_fd)

    def _remove(self, path, *, dir_fd=None):
        self._removal("remove", path, dir_fd)

    def _rmdir(self, path, *, dir_fd=None):
        self._removal("rmdir", path, dir_fd)

    def _mkdir(self, path, mode=0o777, *, dir_fd=None):
        full = self._resolve(path, dir_fd)
        if full is None:
            return self._real["mkdir"](path, mode, dir_fd=dir_fd)
        with self._lock:
            self._real["mkdir"](path, mode, dir_fd=dir_fd)
            directory, name = self._split(full)
            node = self._new_node(full, "dir")
            self._record(Event("mkdir", full, effects=((directory, name, node),)))
