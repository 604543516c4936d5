"""What does the cache cost per call when everything fits in RAM?

Times fetch / update / delete of one batch, in the propagation pass's pattern (fetch all
inputs, delete the consumed hidden state, store the new one), for a spillcache
IntermediatesCache with a host tier larger than the data and no disk tier, against a
plain list-of-dicts cache that copies nothing: the limit any cache is measured against.
A batch is a realistic set of inputs: a 1x2048x4096 bf16 hidden state, an attention mask
and position ids (int64) and an int. The two caches are timed in alternating rounds, so
the machine's drift hits both alike. Figures are medians and 90th percentiles in
microseconds, not means: a garbage collection or a page fault is a tail, not a trend.
Target: the cache's median <= 1.5x the plain dict's, per batch (all three calls).

    python bench/overhead.py [--batches 32] [--rounds 200] [--seq 2048] [--hidden 4096]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from common import add_publish_option, percentiles, report, verdict
from spillcache import CacheConfig, IntermediatesCache

TARGET = 1.5
OPS = ("fetch", "delete", "update")


class DictCache:
    """The limit: the documented methods over a list of dicts, no copies, no locks."""

    def __init__(self, num_batches: int) -> None:
        self.batches = [{} for _ in range(num_batches)]

    def fetch(self, batch_index, input_names=None):
        batch = self.batches[batch_index]
        names = batch if input_names is None else input_names
        return {name: batch[name] for name in names if name in batch}

    def update(self, batch_index, values):
        self.batches[batch_index].update(values)

    def delete(self, batch_index, consumed_names=None):
        batch = self.batches[batch_index]
        for name in list(batch) if consumed_names is None else consumed_names:
            batch.pop(name, None)


def make_batches(count: int, seq: int, hidden: int) -> list[dict]:
    """Distinct values per batch (made once, untimed), as a dataloader would give them."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1, seq, hidden, generator=generator).to(torch.bfloat16)
    return [
        {
            "hidden_states": base + b,
            "attention_mask": torch.ones(1, seq, dtype=torch.int64),
            "position_ids": torch.arange(seq, dtype=torch.int64).unsqueeze(0),
            "logits_to_keep": b,
        }
        for b in range(count)
    ]


def one_round(cache, batches: list[dict], samples: dict[str, list[float]]) -> None:
    """One propagation pass over every batch; appends each call's time in seconds."""
    names = list(batches[0])
    clock = time.perf_counter
    for b, values in enumerate(batches):
        start = clock()
        cache.fetch(b, names)
        fetched = clock()
        cache.delete(b, ["hidden_states"])
        deleted = clock()
        cache.update(b, {"hidden_states": values["hidden_states"]})
        updated = clock()
        samples["fetch"].append(fetched - start)
        samples["delete"].append(deleted - fetched)
        samples["update"].append(updated - deleted)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=200, help="passes over every batch")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=4096)
    add_publish_option(parser)
    args = parser.parse_args()

    batches = make_batches(args.batches, args.seq, args.hidden)
    total = sum(v.nbytes for values in batches for v in values.values() if torch.is_tensor(v))
    config = CacheConfig(host_bytes=4 * total, disk_path=None)  # inline_bytes: the default
    caches = {
        "dict": DictCache(args.batches),
        "spillcache": IntermediatesCache.empty(args.batches, offload_device="cpu", config=config),
    }
    samples = {name: {op: [] for op in OPS} for name in caches}
    for cache in caches.values():
        for b, values in enumerate(batches):
            cache.update(b, values)
        one_round(cache, batches, {op: [] for op in OPS})  # warm-up, not counted
    gc.collect()
    for _ in range(args.rounds):
        for name, cache in caches.items():
            one_round(cache, batches, samples[name])
    caches["spillcache"].close()

    rows = []
    for op in (*OPS, "per batch"):
        if op == "per batch":  # the three calls of one batch, summed call by call
            got = {n: [sum(t) for t in zip(*s.values(), strict=True)] for n, s in samples.items()}
        else:
            got = {name: samples[name][op] for name in caches}
        plain, ours = percentiles(got["dict"]), percentiles(got["spillcache"])
        rows.append(
            {
                "op": op,
                "dict p50 us": 1e6 * plain[50],
                "dict p90 us": 1e6 * plain[90],
                "cache p50 us": 1e6 * ours[50],
                "cache p90 us": 1e6 * ours[90],
                "x p50": ours[50] / plain[50],
                "x p90": ours[90] / plain[90],
                "added p50 us": 1e6 * (ours[50] - plain[50]),
                "target": f"<={TARGET}x {verdict(ours[50] / plain[50], TARGET)}",
            }
        )
    count = args.rounds * args.batches
    print(
        f"{count} calls per operation, {args.batches} batches of "
        f"{total / args.batches / 2**20:.1f} MiB; us = microseconds\n"
    )
    extra = {"calls_per_op": count, "batch_bytes": total // args.batches}
    report("overhead", rows, extra, publish=args.publish)


if __name__ == "__main__":
    main()
