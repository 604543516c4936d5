"""Render docs/benchmarks.md's generated tables from the JSON in bench/published/.

A generated table sits between two markers in the doc:

    <!-- table: NAME -->
    | ... |
    <!-- /table -->

and is rendered from bench/published/NAME.json (which ``python bench/<script>.py ...
--publish NAME`` writes) by TABLES[NAME], one function per table. Text outside the
markers is never touched. Tables typed from one-off runs whose JSON was not kept have no
markers; the doc labels them hand-collected.

    python bench/tables.py            # rewrite the generated tables in docs/benchmarks.md
    python bench/tables.py --check    # exit 1, naming every table that differs from its JSON

Kept free of torch and of bench/common.py, so that the check runs in a unit test quickly.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
# Where bench/common.py's report() writes with --publish NAME.
PUBLISHED = ROOT / "bench" / "published"

BLOCK = re.compile(
    r"^<!-- table: (?P<name>[A-Za-z0-9_-]+) -->\n(?P<body>.*?)^<!-- /table -->$",
    re.MULTILINE | re.DOTALL,
)
OPENING = re.compile(r"^<!-- table:", re.MULTILINE)


# ------------------------------------------------------------------ formatting


def fixed(value: float, places: int) -> str:
    """``value`` to ``places`` decimals, halves rounded up: a figure ending in exactly 5
    (720.25 MiB) reads as a person rounds it, not as Python's round-half-even does."""
    step = Decimal(1).scaleb(-places)
    return str(Decimal(value).quantize(step, rounding=ROUND_HALF_UP))


def significant(value: float, digits: int = 3) -> str:
    """``value`` to ``digits`` significant figures (6.96, 10.3, 5.02), halves rounded up."""
    if value == 0:
        return fixed(0, digits - 1)
    exact = Decimal(value)
    places = digits - 1 - exact.adjusted()
    rounded = exact.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP)
    if rounded.adjusted() != exact.adjusted():  # 9.996 -> 10.00: one figure too many
        rounded = exact.quantize(Decimal(1).scaleb(1 - places), rounding=ROUND_HALF_UP)
    return str(rounded)


def amount(value: float, places: int) -> str:
    """A quantity that is often exactly zero (bytes, seconds stalled): zero reads "0"."""
    return "0" if value == 0 else fixed(value, places)


def strong(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table; an empty cell is written "| |", as in the rest of the doc."""

    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


# ------------------------------------------------------------------ one function per table


def disk_throughput(data: dict) -> list[str]:
    """bench/disk_throughput.py: the cache and the raw loops, medians over the runs."""
    rows = []
    for row in data["rows"]:
        # Bold: the cache's ratios, the ones judged against the target (data["ratio"]).
        cells = [row["path"], fixed(row["write GB/s"], 3), fixed(row["read GB/s"], 3)]
        for direction in ("write", "read"):
            judged = row[f"{direction} x raw"] == data["ratio"][direction]
            cells.append(strong(fixed(row[f"{direction} x raw"], 3), judged))
        rows.append([*cells, row["write min-max"], row["read min-max"]])
    header = ["path", "write GB/s", "read GB/s", "write x raw", "read x raw"]
    table = markdown([*header, "write min-max", "read min-max"], rows)
    if "checksum_cost" not in data:  # published before the cache ran without checksums too
        return table
    cost = [
        [
            direction,
            f"{fixed(100 * data['checksum_cost'][direction], 1)} %",
            f"{fixed(100 * data['checksum_cost_limit'], 0)} %",
            data["checksum_verdict"][direction],
            _spread3(data["checksum_per_run_throughput_ratio"][direction]),
        ]
        for direction in ("write", "read")
    ]
    header = ["direction", "checksums cost", "limit", "verdict", "with / without, run by run"]
    return [*table, "", *markdown(header, cost)]


def _spread3(values: list[float]) -> str:
    return f"{fixed(min(values), 3)}-{fixed(max(values), 3)}"


def reads_beside_a_checksum(data: dict) -> list[str]:
    """bench/reads_beside_a_checksum.py: raw reads alone and beside a checksum thread."""
    rows = [
        [row["reads"], fixed(row["GB/s"], 3), fixed(row["x alone"], 3), row["run by run"]]
        for row in data["rows"]
    ]
    return markdown(["raw O_DIRECT reads", "GB/s", "x alone", "run by run"], rows)


def write_steps(data: dict) -> list[str]:
    """bench/write_steps.py: the steps of a chunk write against the raw O_DIRECT loop."""
    rows = [
        [row["way"], fixed(row["GB/s"], 3), fixed(row["x raw"], 3), row["runs"]]
        for row in data["rows"]
    ]
    return markdown(["16 MiB files written", "GB/s", "x raw", "run by run"], rows)


def flush_durability(data: dict) -> list[str]:
    """bench/flush_durability.py: a kept store's updates and flush(), each variant
    against keep_store = false with an os.sync() at the end (medians)."""
    rows = [
        [
            row["variant"],
            fixed(row["updates + flush s"], 3),
            fixed(row["GB/s"], 3),
            fixed(row["x not kept + sync"], 3),
            row["run by run"],
            fixed(row["flush() s"], 3),
            str(row["fsyncs"]),
        ]
        for row in data["rows"]
    ]
    header = ["variant", "updates + flush s", "GB/s", "x not kept + sync", "run by run"]
    return markdown([*header, "flush() s", "fsyncs"], rows)


def host_memory(data: dict) -> list[str]:
    """bench/host_memory.py: RSS high-water growth against host_bytes + 48 MiB, per
    scenario, for this code and (with --before) the code before the arena."""
    rows = []
    for row in data["rows"]:
        growth = f"{fixed(row['growth MiB'], 1)} / {fixed(row['limit MiB'], 0)}"
        ratio = strong(f"{fixed(row['growth / limit'], 2)} {row['verdict']}", row["code"] == "this")
        worst = row["worst fragmentation"]
        fragments = "-" if worst is None else f"{row['fragmented takes']} / {fixed(worst, 2)}"
        overflows = "-" if row["overflows"] is None else str(row["overflows"])
        code = {"this": "arena", "before": "before (e59192e)"}.get(row["code"], row["code"])
        rows.append(
            [
                row["scenario"],
                code,
                fixed(row["host MiB"], 0),
                growth,
                ratio,
                fixed(row["fill growth MiB"], 1),
                str(row["values wrong"]),
                overflows,
                fragments,
                fixed(row["seconds"], 1),
            ]
        )
    header = ["scenario", "code", "host_bytes MiB", "growth / limit MiB", "ratio"]
    more = ["growth after fill MiB", "values wrong", "overflows", "fragmented takes / worst"]
    return markdown([*header, *more, "s"], rows)


def two_disks(data: dict) -> list[str]:
    """bench/two_disks.py: rates, then the ratios between them (same columns)."""
    rows = [
        [row["path"], fixed(row["write GB/s"], 3), fixed(row["read GB/s"], 3)]
        for row in data["rows"]
    ]
    return markdown(["path", "write GB/s", "read GB/s"], rows)


def calibration_sim(data: dict) -> list[str]:
    """bench/calibration_sim.py: both modes, every policy and host share."""
    modes = list(dict.fromkeys(row["mode"] for row in data["rows"]))

    def order(indexed: tuple[int, dict]) -> tuple:
        # Per mode: the all-in-RAM run, the runs that read nothing from disk, then the
        # runs compared with LRU (scan, the default) and LRU's own, larger host first.
        index, row = indexed
        if row["host %"] is None:
            group = 0
        elif not row["rd GB"]:
            group = 1
        else:
            group = 2 if row["rd/lru"] is not None else 3
        return modes.index(row["mode"]), group, -(row["host %"] or 0), index

    rows = []
    for _, row in sorted(enumerate(data["rows"]), key=order):
        targets = row["targets"]
        reference = row["host %"] is None
        # Bold, as in the prose: the figures a target judges, in the runs compared with
        # LRU (scan's, the default's, that spill: the rows with a "read / LRU's").
        compared = row["rd/lru"] is not None
        # The covered mode's 1.05x target needs 3 decimals where a run spills: at 2, a
        # miss of 1.054 would print as 1.05.
        ram_places = 3 if "xRAM" in targets and row["rd GB"] else 2
        floor = ""
        if "xlimit" in targets and row["x floor"] is not None:
            floor = strong(fixed(row["x floor"], 2), compared)
        rows.append(
            [
                row["mode"],
                "all in RAM" if reference else row["policy"],
                "-" if reference else str(row["host %"]),
                fixed(row["wall s"], 2),
                strong(fixed(row["x RAM"], ram_places), compared and "xRAM" in targets),
                floor,
                "" if reference else amount(row["rd GB"], 2),
                "" if reference else amount(row["wr GB"], 2),
                strong(fixed(row["rd/lru"], 2), True) if compared else "",
                # 1 - C/N is what "read / LRU's" should equal: shown beside it only.
                fixed(row["1-C/N"], 2) if compared else "",
            ]
        )
    header = ["mode", "policy", "host %", "wall s", "x all-in-RAM", "x I/O floor"]
    header += ["disk read GB", "written GB", "read / LRU's", "1 - C/N"]
    return markdown(header, rows)


def overhead(data: dict) -> list[str]:
    """bench/overhead.py: per-call percentiles against a plain dict."""
    # llm-compressor's order within a batch: fetch the input, store the output, delete
    # the input; then the three summed.
    ops = ["fetch", "update", "delete", "per batch"]
    rank = {op: index for index, op in enumerate(ops)}
    found = sorted(data["rows"], key=lambda row: rank.get(row["op"], len(ops)))
    rows = [
        [
            row["op"],
            f"{fixed(row['dict p50 us'], 2)} / {fixed(row['dict p90 us'], 2)}",
            f"{significant(row['cache p50 us'])} / {significant(row['cache p90 us'])}",
            fixed(row["x p50"], 1),
        ]
        for row in found
    ]
    return markdown(["op", "dict p50 / p90 us", "cache p50 / p90 us", "x p50"], rows)


def demo_budgets(data: dict) -> list[str]:
    """bench/demo_budgets.py: the demo's calibration at each host budget."""
    cached_mib = data["cached_bytes"] / 2**20
    rows = []
    for row in data["rows"]:
        budget = row["budget MiB"]
        label = row["host budget"]
        if budget is not None:
            label = f"{fixed(budget, 1).removesuffix('.0')} MiB ({label})"
        # Bold: the runs whose budget is below the cached activations, i.e. that spill.
        spills = budget is not None and budget < cached_mib
        rows.append(
            [
                label,
                amount(row["written MiB"], 1),
                amount(row["read MiB"], 1),
                row["host h/m"].replace("/", " / "),
                row["disk h/m"].split("/")[0],
                fixed(row["stall s"], 2),
                fixed(row["wall s"], 2),
                strong(fixed(row["x RAM"], 2), spills),
                fixed(row["cpu s"], 1),
                yes(row["exact"]),
            ]
        )
    header = ["host budget", "written MiB", "read MiB", "host hits / misses", "disk hits"]
    header += ["stall s", "wall s", "x all-in-RAM", "CPU s", "bit for bit"]
    return markdown(header, rows)


def _oneshot_cells(row: dict) -> dict[str, str]:
    """The cells both llm-compressor tables share, by column."""
    limit = next(key for key in row if key.startswith("<= "))  # the --wall-limit verdict

    def mib(value) -> str:
        return value if isinstance(value, str) else significant(value)

    return {
        "host MiB": mib(row["host MiB"]),
        "host peak MiB": mib(row["host peak MiB"]),
        "peak RSS MiB": fixed(row["peak RSS MiB"], 1),
        "RSS x stock": fixed(row["RSS x stock"], 3),
        "wall s": fixed(row["wall s"], 2),
        # Bold: the wall ratio the --wall-limit target judges (the runs with a verdict).
        "x stock": strong(fixed(row["x stock"], 3), row[limit] in ("PASS", "MISS")),
        "caches": str(row["caches"]),
        "disk wr MiB": amount(row["disk wr MiB"], 0),
        "disk rd MiB": amount(row["disk rd MiB"], 0),
        "stall s": amount(row["stall s"], 2),
        "bit": yes(row["bit-exact"]),
    }


def llmcompressor_oneshot_gptq(data: dict) -> list[str]:
    """bench/llmcompressor_oneshot.py (GPTQ): runs named by their share of the stock cache."""
    columns = ["host MiB", "host peak MiB", "peak RSS MiB", "RSS x stock", "wall s", "x stock"]
    columns += ["disk wr MiB", "disk rd MiB", "stall s", "bit"]
    rows = []
    for row in data["rows"]:
        name = row["run"]
        if name.startswith("spillcache host "):  # "spillcache host 0.0625" -> "1/16"
            name = f"spillcache, {Fraction(name.rsplit(' ', 1)[1])}"
        cells = _oneshot_cells(row)
        rows.append([name, *(cells[column] for column in columns)])
    return markdown(["run", *columns[:-1], "bit for bit"], rows)


def llmcompressor_oneshot_awq(data: dict) -> list[str]:
    """bench/llmcompressor_oneshot.py --recipe awq: with the caches AWQ built."""
    columns = ["host MiB", "host peak MiB", "peak RSS MiB", "RSS x stock", "wall s", "x stock"]
    columns += ["caches", "disk wr MiB", "disk rd MiB", "stall s", "bit"]
    rows = []
    for row in data["rows"]:
        cells = _oneshot_cells(row)
        rows.append([row["run"], *(cells[column] for column in columns)])
    return markdown(["run", *columns[:-1], "bit-exact"], rows)


def llmcompressor_oneshot_checkpoint(data: dict) -> list[str]:
    """bench/llmcompressor_oneshot.py --checkpoint: a run with checkpoint_dir against the
    same run without (the ratio --checkpoint-limit judges, bold)."""
    columns = ["host MiB", "peak RSS MiB", "RSS x stock", "wall s", "x stock"]
    columns += ["disk wr MiB", "disk rd MiB", "stall s", "bit"]
    rows = []
    for row in data["rows"]:
        cells = _oneshot_cells(row)
        limit = [key for key in row if key.startswith("<= ")][-1]  # --checkpoint-limit's
        cost = row["x without ckpt"]
        cost_cell = cost if isinstance(cost, str) else strong(fixed(cost, 3), True)
        rows.append([row["run"], *(cells[c] for c in columns), cost_cell, row[limit]])
    header = ["run", *columns[:-1], "bit for bit", "x without checkpoints", "verdict"]
    return markdown(header, rows)


# The name in the doc's marker and of the JSON file -> the function that renders it. Some
# have no published JSON yet; they render once a rerun publishes it and the doc marks it.
TABLES: dict[str, Callable[[dict], list[str]]] = {
    "disk_throughput": disk_throughput,
    "disk_throughput_prefetch4": disk_throughput,
    "flush_durability": flush_durability,
    "reads_beside_a_checksum": reads_beside_a_checksum,
    "write_steps": write_steps,
    "flush_durability_compute": flush_durability,
    "two_disks": two_disks,
    "host_memory": host_memory,
    "host_memory_32g": host_memory,
    "calibration_sim": calibration_sim,
    "overhead": overhead,
    "demo_budgets": demo_budgets,
    "demo_budgets_threads1": demo_budgets,
    "llmcompressor_oneshot_gptq": llmcompressor_oneshot_gptq,
    "llmcompressor_oneshot_awq": llmcompressor_oneshot_awq,
    "llmcompressor_oneshot_checkpoint": llmcompressor_oneshot_checkpoint,
}


# ------------------------------------------------------------------ the doc


class TableError(Exception):
    """A marker that names no table, or a table whose JSON is missing."""


def render(name: str, published: Path = PUBLISHED) -> str:
    """Table ``name`` as the doc holds it between its markers (a newline after each line)."""
    if name not in TABLES:
        raise TableError(f"table {name!r}: no such table in bench/tables.py's TABLES")
    path = published / f"{name}.json"
    if not path.exists():
        raise TableError(f"table {name!r}: {path} is missing")
    return "\n".join(TABLES[name](json.loads(path.read_text()))) + "\n"


def rewrite(text: str, published: Path = PUBLISHED) -> tuple[str, list[str]]:
    """``text`` with every marked table rendered afresh, and the names of those that
    changed. Raises TableError for a marker it cannot render or one left open."""
    if len(OPENING.findall(text)) != len(BLOCK.findall(text)):
        raise TableError("a '<!-- table: NAME -->' marker has no '<!-- /table -->' after it")
    changed = []

    def replace(match: re.Match) -> str:
        body = render(match["name"], published)
        if body != match["body"]:
            changed.append(match["name"])
        return f"<!-- table: {match['name']} -->\n{body}<!-- /table -->"

    return BLOCK.sub(replace, text), changed


def unshown(text: str, published: Path = PUBLISHED) -> list[str]:
    """Published JSON files that no table in ``text`` is rendered from."""
    marked = {match["name"] for match in BLOCK.finditer(text)}
    return sorted(path.name for path in published.glob("*.json") if path.stem not in marked)


def check(doc: Path = DOC, published: Path = PUBLISHED) -> list[str]:
    """What is wrong, one entry each: tables that differ from their JSON (with the diff),
    markers that cannot be rendered, published JSON no table shows. Empty: all agree."""
    text = doc.read_text()
    if len(OPENING.findall(text)) != len(BLOCK.findall(text)):
        return [f"{doc}: a '<!-- table: NAME -->' marker has no '<!-- /table -->' after it"]
    problems = []
    for match in BLOCK.finditer(text):
        name = match["name"]
        try:
            body = render(name, published)
        except TableError as error:
            problems.append(f"{doc}: {error}")
            continue
        if body != match["body"]:
            diff = difflib.unified_diff(
                match["body"].splitlines(), body.splitlines(), "doc", "json", lineterm="", n=0
            )
            lines = "\n".join(f"    {line}" for line in diff)
            problems.append(f"{doc}: table {name!r} differs from {name}.json:\n{lines}")
    for name in unshown(text, published):
        problems.append(f"{published / name}: no '<!-- table: {Path(name).stem} -->' in {doc}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a diff")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--published", type=Path, default=PUBLISHED)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.doc, args.published)
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{args.doc}: every generated table matches {args.published}")
        return 1 if problems else 0
    text = args.doc.read_text()
    try:
        new, changed = rewrite(text, args.published)
    except TableError as error:
        print(f"{args.doc}: {error}", file=sys.stderr)
        return 1
    if new != text:
        args.doc.write_text(new)
    print(f"{args.doc}: rewrote {', '.join(changed) or 'no table (all matched)'}")
    left = unshown(new, args.published)
    for name in left:
        print(f"{args.published / name}: no table in {args.doc} shows it", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
