"""Processes that run a script, forked from a server that imported its heavy modules once.

A test that runs the ``spillcache`` console script, or a child script it kills, pays
about 3 s a process on the development VM for importing torch in the new interpreter (a
script that imports llm-compressor, about 10 s), where what the process does takes a
fraction of that. ``run`` and ``Child`` fork each process instead from a server started
once per set of modules (``preload``), which imported them and has done nothing else.
Each is still a process of its own: its own pid, argv, environment, working directory
and standard streams (the files or pipes the caller gives it, as ``subprocess`` does),
signals at their defaults, the script run as ``__main__`` with its directory first on
``sys.path``, and an end through the interpreter's exit (an uncaught exception printed,
atexit handlers and finalizers run) or by the signal that killed it, its exit status
given as ``subprocess`` gives it (-N: killed by signal N). What such a process cannot
show is what importing the preloaded modules does in a new interpreter (a warning it
prints, say): the tests that check that start the script with ``subprocess`` itself.

``python preloaded.py FD MODULE...`` is the server: it imports the modules, then takes
requests on the socket FD (a JSON message: argv, environment, directory, and the three
file descriptors to use as stdin, stdout and stderr), forks a process for each, answers
its pid, and answers its exit status once it ends. Processes may run at the same time.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import io
import itertools
import json
import locale
import os
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["Child", "run"]

START_TIMEOUT_S = 300  # for the server to import its modules, and to answer a pid


class _Server:
    """The client's side of one server: its process, and what it answered."""

    def __init__(self, preload: tuple[str, ...]) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="preloaded-server-", suffix=".log")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = subprocess.Popen(
            [sys.executable, __file__, str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=self.log,
            cwd=Path(__file__).parent,
            # Read when a process starts, never at import: each one's environment is its own.
            env={k: v for k, v in os.environ.items() if not k.startswith("SPILLCACHE_")},
        )
        theirs.close()
        self.socket = ours
        self.changed = threading.Condition()
        self.answers: list[dict] = []  # every answer, in order
        self.statuses: dict[int, int] = {}  # pid -> exit status, once it ended
        self.ended = False
        self.ids = itertools.count()
        threading.Thread(target=self._read, name="preloaded-answers", daemon=True).start()
        self._answer(lambda a: a.get("ready"), time.monotonic() + START_TIMEOUT_S)

    def _read(self) -> None:
        try:
            while data := self.socket.recv(1 << 16):
                answer = json.loads(data)
                with self.changed:
                    self.answers.append(answer)
                    if "status" in answer:
                        self.statuses[answer["pid"]] = answer["status"]
                    self.changed.notify_all()
        except OSError:
            pass  # the socket closed under us: the server is being closed
        finally:
            with self.changed:
                self.ended = True
                self.changed.notify_all()

    def _log_text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def _answer(self, wanted, deadline: float) -> dict:
        with self.changed:
            while True:
                found = next((answer for answer in self.answers if wanted(answer)), None)
                if found is not None:
                    return found
                if self.ended:
                    raise RuntimeError(f"the preloading server ended: {self._log_text()}")
                if not self.changed.wait(max(0.0, deadline - time.monotonic())):
                    if time.monotonic() >= deadline:
                        raise RuntimeError(f"the preloading server is stuck: {self._log_text()}")

    def start(self, request: dict, fds: Sequence[int]) -> int:
        """Fork a process for ``request`` with ``fds`` as its stdin, stdout and stderr;
        its pid."""
        request = {**request, "id": next(self.ids)}
        socket.send_fds(self.socket, [json.dumps(request).encode()], list(fds))
        deadline = time.monotonic() + START_TIMEOUT_S
        return self._answer(lambda a: a.get("id") == request["id"], deadline)["pid"]

    def status(self, pid: int, timeout: float | None) -> int | None:
        """The exit status of process ``pid`` (-N: killed by signal N); None if it has
        not ended within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while pid not in self.statuses:
                if self.ended:
                    raise RuntimeError(f"the preloading server ended: {self._log_text()}")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                self.changed.wait(left)
            return self.statuses[pid]

    def close(self) -> None:
        self.socket.shutdown(socket.SHUT_RDWR)  # the server's loop ends with its requests
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.socket.close()
        self.log.close()


_servers: dict[tuple[str, ...], _Server] = {}
_servers_lock = threading.Lock()


def _server(preload: Sequence[str]) -> _Server:
    key = tuple(preload)
    with _servers_lock:
        if key not in _servers:
            _servers[key] = _Server(key)
        return _servers[key]


@atexit.register
def _close_servers() -> None:
    while _servers:
        _servers.popitem()[1].close()


def _request(argv: Sequence[str], env: Mapping[str, str] | None, cwd) -> dict:
    return {
        "argv": list(argv),
        "env": dict(os.environ if env is None else env),
        "cwd": os.fspath(os.getcwd() if cwd is None else cwd),
    }


def _text(data: bytes) -> str:
    """Output as ``subprocess.run(text=True)`` decodes it (universal newlines)."""
    encoding = locale.getpreferredencoding(False)
    return io.TextIOWrapper(io.BytesIO(data), encoding=encoding).read()


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    preload: Sequence[str],
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run([sys.executable, *argv], capture_output=True, text=True, ...)``
    (``argv[0]``: a script, or ``-c`` and the code; stdin: empty), in a process forked
    from a server that imported the modules ``preload`` names. ``env`` and ``cwd``:
    this process's by default. Past ``timeout`` the process is killed and
    subprocess.TimeoutExpired raised, as subprocess.run does."""
    argv = [os.fspath(word) for word in argv]
    server = _server(preload)
    scratch = Path(tempfile.mkdtemp(prefix="preloaded-run-"))
    try:
        files = [
            os.open(os.devnull, os.O_RDONLY),
            os.open(scratch / "stdout", os.O_WRONLY | os.O_CREAT, 0o600),
            os.open(scratch / "stderr", os.O_WRONLY | os.O_CREAT, 0o600),
        ]
        try:
            pid = server.start(_request(argv, env, cwd), files)
        finally:
            for fd in files:
                os.close(fd)
        status = server.status(pid, timeout)
        if status is None:
            _kill(pid)
            server.status(pid, None)
            raise subprocess.TimeoutExpired([sys.executable, *argv], timeout)
        out, err = (scratch / "stdout").read_bytes(), (scratch / "stderr").read_bytes()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return subprocess.CompletedProcess([sys.executable, *argv], status, _text(out), _text(err))


def _kill(pid: int, signum: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass  # it ended meanwhile


class Child:
    """``subprocess.Popen([sys.executable, *argv], stdin=PIPE, stdout=PIPE,
    stderr=PIPE, text=True)``, forked from a server that imported ``preload``: the
    same attributes and methods (pid, returncode, the three pipes, poll, wait,
    communicate, send_signal, terminate, kill)."""

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        preload: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.args = [sys.executable, *(os.fspath(word) for word in argv)]
        self.returncode: int | None = None
        self._server = _server(preload)
        stdin, stdout, stderr = os.pipe(), os.pipe(), os.pipe()
        try:
            self.pid = self._server.start(
                _request(self.args[1:], env, cwd), [stdin[0], stdout[1], stderr[1]]
            )
        except BaseException:
            for fd in (*stdin, *stdout, *stderr):
                os.close(fd)
            raise
        for fd in (stdin[0], stdout[1], stderr[1]):
            os.close(fd)
        # As Popen(text=True) makes them.
        self.stdin = io.TextIOWrapper(open(stdin[1], "wb"), write_through=True)  # noqa: SIM115
        self.stdout = io.TextIOWrapper(open(stdout[0], "rb"))  # noqa: SIM115
        self.stderr = io.TextIOWrapper(open(stderr[0], "rb"))  # noqa: SIM115

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._server.status(self.pid, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            status = self._server.status(self.pid, timeout)
            if status is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = status
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            _kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(
        self,
        input: str | None = None,  # noqa: A002  (Popen's name)
        timeout: float | None = None,
    ) -> tuple[str, str]:
        """Send ``input``, close stdin, read stdout and stderr to their ends, and wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if input:
            try:
                self.stdin.write(input)
            except BrokenPipeError:
                pass  # the process ended without reading it, as Popen allows
        try:
            self.stdin.close()
        except BrokenPipeError:
            pass
        read: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda n=name: read.__setitem__(n, getattr(self, n).read()))
            for name in ("stdout", "stderr")
        ]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.stdout.close()
        self.stderr.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return read["stdout"], read["stderr"]


# ------------------------------------------------------------------ the server


def _serve(channel: int, preload: list[str]) -> None:
    """Import ``preload``, then fork a process for each request. In a forked process
    this function never returns: the script's end (SystemExit, or an exception) goes up
    through it and ends the process as it ends an interpreter."""
    requests = socket.socket(fileno=channel)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for name in preload:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            # A module that moved: only an import saved, so the processes import it.
            print(f"preloaded.py: no module {name} to preload", file=sys.stderr, flush=True)
    # What was imported stays out of the collector's sight: a process's collections (the
    # last one at its exit) then do not write to, and so copy, every page of it.
    gc.freeze()
    # An ended process is reaped when it ends: SIGCHLD wakes the loop below.
    woken, wake = os.pipe()
    os.set_blocking(wake, False)
    signal.set_wakeup_fd(wake)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    requests.send(b'{"ready": true}')
    while True:
        ready, _, _ = select.select([requests, woken], [], [])
        if woken in ready:
            os.read(woken, 4096)
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                requests.send(json.dumps({"pid": pid, "status": code}).encode())
        if requests in ready:
            message, fds, _, _ = socket.recv_fds(requests, 1 << 20, 3)
            if not message:
                return  # the client closed: no more requests
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (woken, wake):
                    os.close(fd)
                requests.close()
                _become(request, fds)
            for fd in fds:
                os.close(fd)
            requests.send(json.dumps({"id": request["id"], "pid": pid}).encode())


def _become(request: dict, fds: list[int]) -> None:
    """In the forked process: its standard streams, environment and directory, then its
    script as ``__main__``; a script that returns exits 0, as an interpreter does."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # The standard streams as a new interpreter makes them where none is a terminal:
    # stdout block-buffered, stderr line-buffered; with PYTHONUNBUFFERED, neither.
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = locale.getpreferredencoding(False)
    for name, fd, errors in ((0, 0, "strict"), (1, 1, "strict"), (2, 2, "backslashreplace")):
        raw = open(fd, "rb" if fd == 0 else "wb", buffering=0, closefd=False)  # noqa: SIM115
        if fd == 0:
            binary = io.BufferedReader(raw)
        else:
            binary = raw if unbuffered else io.BufferedWriter(raw)
        stream = io.TextIOWrapper(
            binary, encoding=encoding, errors=errors, line_buffering=fd == 2,
            write_through=unbuffered and fd != 0,
        )  # fmt: skip
        attribute = ("stdin", "stdout", "stderr")[name]
        setattr(sys, attribute, stream)
        setattr(sys, f"__{attribute}__", stream)
    argv = request["argv"]
    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        main = types.ModuleType("__main__")
        sys.modules["__main__"] = main
        exec(compile(argv[1], "<string>", "exec"), main.__dict__)
    else:
        sys.argv = list(argv)
        sys.path[0] = str(Path(argv[0]).resolve().parent)
        runpy.run_path(argv[0], run_name="__main__")
    sys.exit(0)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2:])
