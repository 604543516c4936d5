"""What the crash tests' writer child does, step by step, and what the cache should hold
after each step: the child runs the steps, the test replays them to know what a store
killed at any point may hold. Everything follows from the seed."""

from __future__ import annotations

import random
from collections import Counter
from typing import NamedTuple

import torch

# One key per kind of tensor: a float, a 16-bit float, an integer and a bool mask. Sizes
# make the writes take long enough that a kill finds some of them in flight.
KEYS: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
    "hidden": (torch.float32, (96, 256)),
    "half": (torch.bfloat16, (128, 256)),
    "positions": (torch.int64, (4096,)),
    "mask": (torch.bool, (256, 256)),
}


TOTALS: Counter = Counter()  # what the tests checked, for their summary line


class Step(NamedTuple):
    kind: str  # "append", "update", "delete" or "flush"
    batch: int = -1
    key: str = ""
    version: int = 0


def steps(seed: int, count: int = 48) -> list[Step]:
    """The child's steps: mostly appends and updates, a delete now and then, and a flush
    every few steps."""
    rng = random.Random(seed)
    model = [dict()]  # only which keys each batch has, to pick deletes and updates
    plan: list[Step] = [Step("append", 0)]
    model[0] = dict.fromkeys(KEYS, 0)
    until_flush = rng.randint(2, 5)
    version = 0
    while len(plan) < count:
        until_flush -= 1
        if until_flush == 0:
            plan.append(Step("flush"))
            until_flush = rng.randint(2, 5)
            continue
        choice = rng.random()
        if choice < 0.5:
            plan.append(Step("append", len(model)))
            model.append(dict.fromkeys(KEYS, 0))
        elif choice < 0.85:
            batch = rng.randrange(len(model))
            key = rng.choice(list(KEYS))
            version += 1
            plan.append(Step("update", batch, key, version))
            model[batch][key] = version
        else:
            batch = rng.randrange(len(model))
            if not model[batch]:
                continue
            key = rng.choice(sorted(model[batch]))
            plan.append(Step("delete", batch, key))
            del model[batch][key]
    return plan


def value(seed: int, batch: int, key: str, version: int) -> torch.Tensor:
    """The tensor the child stores under ``batch``/``key`` at ``version``."""
    dtype, shape = KEYS[key]
    generator = torch.Generator().manual_seed(
        seed * 1_000_003 + batch * 10_007 + version * 101 + list(KEYS).index(key)
    )
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) < 0.5
    if not dtype.is_floating_point:
        return torch.randint(-(2**40), 2**40, shape, generator=generator, dtype=dtype)
    return torch.randn(shape, generator=generator).to(dtype)


def batch_values(seed: int, batch: int) -> dict[str, torch.Tensor]:
    return {key: value(seed, batch, key, 0) for key in KEYS}


def states_at_flushes(plan: list[Step]) -> dict[int, list[dict[str, int]]]:
    """For the index of every flush step: the cache's contents right after it, as
    batch -> key -> version."""
    model: list[dict[str, int]] = []
    states = {}
    for index, step in enumerate(plan):
        if step.kind == "append":
            model.append(dict.fromkeys(KEYS, 0))
        elif step.kind == "update":
            model[step.batch][step.key] = step.version
        elif step.kind == "delete":
            del model[step.batch][step.key]
        else:
            states[index] = [dict(batch) for batch in model]
    return states
