"""Helpers shared by the tests: random tensors of every dtype, bit-exact comparison."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import torch

from spillcache._internal.dtypes import byte_view, raw_dtype

# numpy has a type of the same name and bits for exactly these.
NUMPY_KNOWN = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint16, torch.uint32, torch.uint64, torch.float16, torch.float32,
    torch.float64, torch.complex64, torch.complex128,
}  # fmt: skip

QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}

# Every dtype this torch has, except quantized ones (those need scales and stay in RAM).
ALL_DTYPES = sorted(
    {d for d in vars(torch).values() if isinstance(d, torch.dtype) and d not in QUANTIZED},
    key=str,
)


def tier_sizes(tier: int, write_behind: int, reads: int | None = None) -> dict[str, int]:
    """Config sizes for a host tier of ``tier`` bytes: host_bytes holds it and, besides
    it, the write-behind part and the read part (``reads``: as ``write_behind``)."""
    reads = write_behind if reads is None else reads
    return dict(
        host_bytes=tier + write_behind + reads,
        write_behind_bytes=write_behind,
        read_buffer_bytes=reads,
    )


# Every way a caller can keep the memory of a tensor it was given alive, by name: a
# buffer handed out under one of these must never be handed out again.
HOLDING_FORMS = {
    "tensor": lambda t: t,
    "typed view": lambda t: t.view(torch.bfloat16).view(512, 1024),
    "slice": lambda t: t[10:20],
    "numpy": lambda t: t.numpy(),
    "memoryview": lambda t: memoryview(t.numpy()),
    "from_numpy": lambda t: torch.from_numpy(t.numpy()),
}


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of ``dtype`` whose bits are random (NaN payloads and all)."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), dtype=torch.uint8, generator=generator)
    if dtype.itemsize == 1:
        return raw.reshape(shape).view(dtype)
    return raw.view(raw_dtype(dtype)).reshape(shape).view(dtype)


def bits(tensor: torch.Tensor) -> bytes:
    """The raw bytes of a tensor's elements, in logical order."""
    raw = tensor.detach().view(raw_dtype(tensor.dtype)).cpu().contiguous()
    return byte_view(raw).numpy().tobytes()


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same dtype, shape, device and bits."""
    assert isinstance(actual, torch.Tensor), f"expected a tensor, got {type(actual).__name__}"
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.device == expected.device, (actual.device, expected.device)
    assert bits(actual) == bits(expected), (
        f"bits differ for {expected.dtype} {tuple(expected.shape)}"
    )


def tensor_variants(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """Contiguous, non-contiguous, 0-d and empty tensors of one dtype."""
    base = random_tensor(dtype, (6, 40), seed)
    return {
        "contiguous": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "scalar": random_tensor(dtype, (), seed + 1),
        "empty": random_tensor(dtype, (0, 5), seed + 2),
    }


def spilling_variants(dtype: torch.dtype, above: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Contiguous, transposed, strided and offset tensors of one dtype, each holding more
    than ``above`` bytes (so that a cache whose host budget and inline_bytes are at most
    ``above`` can keep none of them in RAM), and a 0-d one where that is small enough."""
    cols = 40
    rows = max(2, -(-(above // dtype.itemsize + 1) // cols))  # rows * cols elements > above
    variants = {
        "contiguous": random_tensor(dtype, (rows, cols), seed),
        "transposed": random_tensor(dtype, (cols, rows), seed + 1).t(),
        "strided": random_tensor(dtype, (rows, 2 * cols), seed + 2)[:, 1::2],
        "offset": random_tensor(dtype, (rows + 1, cols), seed + 3)[1:],
    }
    if dtype.itemsize > above:
        variants["scalar"] = random_tensor(dtype, (), seed + 4)
    for name, tensor in variants.items():
        assert tensor.nbytes > above, (name, tensor.nbytes, above)
    return variants


def clone_bits(tensor: torch.Tensor) -> torch.Tensor:
    """A compact copy with exactly ``tensor``'s bits, for every dtype (copy kernels are
    missing for some, so the copy goes through the same-width unsigned type)."""
    raw = tensor.detach().view(raw_dtype(tensor.dtype))
    return raw.clone(memory_format=torch.contiguous_format).view(tensor.dtype)


def console_script() -> str:
    """The installed ``spillcache`` command (pip puts it beside this interpreter)."""
    import shutil
    from pathlib import Path

    beside = Path(sys.executable).with_name("spillcache")
    found = str(beside) if beside.exists() else shutil.which("spillcache")
    assert found, "the spillcache console script is not installed: pip install -e ."
    return found


# What the console script imports, and what its commands import as they run.
CONSOLE_MODULES = (
    "spillcache.cli", "spillcache._internal.cli.demo", "spillcache._internal.store.summary",
    "spillcache._internal.process.resolved",
)  # fmt: skip


def run_console(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """The ``spillcache`` console script run with ``args`` as a process of its own, as
    ``subprocess.run(capture_output=True, text=True)`` runs it (``env``: this process's
    by default), forked from a process that imported spillcache already
    (``preloaded.run``): a third of a second a run rather than three."""
    import preloaded

    return preloaded.run(
        [console_script(), *args], preload=CONSOLE_MODULES, env=env, cwd=cwd, timeout=timeout
    )


def run_preloaded_python(
    *args: str,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """``python *args`` (``-c CODE ...`` or a script), as ``run_console`` runs the
    console script: forked from a process that imported torch and spillcache already."""
    import preloaded

    return preloaded.run(args, preload=CONSOLE_MODULES, env=env, cwd=cwd, timeout=timeout)


def machine_settings(max_examples: int):
    """Hypothesis settings for the state machines' default run: a fixed set of
    ``max_examples`` sequences (derandomized: the same ones every run, nothing saved);
    ``exploring`` turns them into a run from random seeds."""
    from hypothesis import HealthCheck, settings

    return settings(
        max_examples=max_examples,
        stateful_step_count=30,
        deadline=None,
        derandomize=True,
        database=None,  # derandomized: nothing to replay, and no .hypothesis/ in the tree
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def exploring(base, max_examples: int):
    """``base`` from random seeds: a failure prints its steps and a @reproduce_failure
    blob to replay it."""
    from hypothesis import settings

    return settings(base, max_examples=max_examples, derandomize=False, print_blob=True)


def child_process(script: str | Path, *args: object):
    """``script`` run by this Python with ``args``, its stdin, stdout and stderr pipes of
    text, as ``subprocess.Popen`` runs it: the children that the crash, signal and
    kept-store tests kill. Forked from a process that imported torch and spillcache
    already (``preloaded.Child``, with Popen's attributes and methods)."""
    import preloaded

    return preloaded.Child([str(script), *map(str, args)], preload=CONSOLE_MODULES)


def progress_spies(said: list[str]) -> list[tuple[object, str, object]]:
    """Replacements ``(module, name, spy)`` that record in ``said`` every progress bar's
    title (as ``progress <title>``) and every line spillcache's resumable pipeline
    logs, each still shown as before; set them with ``setattr`` or a MonkeyPatch."""
    from llmcompressor.pipelines.sequential import pipeline

    from spillcache._internal.llmcompressor import resumable_pipeline

    tqdm, say = pipeline.tqdm, resumable_pipeline._say

    def titled(*args, **kwargs):
        said.append(f"progress {kwargs.get('desc')}")
        return tqdm(*args, **kwargs)

    def saying(message: str) -> None:
        said.append(message)
        say(message)

    return [(pipeline, "tqdm", titled), (resumable_pipeline, "_say", saying)]


def fetch_finishes_during_a_held_copy(cache, held, update, batch: int, expected) -> None:
    """``update()`` runs on a thread of its own while the pool's host copy of the tensor
    ``held(tensor)`` picks is held up: meanwhile another thread's ``fetch`` of ``batch``
    must finish (``["h"]``, equal to ``expected``), which it cannot if the copy runs
    under the pool's lock. The copy is then let go and the update must end."""
    transfers = cache._core.transfers
    plain_to_host = transfers.to_host
    copying, release = threading.Event(), threading.Event()

    def held_up(tensor, **options):
        if held(tensor):
            copying.set()
            release.wait()  # the copy "takes" until the test lets it end
        return plain_to_host(tensor, **options)

    transfers.to_host = held_up
    updater = threading.Thread(target=update)
    updater.start()
    try:
        assert copying.wait(timeout=30), "no copy of the tensor was made"
        fetched: list = []
        reader = threading.Thread(target=lambda: fetched.append(cache.fetch(batch)["h"]))
        reader.start()
        reader.join(timeout=30)
        assert not reader.is_alive(), "a fetch of another batch waited for the copy"
        assert_same(fetched[0], expected)
        assert updater.is_alive()  # the copy was still held up meanwhile
    finally:
        release.set()
        updater.join(timeout=30)
    assert not updater.is_alive()
