"""How long is the road an ``update`` that spills, and a ``fetch`` from disk, take?

Counts the distinct spillcache functions, and the modules they live in, that one call
runs on the caller's thread, and those it sets running on the pool's threads (the
lanes: the disk write, the read) until the value is on disk or back. Not a timing: a
map of the code a reader has to walk, the figure issue 24 asks to shrink (an update
that spills crosses at most 8 modules on the caller's thread).

The cache: a host tier of two values (``host_bytes`` of four 1 MiB values, half of it
the write-behind and read parts), ``checksum`` and the rest at their defaults. Four
values are stored first, so the host tier is full; the fifth ``update`` is profiled
(the default ``scan`` policy sends that value, needed furthest ahead, straight to
disk), then ``flush()`` waits for its write. The first value that spilled is then read
back with ``fetch`` (its page cache is not dropped: the path taken is the same cold or
warm). The caller's figures are of the call alone and the same from run to run; the
pool threads' run until the write is done (``flush()``), and vary a little with the
threads' timing (which thread gives an arena slot back; work of an earlier call that
a lane is still finishing).

With each figure comes the fewest modules that could hold the same calls under issue
24's other rules: a module lives in one folder (the folders say what their files may
assume), holds at most 500 lines, and keeps each class and top-level function whole.
The lines of the top-level definitions the call runs are added up per folder; each
folder needs at least that many lines over 500, rounded up, modules. Imports,
docstrings and the definitions the call does not run are left out, so the true least
is higher.

    python bench/call_paths.py [--list] [--json]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import math
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

import torch

from spillcache import CacheConfig, IntermediatesCache

PACKAGE = "spillcache"
MiB = 2**20
VALUE_SHAPE = (MiB // 2,)  # 1 MiB of bf16
MODULE_LINES = 500  # issue 24's bound on a module, held by tests/unit/test_import_rules.py


class CallMap:
    """Records each spillcache function called while on, per thread role."""

    def __init__(self) -> None:
        self.on = {"caller": False, "pool threads": False}
        self.caller = threading.get_ident()
        self.calls: dict[str, set[tuple[str, str]]] = defaultdict(set)

    def switch(self, caller: bool, pool: bool) -> None:
        self.on = {"caller": caller, "pool threads": pool}

    def profile(self, frame, event: str, _arg) -> None:
        if event != "call":
            return
        role = "caller" if threading.get_ident() == self.caller else "pool threads"
        module = frame.f_globals.get("__name__", "")
        if self.on[role] and (module == PACKAGE or module.startswith(PACKAGE + ".")):
            self.calls[role].add((module, frame.f_code.co_qualname))

    def figures(self) -> dict[str, dict]:
        return {
            role: {
                "functions": len(calls),
                "modules": len({module for module, _ in calls}),
                "module_names": sorted({module for module, _ in calls}),
                "function_names": sorted(f"{m}:{f}" for m, f in calls),
                **fewest_modules(calls),
            }
            for role, calls in sorted(self.calls.items())
        }


def fewest_modules(calls: set[tuple[str, str]]) -> dict:
    """The least number of modules the called definitions fit in (the module docstring
    says under which rules), and the lines per folder it comes from."""
    lines_by_folder: dict[str, int] = defaultdict(int)
    for module, top in {(module, name.split(".")[0]) for module, name in calls}:
        lines = definition_lines(module, top)
        if lines:  # a dataclass's generated __init__ has no definition of its own
            lines_by_folder[module.rpartition(".")[0]] += lines
    return {
        "fewest_modules": sum(math.ceil(n / MODULE_LINES) for n in lines_by_folder.values()),
        "lines_by_folder": dict(sorted(lines_by_folder.items())),
    }


def definition_lines(module: str, name: str) -> int:
    """Lines of the top-level class or function ``name`` of ``module``, decorators in."""
    source = Path(importlib.import_module(module).__file__).read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef) and node.name == name:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return node.end_lineno - first + 1
    return 0


def measure() -> dict[str, dict]:
    config = dict(inline_bytes=0, write_behind_bytes=MiB, read_buffer_bytes=MiB)
    values = [torch.full(VALUE_SHAPE, float(i), dtype=torch.bfloat16) for i in range(6)]
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        maps = {"update that spills": CallMap(), "fetch from disk": CallMap()}

        def both(frame, event, arg):
            for map_ in maps.values():
                map_.profile(frame, event, arg)

        threading.setprofile(both)  # the pool's threads start after this
        sys.setprofile(both)
        try:
            cache_config = CacheConfig(host_bytes=4 * MiB, disk_path=directory, **config)
            with IntermediatesCache.empty(len(values), "cpu", config=cache_config) as cache:
                for index in range(4):
                    cache.update(index, {"hidden": values[index]})
                cache.flush()
                spill = maps["update that spills"]
                spill.switch(caller=True, pool=True)
                cache.update(4, {"hidden": values[4]})
                spill.switch(caller=False, pool=True)  # flush() only waits for the lanes
                cache.flush()
                spill.switch(caller=False, pool=False)
                # The fetch profiled is the first that reads from disk (which values
                # spilled is the eviction policy's choice).
                for index in range(5):
                    read = maps["fetch from disk"] = CallMap()
                    before = cache.stats()["disk"]["bytes_read"]
                    read.switch(caller=True, pool=True)
                    got = cache.fetch(index, ["hidden"])["hidden"]
                    read.switch(caller=False, pool=False)
                    if not torch.equal(got.view(torch.int16), values[index].view(torch.int16)):
                        raise SystemExit(f"value {index} read back differs from the one stored")
                    if cache.stats()["disk"]["bytes_read"] > before:
                        break
                else:
                    raise SystemExit("no fetch read from disk: the measurement is void")
        finally:
            sys.setprofile(None)
            threading.setprofile(None)
        for name, map_ in maps.items():
            results[name] = map_.figures()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="name every function")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = measure()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for name, roles in results.items():
        for role, figures in roles.items():
            print(f"{name}, {role}: {figures['functions']} functions in "
                  f"{figures['modules']} modules")  # fmt: skip
            print(
                "    " + ", ".join(m.removeprefix("spillcache.") for m in figures["module_names"])
            )
            folders = ", ".join(
                f"{folder.removeprefix('spillcache.') or 'spillcache'} {lines}"
                for folder, lines in figures["lines_by_folder"].items()
            )
            print(f"    fewest modules that could hold them: {figures['fewest_modules']} "
                  f"(lines run, by folder: {folders})")  # fmt: skip
            if args.list:
                for function in figures["function_names"]:
                    print("      " + function)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
