"""Draws docs/img/architecture.svg: spillcache's modules by layer, the thread that runs
each, and the steps of an update to disk and of a fetch back, named as in the code.

    python docs/img/draw_architecture.py           # redraw the picture
    python docs/img/draw_architecture.py --check   # exit 1 if it is out of date

MODULES and PATHS below are the picture's only input. Both commands (and
tests/unit/test_architecture_picture.py) fail, naming what to change, when a module of
src/spillcache has no line in MODULES, a line names a module that is gone, a step names
a function the code no longer defines, or the committed SVG differs from what this
draws: the picture cannot drift from the code unnoticed. Standard library only, so it
runs wherever the tests do; the output is deterministic (no dates, tables in order).
"""

from __future__ import annotations

import ast
import html
import math
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "spillcache"
SVG = Path(__file__).resolve().with_name("architecture.svg")
SCRIPT = "docs/img/draw_architecture.py"

# ---------------------------------------------------------------------------- threads
# Which thread runs a module's code, as docs/architecture.md ("Threads and ownership")
# describes it. A module that runs on several is drawn with the one that defines it:
# placement's code runs on the caller's thread and on I/O lanes, always under the lock.

CALLER = "caller"
LOCKED = "locked"
LANES = "lanes"
STREAMS = "streams"
SIGNAL = "signal"
COMMAND = "command"
ANY = "any"

THREADS = {  # key: (legend, fill, stroke)
    CALLER: ("the caller's thread, no lock held", "#dbeafe", "#3b82f6"),
    LOCKED: ("the pool's lock held (on the caller's thread or an I/O lane)", "#fde68a", "#d97706"),
    LANES: (
        "spillcache-io lanes: writes, deletions, prefetches (and a fetch's own reads)",
        "#bbf7d0",
        "#16a34a",
    ),
    STREAMS: ("CUDA side streams, joined by events", "#e9d5ff", "#9333ea"),
    SIGNAL: ("the signal handler (main thread); a new cache's sweep", "#fecaca", "#dc2626"),
    COMMAND: ("the spillcache command", "#e5e7eb", "#6b7280"),
    ANY: ("any thread: definitions and pure functions", "#ffffff", "#9ca3af"),
}

# ----------------------------------------------------------------------------- groups
# The layers, top (what users call) to bottom (the disk), then what serves them all.

PUBLIC = "public"
STATE = "state"
BYTES = "bytes"
STORE = "store"
PROCESS = "process"
CLI = "cli"

GROUPS = {  # key: (title, what it is)
    PUBLIC: ("public surface", "what users import, and what stock-API code reaches"),
    STATE: ("the cache's state", "one pool lock guards it all; no I/O, no waiting"),
    BYTES: ("moving bytes", "copies, flattening, reads, the I/O threads"),
    STORE: ("the store on disk", "zarr v3 layout, chunk files, durability, reading stores as data"),
    PROCESS: ("process-wide", "shared by every cache of a process"),
    CLI: ("command line", "spillcache config / plan / demo / inspect / verify / gc"),
}

# Rows of the picture: the groups side by side in each, and how many columns of
# modules each group takes (two columns fill the width).
LAYOUT = [[(PUBLIC, 2)], [(STATE, 2)], [(BYTES, 2)], [(STORE, 2)], [(PROCESS, 1), (CLI, 1)]]

# ---------------------------------------------------------------------------- modules
# Every module of src/spillcache, named as docs/architecture.md names it: its path
# under src/spillcache without ".py", and without "_internal/" for the internals.
# A module added, moved or removed there must be added, moved or removed here.

MODULES: dict[str, tuple[str, str, str]] = {  # module: (group, thread, what it owns)
    "__init__": (PUBLIC, ANY, "the public names: IntermediatesCache, CacheConfig, the errors"),
    "cache": (PUBLIC, CALLER, "IntermediatesCache: the documented API, iter_prefetch, finalizer"),
    "config": (PUBLIC, CALLER, "CacheConfig: every knob, parsed and validated once"),
    "errors": (PUBLIC, ANY, "the exception tree"),
    "stock_api": (PUBLIC, CALLER, "batch_intermediates as a live view; the stock helpers"),
    "stock_types": (PUBLIC, ANY, "IntermediateValue and OverrideEqMode as the stock class has"),
    "integrations/llmcompressor": (PUBLIC, CALLER, "enable/disable: llm-compressor rebound"),
    "core": (STATE, LOCKED, "CacheCore: batches, entries, generations; update, fetch, close"),
    "placement": (STATE, LOCKED, "Placement: each record's tier; admit, evict, spill, promote"),
    "records": (STATE, LOCKED, "TensorRecord, Entry, InlineTensor; the records by number"),
    "write_behind": (STATE, LOCKED, "values in RAM until their disk write lands"),
    "policy": (STATE, LOCKED, "scan and lru eviction policies: they only name victims"),
    "tenants": (STATE, LOCKED, "one cache's share of a pool; eviction across caches"),
    "rollback": (STATE, LOCKED, "a failed admit undone: the update stores and moves nothing"),
    "kept_copies": (STATE, LOCKED, "placement's part of a kept store's flush and close"),
    "failures": (STATE, LOCKED, "failed writes kept per cache, reported once; DiskFullError"),
    "stats": (STATE, LOCKED, "stats(): the placement's counters as one dict"),
    "tiers/budget": (STATE, LOCKED, "what every tier shares: items by record id, a byte budget"),
    "tiers/memory": (STATE, LOCKED, "the device and host tiers: tensors in memory"),
    "tiers/disk": (STATE, LOCKED, "the disk tier: bytes reserved per record, room per disk"),
    "offload": (BYTES, CALLER, "a value checked, flattened, copied off the GPU, before the lock"),
    "reads": (BYTES, LANES, "one fetch's disk reads: planned under the lock, read outside it"),
    "io_threads": (BYTES, LANES, "IOPool: the only module that starts threads; a lane per disk"),
    "buffers": (BYTES, LANES, "BufferPool: read destinations, reused once nothing holds them"),
    "transfers": (BYTES, STREAMS, "host <-> accelerator copies on side streams, with events"),
    "dtypes": (BYTES, ANY, "torch dtype <-> stored type; bit-exact moves and copies"),
    "tree": (BYTES, ANY, "nested values <-> spec and tensor leaves; specs <-> JSON"),
    "store_format": (STORE, LANES, "the layout's names; Store: made, opened, written, read"),
    "chunkio": (STORE, LANES, "one chunk file in or out: O_DIRECT, staging, .partial + rename"),
    "aio": (STORE, LANES, "Linux native AIO (io_submit) for chunkio's queued writes"),
    "persist": (STORE, CALLER, "a kept store made durable on flush() and close"),
    "reopen": (STORE, CALLER, "IntermediatesCache.open: a kept store back as a cache"),
    "store_checks": (STORE, CALLER, "a store read as data: names, links and sizes checked first"),
    "small_files": (STORE, CALLER, "zarr.json files read safely: no links, bounded size"),
    "summary": (STORE, COMMAND, "what a store holds, for inspect and verify"),
    "leftovers": (STORE, COMMAND, "what cut-short writes leave; gc of dead stores"),
    "pool": (PROCESS, LOCKED, "SharedPool: one lock, placement, I/O lanes per config"),
    "resolved": (PROCESS, CALLER, "a config resolved: auto sizes, rank shares, disks, device"),
    "ranks": (PROCESS, CALLER, "rank, node and run under torchrun; the store directory"),
    "sysinfo": (PROCESS, CALLER, "available RAM, filesystem type"),
    "owners": (PROCESS, SIGNAL, "who owns a store; this process's unkept stores"),
    "cleanup": (PROCESS, SIGNAL, "SIGTERM/SIGHUP removes own stores; dead ones swept"),
    "cli": (CLI, COMMAND, "the spillcache command: public API, store format"),
    "config_cli": (CLI, COMMAND, "spillcache config: settings and where each came from"),
    "plan_cli": (CLI, COMMAND, "spillcache plan: options, budgets per rank, report"),
    "plan": (CLI, COMMAND, "a run's cache calls replayed at a reduced scale"),
    "disk_probe": (CLI, COMMAND, "a few seconds of chunk files written and read"),
    "demo_cli": (CLI, COMMAND, "spillcache demo: options and summary"),
    "demo": (CLI, COMMAND, "a random-weight transformer calibrated through the cache"),
    "text": (CLI, COMMAND, "byte sizes and aligned tables as printed"),
}

# ------------------------------------------------------------------------------ paths
# Each step: the functions in call order, as "Class.method" or "module.function" (each
# is checked against the code), the thread it runs on (its box's colour), and why.


@dataclass(frozen=True)
class Step:
    calls: tuple[str, ...]
    thread: str
    on: str
    what: str


@dataclass(frozen=True)
class Route:
    letter: str
    title: str
    colour: str
    steps: tuple[Step, ...]
    disk_step: int  # the step (from 1) that touches the chunk file
    aside: Step | None = None  # a variant drawn after the steps, unnumbered


UPDATE = Route(
    "U",
    "update: a value from the caller to a chunk file",
    "#c2410c",
    (
        Step(
            (
                "IntermediatesCache.update",
                "CacheCore.update",
                "Offload.prepare",
                "Transfers.to_host",
            ),
            CALLER,
            "caller's thread, no lock",
            "checked and flattened; a GPU value bound for host memory copied there on a side "
            "stream (the caller waits for that copy's event only)",
        ),
        Step(
            (
                "CacheCore._wait_for_write_room",
                "CacheCore._store_prepared",
                "Placement.admit",
                "Placement._place_new",
            ),
            LOCKED,
            "caller's thread, pool lock held",
            "backpressure while the write-behind area is over budget; then each tensor goes to "
            "the first tier with room, all or nothing",
        ),
        Step(
            ("Placement._make_room", "Tenants.victims", "Placement._evict"),
            LOCKED,
            "caller's thread, pool lock held",
            "no room in the host tier: the policies' victims, across caches, move one tier down",
        ),
        Step(
            ("Placement._spill", "WriteBehind.queue"),
            LOCKED,
            "caller's thread, pool lock held",
            "a value bound for disk (new, or a victim) gets a disk and its bytes reserved, and "
            "waits in RAM in the write-behind area",
        ),
        Step(
            (
                "CacheCore._start_queued_disk_io",
                "SharedPool.start_queued_disk_io",
                "Placement.take_writes",
                "IOPool.submit",
            ),
            LOCKED,
            "caller's thread, pool lock held",
            "the queued writes go to their disk's lane at write priority; update returns",
        ),
        Step(
            ("SharedPool._write_to_disk", "Store.write_tensor", "chunkio.write_file"),
            LANES,
            "a spillcache-io lane, no lock",
            "the chunk written with O_DIRECT from staging buffers (pieces queued with native AIO) "
            "and its zarr.json beside it, each under a .partial name renamed into place",
        ),
        Step(
            ("Placement.write_done",),
            LOCKED,
            "the same lane, pool lock held",
            "the record is on disk and its RAM copy dropped (a failed write: the value back in "
            "the host tier, reported by the caller's next call); waiting updates woken",
        ),
    ),
    disk_step=6,
)

FETCH = Route(
    "F",
    "fetch back, with iter_prefetch",
    "#0e7490",
    (
        Step(
            ("IntermediatesCache.iter_prefetch", "CacheCore.submit_fetch", "IOPool.submit"),
            CALLER,
            "caller's thread",
            "the next prefetch_depth batches queued at read priority (ahead of writes), "
            "consecutive batches on different lanes",
        ),
        Step(
            (
                "CacheCore._prefetch",
                "CacheCore.fetch_versioned",
                "reads.plan",
                "Placement.begin_load",
                "Placement.hold",
            ),
            LOCKED,
            "a spillcache-io lane, pool lock held",
            "values in memory (or still in the write-behind area) taken; records only on disk "
            "held, so that a delete cannot remove their file",
        ),
        Step(
            (
                "CacheCore._finish_loads",
                "reads.read",
                "CacheCore._read_record",
                "Store.read_tensor",
                "BufferPool.take",
                "chunkio.read_file",
            ),
            LANES,
            "the same lane, no lock",
            "O_DIRECT into a reused huge-page buffer; a record another thread is reading is "
            "waited for, not read twice",
        ),
        Step(
            ("Placement.read_done", "Placement.release"),
            LOCKED,
            "the same lane, pool lock held",
            "the read recorded and the holds released; promotion into the host tier waits for "
            "the reader",
        ),
        Step(
            ("CacheCore._assemble", "Transfers.onload"),
            STREAMS,
            "the same lane, the copy on a CUDA side stream",
            "for a CUDA model device; the copy's event goes into the batch's Ready and nothing "
            "waits for it here",
        ),
        Step(
            ("CacheCore.mark_read", "Placement.promote"),
            LOCKED,
            "caller's thread, pool lock held",
            "the caller took the batch from its Future; the scan position moves to it, and what "
            "the job read is promoted as a plain fetch would",
        ),
        Step(
            ("Ready.wait",),
            CALLER,
            "caller's thread and its CUDA stream",
            "the consumer's stream waits on the copies' events (a GPU-side wait); a batch "
            "updated since its prefetch is fetched again",
        ),
    ),
    disk_step=3,
    aside=Step(
        ("IntermediatesCache.fetch", "CacheCore.fetch", "CacheCore.fetch_versioned"),
        CALLER,
        "a plain fetch",
        "steps 2 to 4 on the caller's thread, what it read promoted at once, onloaded without "
        "a side stream",
    ),
)

PATHS = (UPDATE, FETCH)

# ------------------------------------------------------------------ the code's modules


def module_files(src: Path = SRC) -> dict[str, str]:
    """Every module the picture must show: its MODULES name -> its path under ``src``.

    ``__main__.py`` and the packages' ``__init__.py`` files only re-export or dispatch,
    except the top package's, which is the public surface."""
    relatives = []
    for path in sorted(src.rglob("*.py")):
        relative = path.relative_to(src).as_posix()
        if "__pycache__" in path.parts or path.name == "__main__.py":
            continue
        if path.name == "__init__.py" and relative != "__init__.py":
            continue
        relatives.append(relative)
    outside = {r.removesuffix(".py") for r in relatives if not r.startswith("_internal/")}
    found: dict[str, str] = {}
    for relative in relatives:
        name = relative.removesuffix(".py")
        short = name.removeprefix("_internal/")
        # An internal module keeps its prefix only where a public one has its name.
        found[name if short in outside else short] = relative
    return found


def table_problems(files: dict[str, str] | None = None) -> list[str]:
    """What MODULES gets wrong about the modules in ``files`` (default: src/spillcache)."""
    files = module_files() if files is None else files
    problems = []
    for name, relative in files.items():
        if name not in MODULES:
            problems.append(
                f"src/spillcache/{relative} is not in MODULES of {SCRIPT}: add the line "
                f'"{name}": (GROUP, THREAD, "what it owns"), with its group ({", ".join(GROUPS)}) '
                f"and thread ({', '.join(THREADS)}), then run python {SCRIPT}"
            )
    for name, (group, thread, _owns) in MODULES.items():
        if name not in files:
            problems.append(
                f"MODULES of {SCRIPT} names {name}, but src/spillcache has no such module "
                f"(looked for {name}.py and _internal/{name}.py): remove or rename its line, "
                f"and any step of PATHS that names it, then run python {SCRIPT}"
            )
        if group not in GROUPS:
            problems.append(f"MODULES: {name} is in unknown group {group!r}")
        if thread not in THREADS:
            problems.append(f"MODULES: {name} runs on unknown thread {thread!r}")
    return problems


class CodeIndex:
    """The top-level classes and functions of every module, from its syntax tree."""

    def __init__(self, files: dict[str, str], src: Path = SRC) -> None:
        self.files = files
        self.functions: dict[str, set[str]] = {}
        self.classes: dict[str, list[tuple[str, ast.ClassDef]]] = {}
        for name, relative in files.items():
            tree = ast.parse((src / relative).read_text(encoding="utf-8"))
            self.functions[name] = {
                node.name
                for node in tree.body
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            }
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    self.classes.setdefault(node.name, []).append((name, node))
        self.stems: dict[str, list[str]] = {}
        for name in files:
            self.stems.setdefault(name.rsplit("/", 1)[-1], []).append(name)

    def _method(self, cls: ast.ClassDef, method: str, seen: set[str]) -> bool:
        for node in cls.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == method:
                return True
        for base in cls.bases:  # a mixin's methods (Placement's from KeptCopies)
            if isinstance(base, ast.Name) and base.id not in seen:
                seen.add(base.id)
                for _, parent in self.classes.get(base.id, []):
                    if self._method(parent, method, seen):
                        return True
        return False

    def locate(self, call: str) -> tuple[str | None, str | None]:
        """(module, None) where ``call`` ("Class.method" or "module.function") is
        defined, else (module or None, what is wrong)."""
        owner, _, function = call.partition(".")
        if not function or "." in function:
            return None, f"{call!r} is not written as Class.method or module.function"
        if owner in self.stems:
            if len(self.stems[owner]) > 1:
                return None, f"{owner} names several modules ({', '.join(self.stems[owner])})"
            (module,) = self.stems[owner]
            if function in self.functions[module]:
                return module, None
            return module, f"src/spillcache/{self.files[module]} defines no function {function}"
        defined = self.classes.get(owner, [])
        if not defined:
            return None, f"no module of src/spillcache defines a class or is a module {owner}"
        if len(defined) > 1:
            where = ", ".join(self.files[module] for module, _ in defined)
            return None, f"class {owner} is defined in several modules ({where})"
        module, cls = defined[0]
        if self._method(cls, function, {owner}):
            return module, None
        return module, f"class {owner} in src/spillcache/{self.files[module]} has no {function}"


def steps_of(route: Route) -> list[tuple[str, Step]]:
    """A path's steps with the labels problems name them by ("U3", "F (aside)")."""
    labelled = [(f"{route.letter}{number}", step) for number, step in enumerate(route.steps, 1)]
    if route.aside is not None:
        labelled.append((f"{route.letter} (aside)", route.aside))
    return labelled


def function_problems(index: CodeIndex | None = None) -> list[str]:
    """Each function a step names that the code does not define, and why."""
    index = CodeIndex(module_files()) if index is None else index
    problems = []
    for route in PATHS:
        for label, step in steps_of(route):
            if step.thread not in THREADS:
                problems.append(f"step {label} runs on unknown thread {step.thread!r}")
            for call in step.calls:
                _module, problem = index.locate(call)
                if problem:
                    problems.append(
                        f"step {label} of {SCRIPT} names {call}, but {problem}: name the "
                        f"function as the code does now, then run python {SCRIPT}"
                    )
    return problems


# ------------------------------------------------------------------------------ drawing

W = 1800
MARGIN = 30
GAP = 16
COL_W = (W - 2 * MARGIN - GAP) // 2
ROW_H = 22
PAD = 10
SANS = "DejaVu Sans, Verdana, Arial, sans-serif"
MONO = "DejaVu Sans Mono, Menlo, Consolas, monospace"
INK = "#111827"
GREY = "#4b5563"

PATH_W = 720
DISK_X = MARGIN + PATH_W + 40
DISK_W = W - 2 * (MARGIN + PATH_W + 40)
RIGHT_X = W - MARGIN - PATH_W


def text_width(text: str, size: float, mono: bool = False, bold: bool = False) -> float:
    """Width of ``text`` as drawn, an upper bound: DejaVu Sans Mono's advance is 0.602 em;
    DejaVu Sans and Verdana average about 0.53 em over prose (0.6 em allowed, 0.66 bold),
    their capitals and m, w up to 0.8 (0.85 allowed)."""
    if mono:
        return len(text) * size * 0.602
    wide = sum(1 for c in text if c.isupper() or c in "mw")
    return ((len(text) - wide) * (0.66 if bold else 0.6) + wide * 0.85) * size


def _n(value: float) -> str:
    return str(round(value)) if abs(value - round(value)) < 0.05 else f"{value:.1f}"


class Canvas:
    """SVG elements in drawing order, with every text's box kept to check that none
    overlaps another or leaves the picture."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.texts: list[tuple[float, float, float, float, str]] = []

    def rect(self, x, y, w, h, fill, stroke, *, radius=0, dash=False, width=1.0) -> None:
        extra = ' stroke-dasharray="5 4"' if dash else ""
        self.parts.append(
            f'<rect x="{_n(x)}" y="{_n(y)}" width="{_n(w)}" height="{_n(h)}" rx="{_n(radius)}" '
            f'fill="{fill}" stroke="{stroke}" stroke-width="{_n(width)}"{extra}/>'
        )

    def circle(self, cx, cy, r, fill) -> None:
        self.parts.append(f'<circle cx="{_n(cx)}" cy="{_n(cy)}" r="{_n(r)}" fill="{fill}"/>')

    def line(self, x1, y1, x2, y2, colour, *, arrow: bool = True, width: float = 1.6) -> None:
        head = f' marker-end="url(#head-{colour.lstrip("#")})"' if arrow else ""
        self.parts.append(
            f'<line x1="{_n(x1)}" y1="{_n(y1)}" x2="{_n(x2)}" y2="{_n(y2)}" stroke="{colour}" '
            f'stroke-width="{_n(width)}"{head}/>'
        )

    def raw(self, element: str) -> None:
        self.parts.append(element)

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float,
        *,
        mono: bool = False,
        bold: bool = False,
        fill: str = INK,
        anchor: str = "start",
    ) -> float:
        """Draw ``text`` with its baseline at ``y``; returns its width."""
        width = text_width(text, size, mono, bold)
        left = {"start": x, "middle": x - width / 2, "end": x - width}[anchor]
        self.texts.append((left, y - 0.8 * size, left + width, y + 0.25 * size, text))
        style = f'font-family="{MONO if mono else SANS}" font-size="{_n(size)}"'
        if bold:
            style += ' font-weight="bold"'
        if anchor != "start":
            style += f' text-anchor="{anchor}"'
        self.parts.append(
            f'<text x="{_n(x)}" y="{_n(y)}" {style} fill="{fill}">{html.escape(text)}</text>'
        )
        return width

    def overlaps(self, width: float, height: float) -> list[str]:
        problems = []
        boxes = sorted(self.texts)
        for i, (x0, y0, x1, y1, text) in enumerate(boxes):
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                problems.append(f"text {text!r} leaves the picture")
            for u0, v0, _u1, v1, other in boxes[i + 1 :]:
                if u0 >= x1:
                    break
                if v0 < y1 and y0 < v1:
                    problems.append(f"text {text!r} overlaps {other!r}")
        return problems


def wrap(words: list[str], width: float, size: float, *, mono: bool, bold: bool = False):
    """Lines of ``words`` (joined by single spaces) no wider than ``width``."""
    lines: list[str] = []
    for word in words:
        if lines and text_width(f"{lines[-1]} {word}", size, mono, bold) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _chain(calls: tuple[str, ...]) -> list[str]:
    return [calls[0]] + [f"→ {call}" for call in calls[1:]]


def _legend(canvas: Canvas, y: float) -> float:
    x = MARGIN
    items = [(THREADS[key][0], key) for key in THREADS] + [
        ("on the update path", "U"),
        ("on the fetch path", "F"),
    ]
    for label, key in items:
        need = 30 + text_width(label, 12) + 26
        if x + need > W - MARGIN:
            x, y = MARGIN, y + 24
        if key in THREADS:
            canvas.rect(x, y - 13, 24, 16, THREADS[key][1], THREADS[key][2], radius=3)
        else:
            _tag(canvas, x + 4, y - 13, key)
        canvas.text(x + 30, y, label, 12)
        x += need
    return y


def _tag(canvas: Canvas, x: float, y: float, letter: str) -> None:
    colour = {route.letter: route.colour for route in PATHS}[letter]
    canvas.rect(x, y, 16, 16, colour, colour, radius=3)
    canvas.text(x + 8, y + 12, letter, 10, bold=True, fill="#ffffff", anchor="middle")


def _group_box(
    canvas: Canvas,
    problems: list[str],
    group: str,
    columns: int,
    x: float,
    y: float,
    on_path: dict[str, set[str]],
) -> float:
    """Draw one group's box at (x, y); returns its height."""
    names = [name for name, (g, _, _) in MODULES.items() if g == group]
    rows = max(1, math.ceil(len(names) / columns))
    width = columns * COL_W + (columns - 1) * GAP
    height = 30 + rows * ROW_H + PAD
    canvas.rect(x, y, width, height, "#f8fafc", "#94a3b8", radius=8)
    title, blurb = GROUPS[group]
    used = canvas.text(x + 12, y + 21, title, 14, bold=True)
    used += canvas.text(x + 12 + used + 12, y + 21, blurb, 12, fill=GREY)
    if used + 36 > width:
        problems.append(f"GROUPS: the title and blurb of {group} are wider than its box")
    cell_w = COL_W - 2 * PAD
    for column in range(columns):
        chunk = names[column * rows : (column + 1) * rows]
        if not chunk:
            continue
        chip_w = max(text_width(f"{name}.py", 12, mono=True) for name in chunk) + 14
        cell_x = x + PAD + column * (COL_W + GAP)
        for row, name in enumerate(chunk):
            _group, thread, owns = MODULES[name]
            top = y + 30 + row * ROW_H
            _label, fill, stroke = THREADS.get(thread, THREADS[ANY])
            canvas.rect(cell_x, top, chip_w, 18, fill, stroke, radius=4)
            canvas.text(cell_x + 7, top + 13, f"{name}.py", 12, mono=True)
            room = cell_w - chip_w - 10 - 44
            if text_width(owns, 11.5) > room:
                most = int(room / text_width("x", 11.5))
                problems.append(
                    f"MODULES: what {name} owns is {len(owns)} characters, more than the "
                    f"{most} its row has room for: shorten it"
                )
            canvas.text(cell_x + chip_w + 10, top + 13.5, owns, 11.5)
            for slot, route in enumerate(PATHS):
                if name in on_path[route.letter]:
                    _tag(canvas, cell_x + cell_w - 36 + 19 * slot, top + 1, route.letter)
    return height


def _step_box(
    canvas: Canvas,
    problems: list[str],
    route: Route,
    label: str | None,
    step: Step,
    x: float,
    y: float,
) -> float:
    """Draw one step at (x, y); returns its height."""
    inner = x + 44
    room = PATH_W - 44 - 12
    calls = wrap(_chain(step.calls), room, 12.5, mono=True, bold=True)
    note = wrap(f"{step.on}: {step.what}".split(), room, 11.5, mono=False)
    for line in calls:
        if text_width(line, 12.5, mono=True) > room:
            problems.append(f"PATHS: {line!r} is wider than a step's box")
    height = 12 + 17 * len(calls) + 15 * len(note) + 6
    _label, fill, stroke = THREADS.get(step.thread, THREADS[ANY])
    canvas.rect(x, y, PATH_W, height, fill, stroke, radius=6, dash=label is None, width=1.2)
    if label is not None:
        canvas.circle(x + 22, y + 19, 13, route.colour)
        canvas.text(x + 22, y + 23.5, label, 13, bold=True, fill="#ffffff", anchor="middle")
    baseline = y + 24
    for line in calls:
        canvas.text(inner, baseline, line, 12.5, mono=True, bold=True)
        baseline += 17
    baseline -= 1
    for line in note:
        canvas.text(inner, baseline, line, 11.5, fill="#1f2937")
        baseline += 15
    return height


def _route(
    canvas: Canvas, problems: list[str], route: Route, x: float, y: float
) -> tuple[float, float]:
    """Draw a path's steps downwards from y; returns (bottom, centre of its disk step)."""
    canvas.text(x, y, f"{route.letter}: {route.title}", 15, bold=True, fill=route.colour)
    y += 14
    disk_y = y
    for number, step in enumerate(route.steps, 1):
        height = _step_box(canvas, problems, route, str(number), step, x, y)
        if number == route.disk_step:
            disk_y = y + height / 2
        if number < len(route.steps):
            canvas.line(x + 22, y + height, x + 22, y + height + 18, route.colour)
            y += height + 20
        else:
            y += height
    if route.aside is not None:
        y += 18
        y += _step_box(canvas, problems, route, None, route.aside, x, y)
    return y, disk_y


def _disk(canvas: Canvas, top: float, bottom: float) -> None:
    """The store's chunk files, as a cylinder between the two paths."""
    x, w, lid = DISK_X, DISK_W, 14
    fill, stroke = "#f1f5f9", "#475569"
    canvas.raw(
        f'<path d="M{_n(x)},{_n(top)} v{_n(bottom - top)} a{_n(w / 2)},{lid} 0 0 0 {_n(w)},0 '
        f'v{_n(top - bottom)}" fill="{fill}" stroke="{stroke}" stroke-width="1.4"/>'
    )
    canvas.raw(
        f'<ellipse cx="{_n(x + w / 2)}" cy="{_n(top)}" rx="{_n(w / 2)}" ry="{lid}" '
        f'fill="#e2e8f0" stroke="{stroke}" stroke-width="1.4"/>'
    )
    middle = (top + bottom) / 2
    centre = x + w / 2
    canvas.text(centre, middle - 22, "a chunk file on disk", 13, bold=True, anchor="middle")
    canvas.text(centre, middle, "<store>/tensors/<id>/", 11.5, mono=True, anchor="middle")
    canvas.text(centre, middle + 17, "c.0.0 + zarr.json", 11.5, mono=True, anchor="middle")
    canvas.text(centre, middle + 37, "(store_format.py)", 11, fill=GREY, anchor="middle")


def build(index: CodeIndex | None = None) -> tuple[str, list[str]]:
    """The picture's SVG text, and what does not fit in it (overlaps, long lines)."""
    index = CodeIndex(module_files()) if index is None else index
    on_path: dict[str, set[str]] = {}
    for route in PATHS:
        on_path[route.letter] = {
            index.locate(call)[0] for _, step in steps_of(route) for call in step.calls
        }
    canvas = Canvas()
    problems: list[str] = []

    canvas.text(MARGIN, 38, "spillcache: its modules, their threads, and two paths", 22, bold=True)
    canvas.text(
        MARGIN,
        62,
        "Boxes are layers of src/spillcache (internals under _internal/); a module's colour is "
        "the thread that runs its code.",
        13,
        fill=GREY,
    )
    y = _legend(canvas, 92) + 22

    for layer in LAYOUT:
        x, tallest = MARGIN, 0.0
        for group, columns in layer:
            height = _group_box(canvas, problems, group, columns, x, y, on_path)
            tallest = max(tallest, height)
            x += columns * (COL_W + GAP)
        y += tallest + GAP

    y += 20
    canvas.text(
        MARGIN,
        y,
        "Each step names the functions it runs, in call order, as the code does; its colour is "
        "the thread (and lock) it runs on.",
        13,
        fill=GREY,
    )
    y += 34
    left_bottom, update_y = _route(canvas, problems, UPDATE, MARGIN, y)
    right_bottom, fetch_y = _route(canvas, problems, FETCH, RIGHT_X, y)
    top, bottom = min(update_y, fetch_y) - 60, max(update_y, fetch_y) + 60
    _disk(canvas, top, bottom)
    canvas.line(MARGIN + PATH_W, update_y, DISK_X - 2, update_y, UPDATE.colour, width=2)
    canvas.line(DISK_X + DISK_W, fetch_y, RIGHT_X - 2, fetch_y, FETCH.colour, width=2)

    y = max(left_bottom, right_bottom, bottom + 14) + 30
    canvas.text(
        MARGIN,
        y,
        f"Drawn by {SCRIPT} from its MODULES and PATHS tables; its --check fails when a module, "
        "a function or this picture is out of date.",
        11,
        fill=GREY,
    )
    height = y + 16
    problems += canvas.overlaps(W, height)

    colours = sorted({route.colour for route in PATHS})
    heads = "".join(
        f'<marker id="head-{c.lstrip("#")}" viewBox="0 0 10 10" refX="9" refY="5" '
        f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
        f'<path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>'
        for c in colours
    )
    svg = "\n".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{_n(height)}" '
            f'viewBox="0 0 {W} {_n(height)}">',
            f"<!-- Drawn by {SCRIPT}; edit that script, not this file. -->",
            f"<defs>{heads}</defs>",
            f'<rect width="{W}" height="{_n(height)}" fill="#ffffff"/>',
            *canvas.parts,
            "</svg>",
            "",
        ]
    )
    return svg, problems


def check() -> list[str]:
    """Everything that keeps the committed picture from being this script's drawing of
    the code as it is; empty when it is up to date."""
    files = module_files()
    problems = table_problems(files)
    index = CodeIndex(files)
    problems += function_problems(index)
    if problems:
        return problems
    svg, problems = build(index)
    if problems:
        return problems
    if not SVG.exists() or SVG.read_text(encoding="utf-8") != svg:
        return [f"{SVG.relative_to(ROOT)} is not what {SCRIPT} draws now: run python {SCRIPT}"]
    return []


def main(argv: list[str]) -> int:
    if argv not in ([], ["--check"]):
        print(f"usage: python {SCRIPT} [--check]", file=sys.stderr)
        return 2
    if argv == ["--check"]:
        problems = check()
    else:
        files = module_files()
        index = CodeIndex(files)
        problems = table_problems(files) + function_problems(index)
        if not problems:
            svg, problems = build(index)
            if not problems:
                SVG.write_text(svg, encoding="utf-8", newline="\n")
                print(f"wrote {SVG.relative_to(ROOT)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
