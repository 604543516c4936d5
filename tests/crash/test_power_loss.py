"""A power loss after a kept store's flush() (or close()) returned loses nothing it
recorded.

A workload runs in this process with its file-system calls recorded (power_loss.py):
write-behind with a tiny host tier, so the I/O threads write chunk files in the
background, while other values are only in RAM when a flush comes; keys replaced and
deleted between three flushes, then close. For trace points around every marker (and
a sample of the rest), the states a power loss may leave are rebuilt in a fresh
directory, the owner recorded dead, and the store opened: after flush k returned it
must open with flush k's entries bit for bit (or flush k+1's, if that flush had begun);
before any flush returned it may also be refused, but only with a spillcache error.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from spill_testing import bits, clone_bits, random_tensor
from spillcache import CacheConfig, IntermediatesCache
from spillcache._internal.io import chunkio
from spillcache._internal.store.tensor_store import Store
from spillcache.errors import SpillCacheError

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "property"))
import power_loss  # noqa: E402
from crash_images import record_owner_dead  # noqa: E402

COMMITS = ("flush 1", "flush 2", "flush 3", "close")  # in the order the workload makes them
# bfloat16 NaNs with payloads (quiet and signalling, both signs): they must come back as
# these bits, not as torch's canonical NaN.
NAN_PAYLOADS = (0x7FC1, 0xFFC3, 0x7F81, 0xFFA5)


# ---------------------------------------------------------------------- the workload


def _value(batch: int, key: str, version: int = 0):
    seed = 7919 * batch + 104729 * version + sum(map(ord, key))
    if key == "hidden":  # 12 KiB: tiered, mostly written by the I/O threads
        return random_tensor(torch.float32, (24, 128), seed)
    if key == "half":  # 6 KiB, not a whole number of pages
        half = random_tensor(torch.bfloat16, (32, 96), seed)
        signed = [payload - (1 << 16) if payload >> 15 else payload for payload in NAN_PAYLOADS]
        half.view(torch.int16).view(-1)[: len(signed)] = torch.tensor(signed, dtype=torch.int16)
        return half
    if key == "ids":  # below inline_bytes: stays with its entry, written by flush() itself
        return random_tensor(torch.int64, (16,), seed)
    if key == "pair":
        return (random_tensor(torch.uint8, (3001,), seed), f"note {version}", batch)
    if key == "meta":
        return {"scale": float("nan") if version else 0.5 + batch, "steps": [batch, version]}
    raise KeyError(key)


def _batch(batch: int) -> dict:
    return {key: _value(batch, key) for key in ("hidden", "half", "ids", "pair", "meta")}


def _copy(value):
    if isinstance(value, torch.Tensor):
        return clone_bits(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_copy(item) for item in value)
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    return value


@dataclass
class Recorded:
    trace: power_loss.Trace
    store: str  # the store's directory name
    snapshots: dict[str, list[dict]] = field(default_factory=dict)  # commit -> batches


def _record_workload(disk: Path, checksum: bool, sync_on_write: bool) -> Recorded:
    config = CacheConfig(
        checksum=checksum,
        host_bytes=(32 + 256 + 32) * 1024,  # a 32 KiB host tier, write-behind and reads
        inline_bytes=1024,
        disk_path=str(disk),
        keep_store=True,
        write_behind_bytes=256 * 1024,
        read_buffer_bytes=32 * 1024,
        io_threads=2,
    )
    recorder = power_loss.Recorder(disk)
    model: list[dict] = []
    snapshots = {}

    def commit(name: str, call) -> None:
        # The background writes finish before the marker: the flush then has files to
        # make durable that it did not write itself, and the I/O threads' writes since
        # the last flush fall between that flush's "returned" and this "started".
        cache._core.io.wait_idle()
        snapshots[name] = _copy(model)
        recorder.mark(f"{name} started")
        call()
        recorder.mark(f"{name} returned")

    def update(batch: int, key: str, version: int) -> None:
        value = _value(batch, key, version)
        cache.update(batch, {key: value})
        model[batch][key] = value

    def delete(batch: int, key: str) -> None:
        cache.delete(batch, [key])
        del model[batch][key]

    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        patch.setattr(Store, "sync_on_write", sync_on_write)
        cache = IntermediatesCache.empty(0, "cpu", config=config)
        try:
            for batch in range(4):
                model.append(_batch(batch))
                cache.append(model[-1])
            commit("flush 1", cache.flush)
            update(0, "hidden", 1)  # replaces an array flush 1 recorded
            delete(1, "pair")
            model.append(_batch(4))
            cache.append(model[-1])
            commit("flush 2", cache.flush)
            update(2, "half", 2)
            update(4, "ids", 2)
            delete(3, "hidden")
            update(1, "hidden", 2)
            update(0, "meta", 2)
            commit("flush 3", cache.flush)
            update(3, "half", 3)
            delete(0, "hidden")
            update(2, "pair", 3)
            store = Path(cache.store_path).name
        finally:
            commit("close", cache.close)
    return Recorded(recorder.trace, store, snapshots)


# ---------------------------------------------------------------------- expectations


def _expected(trace: power_loss.Trace, point: int) -> tuple[str | None, list[str]]:
    """After ``events[:point]``: the last commit that returned (None: none yet) and the
    commits whose entries the store may hold (that one, and the next if it began)."""
    seen = {text for index, text in trace.markers() if index < point}
    done = None
    allowed = []
    for name in COMMITS:
        if f"{name} returned" in seen:
            done, allowed = name, [name]
        elif f"{name} started" in seen:
            allowed.append(name)
            break
        else:
            break
    return done, allowed


def _points(trace: power_loss.Trace, sample: int | None, seed: int) -> list[int]:
    """Trace points to check: just after every marker, and ``sample`` drawn among the
    points just after each fsync (None: all of them)."""
    after_markers = {index + 1 for index, _ in trace.markers()}
    after_fsyncs = [index + 1 for index in trace.fsyncs()]
    if sample is not None and sample < len(after_fsyncs):
        after_fsyncs = random.Random(seed).sample(after_fsyncs, sample)
    return sorted(after_markers | set(after_fsyncs))


def _cuts(trace: power_loss.Trace, point: int, count: int | None) -> list[int]:
    """Where in-between states stop replaying: ``count`` points spread over the events
    that change a directory since the marker before ``point`` (None: every one)."""
    since = max([index for index, _ in trace.markers() if index < point - 1], default=0)
    changes = [i + 1 for i in range(since, point) if trace.events[i].effects]
    if count is None or len(changes) <= count:
        return changes
    step = len(changes) / count
    return sorted({changes[int(step * (n + 1)) - 1] for n in range(count)})


# ---------------------------------------------------------------------- checking


def _difference(got, want, where: str) -> str | None:
    """Where ``got`` differs from ``want`` (tensors by dtype, shape and bits; floats by
    their bits), or None."""
    if type(got) is not type(want):
        return f"{where}: a {type(got).__name__}, expected a {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        if (got.dtype, got.shape) != (want.dtype, want.shape):
            shapes = f"{got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
            return f"{where}: {shapes}"
        return None if bits(got) == bits(want) else f"{where}: its bits differ"
    if isinstance(want, float):
        return None if got.hex() == want.hex() else f"{where}: {got!r}, expected {want!r}"
    if isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{where}: {len(got)} items, expected {len(want)}"
        pairs = zip(got, want, strict=True)
        return next(
            (d for i, (g, w) in enumerate(pairs) if (d := _difference(g, w, f"{where}[{i}]"))),
            None,
        )
    if isinstance(want, dict):
        if list(got) != list(want):
            return f"{where}: keys {sorted(got)}, expected {sorted(want)}"
        return next(
            (d for k in want if (d := _difference(got[k], want[k], f"{where}[{k!r}]"))), None
        )
    return None if got == want else f"{where}: {got!r}, expected {want!r}"


def _open_state(tree: dict, store: str, where: Path) -> tuple[str, object]:
    """Materialize ``tree`` under ``where`` and open its store: ("no store", None),
    ("refused", the spillcache error), ("foreign", another exception), ("unreadable",
    what fetching its entries raised) or ("opened", the batches it holds)."""
    where.mkdir()
    try:
        power_loss.materialize(tree, where)
        path = where / store
        try:
            root = json.loads((path / "zarr.json").read_text())
            root["attributes"]["spillcache"]["start_time"]
        except (OSError, ValueError, KeyError, TypeError):
            return "no store", None
        record_owner_dead(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what the power loss dropped is said in one
                cache = IntermediatesCache.open(str(path))
        except SpillCacheError as error:
            return "refused", error
        except Exception as error:  # noqa: BLE001 - what the test looks for
            return "foreign", error
        try:
            return "opened", [cache.fetch(index) for index in range(len(cache))]
        except Exception as error:  # noqa: BLE001 - an opened store must read back
            return "unreadable", error
        finally:
            cache.close()
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _judge(
    outcome: str, found, done: str | None, allowed: list[str], recorded: Recorded
) -> tuple[str, str] | None:
    """None if ``outcome`` is allowed, else (what kind of failure, the details)."""
    if outcome == "foreign":
        return "a foreign exception", f"{type(found).__name__} (not a spillcache error): {found}"
    if outcome == "unreadable":
        return "opened, but its entries do not read back", f"{type(found).__name__}: {found}"
    if outcome in ("no store", "refused") and done is None:
        return None  # no flush returned yet: the store may be missing or refused
    if outcome == "no store":
        return "the store is gone", "no readable root zarr.json"
    if outcome == "refused":
        return "the store is refused", f"{type(found).__name__}: {found}"
    states = {name: recorded.snapshots[name] for name in allowed}
    if done is None:
        states["nothing"] = []  # a kept store never flushed opens empty
    differences = []
    for name, want in states.items():
        difference = _difference(found, want, "batches")
        if difference is None:
            return None
        differences.append(f"not {name}'s entries ({difference})")
    return "opened with entries no flush recorded (wrong data)", "; ".join(differences)


@dataclass
class Tally:
    built: int = 0
    outcomes: Counter = field(default_factory=Counter)
    verdicts: dict[tuple, tuple[str, str] | None] = field(default_factory=dict)  # by state
    failures: dict[str, list[str]] = field(default_factory=dict)  # reason -> failures


def _lost(trace: power_loss.Trace, point: int, tree: dict) -> list[str]:
    """Paths the running system showed at ``point`` that ``tree`` lacks or holds other
    bytes of (``.partial`` files aside): what was not durable."""
    seen = trace.state(point, replay=point, unsynced="whole")
    lost = []

    def walk(shown: dict, kept: dict | None, prefix: str) -> None:
        for name, value in shown.items():
            path = f"{prefix}{name}"
            if name.endswith(".partial"):
                continue
            if kept is None or name not in kept:
                lost.append(f"{path}{'/' if isinstance(value, dict) else ''} missing")
            elif isinstance(value, dict):
                walk(value, kept[name] if isinstance(kept[name], dict) else None, f"{path}/")
            elif kept[name] != value:
                size = len(kept[name])
                sizes = "other bytes" if size == len(value) else f"{size} bytes, not {len(value)}"
                lost.append(f"{path} holds {sizes}")

    walk(seen, tree, "")
    return lost


def _check_states(recorded: Recorded, tmp_path: Path, plans: list[tuple]):
    """Build, open and judge the distinct states among ``plans`` (point, replay cut,
    unsynced)."""
    tally = Tally()
    with pytest.MonkeyPatch.context() as patch:
        # The copies are thrown away: what opening them writes need not reach the disk.
        patch.setattr(os, "fsync", lambda fd: None)
        patch.setattr(os, "fdatasync", lambda fd: None)
        for plan in plans:
            _check(recorded, tmp_path, tally, *plan)
    return tally


def _check(
    recorded: Recorded, tmp_path: Path, tally: Tally, point: int, replay: int | None, unsynced
) -> None:
    """Judge one state (once per distinct state and expectation); a failure is added to
    ``tally`` with the paths that were not durable."""
    trace = recorded.trace
    done, allowed = _expected(trace, point)
    tree = trace.state(point, replay=replay, unsynced=unsynced)
    key = (power_loss.fingerprint(tree), done, tuple(allowed))
    if key not in tally.verdicts:
        tally.built += 1
        outcome, found = _open_state(tree, recorded.store, tmp_path / f"state-{tally.built}")
        tally.outcomes[outcome] += 1
        tally.verdicts[key] = _judge(outcome, found, done, allowed, recorded)
    verdict = tally.verdicts[key]
    if verdict is None:
        return
    reason, problem = verdict
    event = trace.events[point - 1]
    at = event.mark or f"{event.kind} {Path(event.path).name}"
    kind = "pessimistic" if replay is None else f"replayed to {replay}"
    unsynced = getattr(unsynced, "__name__", unsynced)
    after = f"after {done} returned" if done else "before any flush returned"
    lost = _lost(trace, point, tree)
    shown = ", ".join(lost[:4]) + (f" and {len(lost) - 4} more" if lost[4:] else "")
    tally.failures.setdefault(reason, []).append(
        f"point {point} ({at}), {kind}, unsynced files {unsynced}, {after}: "
        f"{reason}: {problem}\n      not durable: {shown or 'nothing'}"
    )


def _report(tally: Tally, what: str, config) -> None:
    """The summary line at the end of the run; fail with up to 4 failures per reason."""
    failures = sum(map(len, tally.failures.values()))
    summary = (
        f"power loss ({what}): {tally.built} distinct states built, "
        f"{tally.outcomes['opened']} opened, {tally.outcomes['refused']} refused, "
        f"{tally.outcomes['no store']} without a store, {failures} failures"
    )
    power_loss.say_at_end(config, summary)
    if failures:
        parts = []
        for reason, cases in tally.failures.items():
            parts.append(f"{len(cases)}x {reason}, e.g.\n  " + "\n  ".join(cases[:4]))
        pytest.fail(f"{summary}:\n" + "\n".join(parts), pytrace=False)


# With checksums a chunk whose bytes did not reach the disk is refused; without, it
# would be read as zeros: wrong data, which the comparison catches. A kept store's
# background writes are fsync'd as they land (the default, Store.sync_on_write) or by
# the next flush: both ways are recorded.
WORKLOADS = {
    "checksum": (True, True),
    "no-checksum": (False, True),
    "fsync-at-flush": (True, False),
}


@pytest.fixture(scope="module", params=list(WORKLOADS), ids=list(WORKLOADS))
def recorded(tmp_path_factory, request) -> Recorded:
    disk = tmp_path_factory.mktemp("power-loss-disk")
    checksum, sync_on_write = WORKLOADS[request.param]
    recorded = _record_workload(disk, checksum=checksum, sync_on_write=sync_on_write)
    assert recorded.trace.problems == [], recorded.trace.problems
    return recorded


# ---------------------------------------------------------------------- the tests


def test_the_recorder_sees_what_write_file_makes_durable(tmp_path):
    """The harness itself: a file chunkio writes with durable=True survives a power loss
    (its directory's own entry fsynced as well), one written with durable=False does
    not, unless a journal committed its name (replay), and then with whatever bytes; a
    tree shutil.rmtree removes (through dir_fd calls) is gone once its parent is
    fsynced, and not before."""
    disk = tmp_path / "disk"
    disk.mkdir()
    direct = chunkio.direct_io_supported(disk)
    data = random_tensor(torch.uint8, (5000,), 1)  # not a whole number of pages
    recorder = power_loss.Recorder(disk)
    real_open = os.open
    with pytest.MonkeyPatch.context() as patch:
        recorder.install(patch)
        (disk / "d").mkdir()
        chunkio.fsync_directory(disk)
        recorder.mark("made")
        chunkio.write_file(disk / "d" / "kept", data, direct=direct, staging=None, durable=True)
        recorder.mark("durable")
        chunkio.write_file(disk / "d" / "lost", data, direct=direct, staging=None)
        recorder.mark("not durable")
        shutil.rmtree(disk / "d")
        recorder.mark("removed")
        chunkio.fsync_directory(disk)
        recorder.mark("removal durable")
    assert os.open is real_open, "the wrappers outlived the context"
    trace = recorder.trace
    assert trace.problems == []
    after = {text: index + 1 for index, text in trace.markers()}
    written = data.numpy().tobytes()
    assert trace.state(after["made"]) == {"d": {}}
    assert trace.state(after["durable"]) == {"d": {"kept": written}}
    point = after["not durable"]
    for unsynced in power_loss.UNSYNCED:
        assert trace.state(point, unsynced=unsynced) == {"d": {"kept": written}}, unsynced
    lost = {"empty": b"", "zeros": bytes(5000), "torn": written[:2500], "whole": written}
    for unsynced, held in lost.items():
        replayed = trace.state(point, replay=point, unsynced=unsynced)
        assert replayed == {"d": {"kept": written, "lost": held}}, unsynced
    assert trace.state(after["removed"]) == {"d": {"kept": written}}
    assert trace.state(after["removed"], replay=after["removed"]) == {}
    assert trace.state(after["removal durable"]) == {}
    removed = trace.events[point : after["removed"]]
    removals = sorted((event.kind, Path(event.path).name) for event in removed)
    assert removals == [("mark", ""), ("rmdir", "d"), ("unlink", "kept"), ("unlink", "lost")]


def test_the_workload_writes_in_the_background_and_at_flush(recorded, request):
    """The recording has what the check needs: every commit's markers, and before the
    first flush, files the I/O threads created in the background (write-behind): left
    without an fsync for that flush to make durable, or, fsync'd as they landed."""
    trace = recorded.trace
    marks = [text for _, text in trace.markers()]
    assert marks == [f"{name} {edge}" for name in COMMITS for edge in ("started", "returned")]
    first_flush = trace.markers()[0][0]
    early = trace.events[:first_flush]
    created = {e.effects[0][2] for e in early if e.kind == "create"}
    synced = {e.synced[0] for e in early if e.synced is not None}
    if WORKLOADS[request.node.callspec.id][1]:  # fsync'd as each write landed
        assert len(created) >= 10 and len(created & synced) >= 10, (len(created), len(synced))
    else:
        assert len(created - synced) >= 10, (len(created), len(synced))
    scales = [batch["meta"]["scale"] for batch in recorded.snapshots["flush 3"] if "meta" in batch]
    assert any(scale != scale for scale in scales), "flush 3 records a NaN float"


def _chunks_zeroed(path: str, final: bytes) -> bytes:
    """A never-fsynced chunk file reads as zeros of its size (its blocks allocated, its
    data not written back) while its ``zarr.json`` is whole: only the bits can tell."""
    return final if Path(path).name.startswith("zarr.json") else bytes(len(final))


def test_a_power_loss_after_flush_returned_loses_nothing_flushed(recorded, tmp_path, request):
    """Just after every marker and after a sample of the fsyncs: the pessimistic states
    (never-fsynced files empty, zeros, or chunks zeros beside whole metadata), and at
    each marker two in-between states replaying part of what the commit changed."""
    trace = recorded.trace
    plans = []
    for point in _points(trace, sample=12, seed=1):
        plans += [(point, None, unsynced) for unsynced in ("empty", "zeros", _chunks_zeroed)]
    for index, _ in trace.markers():
        for cut in _cuts(trace, index + 1, count=2):
            plans += [(index + 1, cut, "whole"), (index + 1, cut, "zeros")]
    what = f"default, {request.node.callspec.id}"
    _report(_check_states(recorded, tmp_path, plans), what, request.config)


@pytest.mark.slow
def test_a_power_loss_at_any_point_loses_nothing_flushed(recorded, tmp_path, request):
    """Every trace point, pessimistic; after every marker and fsync, every in-between
    state since the marker before it; every way a never-fsynced file may read."""
    trace = recorded.trace
    plans = []
    variants = [*power_loss.UNSYNCED, _chunks_zeroed]
    for point in range(1, len(trace.events) + 1):
        plans += [(point, None, unsynced) for unsynced in variants if unsynced != "whole"]
    for point in _points(trace, sample=None, seed=0):
        for cut in _cuts(trace, point, count=None):
            plans += [(point, cut, unsynced) for unsynced in variants]
    what = f"slow, {request.node.callspec.id}"
    _report(_check_states(recorded, tmp_path, plans), what, request.config)
