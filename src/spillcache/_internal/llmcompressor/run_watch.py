"""A calibration run watched subgraph by subgraph: a line each on stderr, and a JSON line
each in a metrics file (docs/watching.md gives the lines and the file's schema).

llm-compressor's sequential pipeline (and resumable_pipeline.py, its copy) shows each
pass over the batches as a tqdm bar described ``(i/N): Calibrating`` or ``(i/N):
Propagating``, and ends with ``LifecycleCallbacks.calibration_end()``. While spillcache
is enabled, ``hook_pipeline`` wraps those two names of the pipeline module (the switch
does it when its first cache is built, and puts them back when it is disabled): a pass
of a new subgraph closes the one before it, ``calibration_end`` the last one and the
run. Closing a subgraph reads the switch's figures (every cache built through it) and
this process's memory, and reports what changed since the last line.

A ``RunWatch`` is used by the thread running the pipeline only: it has no lock. A
metrics file that cannot be written is warned about once and no longer written: a
calibration of hours is not stopped for its metrics.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from spillcache.errors import ConfigError

from ..text import format_bytes

if TYPE_CHECKING:
    from ..runtime.core import CacheCore

__all__ = [
    "METRICS_PATH_VARIABLE",
    "METRICS_VERSION",
    "PROGRESS_VARIABLE",
    "RunWatch",
    "hook_pipeline",
    "process_memory",
    "watch_options",
]

METRICS_VERSION = 1
PROGRESS_VARIABLE = "SPILLCACHE_PROGRESS"
METRICS_PATH_VARIABLE = "SPILLCACHE_METRICS_PATH"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")
_SUBGRAPH = re.compile(r"\((\d+)/(\d+)\)")


def watch_options(
    progress: bool | None, metrics_path: str | os.PathLike[str] | None
) -> dict[str, Any]:
    """``enable``'s ``progress`` and ``metrics_path``, else their variables, checked:
    ConfigError naming the option or variable, and the fix, for a bad one."""
    if progress is None:
        text = os.environ.get(PROGRESS_VARIABLE, "").strip().lower()
        if text and text not in _OFF + _ON:
            raise ConfigError(
                f"{PROGRESS_VARIABLE}={os.environ[PROGRESS_VARIABLE]!r} is not a switch: "
                f"set it to 0 (no progress lines) or 1"
            )
        progress = text not in _OFF
    where = "metrics_path"
    if metrics_path is None and os.environ.get(METRICS_PATH_VARIABLE):
        metrics_path, where = os.environ[METRICS_PATH_VARIABLE], METRICS_PATH_VARIABLE
    path = None if metrics_path is None else Path(metrics_path).expanduser().absolute()
    if path is not None:
        if path.is_dir():
            raise ConfigError(
                f"{where} {str(path)!r} is a directory: name a file in it, e.g. "
                f"{str(path / 'metrics.jsonl')!r}"
            )
        if not path.parent.is_dir():
            raise ConfigError(
                f"{where} {str(path)!r}: the directory {str(path.parent)!r} does not exist; "
                "create it first or name a file in an existing directory"
            )
        if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise ConfigError(
                f"{where} {str(path)!r} cannot be written by this process: name a file in "
                "a directory it may write to"
            )
    return {"progress": bool(progress), "metrics_path": path}


def total_ram() -> int:
    """Bytes of memory this process can ever have (the machine's RAM, or its cgroup's
    limit where lower), for the metrics file."""
    from ..sysinfo import ram_limit

    return ram_limit()[0]


class Figures(Protocol):
    """What a run's caches did so far (the switch gives them)."""

    def figures(self, *, reset_peak: bool = False) -> dict[str, Any]: ...


def process_memory() -> tuple[int, int]:
    """This process's resident bytes now and at most so far (VmRSS, VmHWM); zeros where
    /proc is missing."""
    found = {"VmRSS:": 0, "VmHWM:": 0}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                fields = line.split()
                if fields and fields[0] in found:
                    found[fields[0]] = int(fields[1]) * 1024
    except OSError:
        pass
    return found["VmRSS:"], found["VmHWM:"]


def _rank() -> tuple[int, int]:
    from ..process.resolved import rank_info  # reads the environment: only when a run starts

    info = rank_info()
    return (0, 1) if info is None else (info.rank, info.world_size)


class RunWatch:
    """One switch's runs: ``begin`` when its first cache is built, ``pass_started`` for
    each pass's bar, ``finish`` at ``calibration_end``."""

    def __init__(
        self,
        source: Figures,
        *,
        progress: bool,
        metrics_path: Path | None,
        write: Callable[[str], None] | None = None,
    ) -> None:
        self._source = source
        self._progress = progress
        self._metrics_path = metrics_path
        self._write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._running = False
        self._speaks = False
        self._broken = False  # something failed: the watch stopped, the run goes on
        self._fd: int | None = None
        self._spent = 0.0  # seconds this watch took from the run (reported at the end)

    def safely(self, event: Callable[..., None], *args: Any) -> None:
        """Run one of the events below; whatever it raises (a figure that cannot be
        read, a closed stderr) stops the watch with one warning, never the run."""
        if self._broken:
            return
        try:
            event(*args)
        except Exception as error:  # the calibration matters more than its progress lines
            self._broken = True
            self._close_metrics()
            warnings.warn(
                f"spillcache stopped its progress lines and metrics file ({error!r}); "
                "the run goes on",
                stacklevel=3,
            )

    # ----------------------------------------------------------- the run's events

    def cache_built(self, core: CacheCore) -> None:
        """A cache was built: starts a run if none is running, with the setting of the
        cache's pool and config."""
        budgets = core.pool.budgets
        self.begin(
            {
                "host_budget_bytes": budgets.host_bytes,
                "host_tier_bytes": budgets.host_tier_bytes,
                "write_behind_bytes": core.config.write_behind_bytes,
                "read_buffer_bytes": core.config.read_buffer_bytes,
                "eviction": core.config.eviction,
                "disk_paths": [str(path) for path in core.pool.disk_dirs],
                "ram_bytes": total_ram(),
            }
        )

    def begin(self, setting: dict[str, Any]) -> None:
        """A cache was built (``setting``: its budgets and disk paths); starts a run if
        none is running."""
        self._setting = setting
        if self._running:
            return
        started = time.perf_counter()
        self._running = True
        self._rank, self._world = _rank()
        # Under torchrun rank 0 speaks for the job (every rank's figures go to the file).
        self._speaks = self._progress and self._rank == 0
        self._prefix = (
            "spillcache: " if self._world == 1 else f"spillcache [rank 0 of {self._world}]: "
        )
        self._start = self._last = time.perf_counter()
        self._base = self._previous = self._source.figures(reset_peak=True)
        self._subgraph: tuple[int, int] | None = None
        self._calibrated = False  # the current subgraph's calibrating pass began
        self._done = 0
        self._values_peak = 0  # the run's: the most of any subgraph's
        self._open_metrics()
        self._record({"event": "start", **setting})
        where = ", ".join(setting["disk_paths"]) or "no disk (disk_path is None)"
        self._say(
            f"host RAM budget {format_bytes(setting['host_budget_bytes'])} "
            f"(its host tier {format_bytes(setting['host_tier_bytes'])}), spilling to {where}"
            + (f"; metrics to {self._metrics_path}" if self._fd is not None else "")
        )
        self._spent += time.perf_counter() - started

    def pass_started(self, desc: object) -> None:
        """A pass over the batches begins (its bar's description)."""
        found = _SUBGRAPH.search(desc) if isinstance(desc, str) else None
        if not self._running or found is None:
            return
        subgraph = (int(found.group(1)), int(found.group(2)))
        calibrating = "Calibrating" in desc
        again = subgraph == self._subgraph and calibrating and self._calibrated
        if self._subgraph is not None and (subgraph < self._subgraph or again):
            # An earlier subgraph, or this one's calibrating pass, again: a new calibration
            # with the same switch, the last one having ended without calibration_end (an
            # exception, then a retry).
            self.finish(error="a new calibration began before this one ended")
            self.begin(self._setting)
        started = time.perf_counter()
        if self._subgraph is not None and subgraph != self._subgraph:
            self._close_subgraph()
        self._calibrated = calibrating or (subgraph == self._subgraph and self._calibrated)
        self._subgraph = subgraph
        self._spent += time.perf_counter() - started

    def finish(self, error: BaseException | str | None = None) -> None:
        """The calibration ended (``error``: why it ended early): the last subgraph's
        line, then the run's."""
        if not self._running:
            return
        started = time.perf_counter()
        if self._subgraph is not None:
            self._close_subgraph()
        now = self._source.figures()
        rss, rss_peak = process_memory()
        seconds = time.perf_counter() - self._start
        self._spent += time.perf_counter() - started
        totals = {
            "subgraphs_done": self._done,
            "seconds": seconds,
            **_traffic(self._base, now),
            "values_peak_bytes": self._values_peak,
            "host_peak_bytes": now["host_peak_bytes"],
            "host_tier_budget_bytes": now["host_tier_budget_bytes"],
            "rss_bytes": rss,
            "rss_peak_bytes": rss_peak,
            "watch_seconds": self._spent,
            "error": _error_text(error),
        }
        self._record({"event": "end", **totals})
        ended = "done" if error is None else f"ended early ({_error_text(error)})"
        self._say(
            f"{ended}: {self._done} subgraph{'s' if self._done != 1 else ''} in {seconds:.1f} s; "
            f"wrote {format_bytes(totals['written_bytes'])}, read "
            f"{format_bytes(totals['read_bytes'])}, stalled {totals['stall_seconds']:.2f} s; "
            f"host tier peak {format_bytes(now['host_peak_bytes'])} of "
            f"{format_bytes(now['host_tier_budget_bytes'])}, RSS peak {format_bytes(rss_peak)}"
            + (f"; see `spillcache report {self._metrics_path}`" if self._fd is not None else "")
        )
        self._close_metrics()
        self._running = False

    # ----------------------------------------------------------------- figures

    def _close_subgraph(self) -> None:
        assert self._subgraph is not None
        now = self._source.figures(reset_peak=True)
        clock = time.perf_counter()
        seconds = clock - self._last
        self._values_peak = max(self._values_peak, now["values_peak_bytes"])
        rss, rss_peak = process_memory()
        index, count = self._subgraph
        figures = {
            "subgraph": index,
            "subgraphs": count,
            "seconds": seconds,
            "elapsed_seconds": clock - self._start,
            **_traffic(self._previous, now),
            **{key: now[key] for key in _HELD},
            "values_peak_bytes": now["values_peak_bytes"],
            "rss_bytes": rss,
            "rss_peak_bytes": rss_peak,
        }
        self._record({"event": "subgraph", **figures})
        self._say(_subgraph_line(figures))
        self._previous, self._last = now, clock
        self._done += 1

    # ---------------------------------------------------------------- output

    def _say(self, text: str) -> None:
        if self._speaks:
            self._write(self._prefix + text)

    def _open_metrics(self) -> None:
        if self._metrics_path is None:
            return
        try:
            self._fd = os.open(
                self._metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
            # A line an earlier run tore (a full disk) ends here, not inside our first.
            with open(self._metrics_path, "rb") as existing:
                if existing.seek(0, os.SEEK_END):  # not empty: does its last line end?
                    existing.seek(-1, os.SEEK_END)
                    if existing.read(1) != b"\n":
                        os.write(self._fd, b"\n")
        except OSError as error:
            self._metrics_failed(error)

    def _record(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        record = {"version": METRICS_VERSION, "time": time.time(), "rank": self._rank,
                  "world": self._world, "pid": os.getpid(), **record}  # fmt: skip
        # One write of one line: lines of several ranks appending to one file stay whole.
        line = (json.dumps(record) + "\n").encode()
        try:
            if os.write(self._fd, line) != len(line):
                raise OSError(f"wrote part of a {len(line)}-byte line")
        except OSError as error:
            self._metrics_failed(error)

    def _metrics_failed(self, error: OSError) -> None:
        warnings.warn(
            f"spillcache could not write the metrics file {self._metrics_path} "
            f"({error.strerror or error}); the run goes on without it",
            stacklevel=4,
        )
        self._close_metrics()

    def _close_metrics(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def _error_text(error: BaseException | str | None) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return f"{type(error).__name__}: {error}"


# Figures of the caches held now (not changes): reported as they are at a line.
_HELD = ("host_bytes", "host_tier_budget_bytes", "device_bytes", "disk_bytes", "values_bytes")


def _traffic(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    return {
        "written_bytes": after["disk_written_bytes"] - before["disk_written_bytes"],
        "read_bytes": after["disk_read_bytes"] - before["disk_read_bytes"],
        "stall_seconds": after["stall_seconds"] - before["stall_seconds"],
    }


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / seconds / 1e9:.2f} GB/s" if seconds > 0 else "-"


def _subgraph_line(f: dict[str, Any]) -> str:
    seconds = f["seconds"]
    device = f", device {format_bytes(f['device_bytes'])}" if f["device_bytes"] else ""
    return (
        f"subgraph {f['subgraph']}/{f['subgraphs']} ({seconds:.1f} s): "
        f"host {format_bytes(f['host_bytes'])}/{format_bytes(f['host_tier_budget_bytes'])}"
        f"{device}, disk {format_bytes(f['disk_bytes'])}, "
        f"wrote {format_bytes(f['written_bytes'])} ({_rate(f['written_bytes'], seconds)}), "
        f"read {format_bytes(f['read_bytes'])} ({_rate(f['read_bytes'], seconds)}), "
        f"stalled {f['stall_seconds']:.2f} s, RSS {format_bytes(f['rss_bytes'])}"
    )


def hook_pipeline(module: ModuleType, watch: RunWatch) -> Callable[[], None]:
    """Wrap the pipeline module's ``tqdm`` and ``LifecycleCallbacks`` so that ``watch``
    hears of every pass and of the calibration's end; returns what puts them back.
    Where the module has no such names (another llm-compressor version) nothing is
    wrapped: one warning, and the run has no progress lines."""
    stock_tqdm = vars(module).get("tqdm")
    stock_callbacks = vars(module).get("LifecycleCallbacks")
    if not callable(stock_tqdm) or not isinstance(stock_callbacks, type):
        warnings.warn(
            f"{module.__name__} has no tqdm or LifecycleCallbacks to watch: spillcache "
            "prints no progress lines and writes no metrics for its runs",
            stacklevel=3,
        )
        return lambda: None

    def tqdm(*args: Any, **kwargs: Any) -> Any:
        watch.safely(watch.pass_started, kwargs.get("desc"))
        return stock_tqdm(*args, **kwargs)

    class LifecycleCallbacks(stock_callbacks):  # type: ignore[misc, valid-type]
        @classmethod
        def calibration_end(cls, **kwargs: Any) -> Any:
            watch.safely(watch.finish)  # the caches' work is done; compression follows
            return super().calibration_end(**kwargs)

    LifecycleCallbacks.__qualname__ = stock_callbacks.__qualname__
    vars(module)["tqdm"] = tqdm
    vars(module)["LifecycleCallbacks"] = LifecycleCallbacks

    def unhook() -> None:
        if vars(module).get("tqdm") is tqdm:
            vars(module)["tqdm"] = stock_tqdm
        if vars(module).get("LifecycleCallbacks") is LifecycleCallbacks:
            vars(module)["LifecycleCallbacks"] = stock_callbacks

    return unhook
