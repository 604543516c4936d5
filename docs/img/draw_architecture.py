"""Draws docs/img/architecture.svg: spillcache's modules by layer, the thread that runs
each, and the steps of an update to disk and of a fetch back, named as in the code.

    python docs/img/draw_architecture.py           # redraw the picture
    python docs/img/draw_architecture.py --check   # exit 1 if it is out of date

MODULES and PATHS in docs/img/architecture_tables.py are the picture's only input. Both
commands (and tests/unit/test_architecture_picture.py) fail, naming what to change, when a
module of src/spillcache has no line in MODULES, a line names a module that is gone, a
step names a function the code no longer defines, or the committed SVG differs from what
this draws (call order, threads and locks are read by people, not checked). Standard
library only, so it runs wherever the tests do; the output is deterministic (no dates,
tables in order).
"""

from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

# docs/img is no package: its siblings are found through this file's directory, whether
# it runs as a script or the tests load it by path.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from architecture_tables import (
    ANY,
    FETCH,
    GROUPS,
    LAYOUT,
    MODULES,
    PATHS,
    THREADS,
    UPDATE,
    Route,
    Step,
)
from svg_canvas import Canvas, text_width, wrap

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SRC = ROOT / "src" / "spillcache"
SVG = HERE / "architecture.svg"
SCRIPT = "docs/img/draw_architecture.py"
TABLES = "docs/img/architecture_tables.py"

# ------------------------------------------------------------------ the code's modules


# The folders _internal's modules are sorted into (tests/unit/test_import_rules.py).
INTERNAL_FOLDERS = ("engine", "io", "store", "runtime", "process", "stock", "llmcompressor", "cli")


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
        # The folders of _internal (engine, io, store, ...) are the picture's groups.
        if "/" in short and short.split("/")[0] in INTERNAL_FOLDERS:
            short = short.split("/", 1)[1]
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
                f"src/spillcache/{relative} is not in MODULES of {TABLES}: add the line "
                f'"{name}": (GROUP, THREAD, "what it owns"), with its group ({", ".join(GROUPS)}) '
                f"and thread ({', '.join(THREADS)}), then run python {SCRIPT}"
            )
    for name, (group, thread, _owns) in MODULES.items():
        if name not in files:
            problems.append(
                f"MODULES of {TABLES} names {name}, but src/spillcache has no such module "
                f"(looked for {name}.py and _internal/{name}.py): remove or rename its line, "
                f"and any step of PATHS that names it, then run python {SCRIPT}"
            )
        if group not in GROUPS:
            problems.append(f"MODULES of {TABLES}: {name} is in unknown group {group!r}")
        if thread not in THREADS:
            problems.append(f"MODULES of {TABLES}: {name} runs on unknown thread {thread!r}")
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
                problems.append(f"step {label} of {TABLES} runs on unknown thread {step.thread!r}")
            for call in step.calls:
                _module, problem = index.locate(call)
                if problem:
                    problems.append(
                        f"step {label} of PATHS in {TABLES} names {call}, but {problem}: name the "
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
GREY = "#4b5563"

PATH_W = 720
DISK_X = MARGIN + PATH_W + 40
DISK_W = W - 2 * (MARGIN + PATH_W + 40)
RIGHT_X = W - MARGIN - PATH_W


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
        problems.append(
            f"GROUPS of {TABLES}: the title and blurb of {group} are wider than its box"
        )
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
                    f"MODULES of {TABLES}: what {name} owns is {len(owns)} characters, more "
                    f"than the {most} its row has room for: shorten it"
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
            problems.append(f"PATHS of {TABLES}: {line!r} is wider than a step's box")
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
    canvas.cylinder(DISK_X, top, DISK_W, bottom - top, "#f1f5f9", "#e2e8f0", "#475569")
    middle = (top + bottom) / 2
    centre = DISK_X + DISK_W / 2
    canvas.text(centre, middle - 22, "a chunk file on disk", 13, bold=True, anchor="middle")
    canvas.text(centre, middle, "<store>/tensors/<id>/", 11.5, mono=True, anchor="middle")
    canvas.text(centre, middle + 17, "c.0.0 + zarr.json", 11.5, mono=True, anchor="middle")
    canvas.text(centre, middle + 37, "(tensor_store.py)", 11, fill=GREY, anchor="middle")


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
        f"Drawn by {SCRIPT} from the tables in {TABLES}; its --check fails when a module, "
        "a function or this picture is out of date.",
        11,
        fill=GREY,
    )
    height = y + 16
    problems += canvas.overlaps(W, height)

    comment = f"Drawn by {SCRIPT} from {TABLES}; edit the tables, not this file."
    return canvas.document(W, height, comment), problems


def _drawing() -> tuple[str, list[str]]:
    """The picture of the code as it is, or why it cannot be drawn."""
    files = module_files()
    index = CodeIndex(files)
    problems = table_problems(files) + function_problems(index)
    return ("", problems) if problems else build(index)


def check() -> list[str]:
    """Everything that keeps the committed picture from being this script's drawing of
    the code as it is; empty when it is up to date."""
    svg, problems = _drawing()
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
        svg, problems = _drawing()
        if not problems:
            SVG.write_text(svg, encoding="utf-8", newline="\n")
            print(f"wrote {SVG.relative_to(ROOT)}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
