"""The LinCIR caption-feature cache as a corpus grows: cost of one training step's cache work (add
a batch of new captions, read the batch back) with 10k vs 1M captions already cached, against the
earlier design that concatenated the whole table on every read, same run. Figures: RESULTS.md."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from cirlab.train.feature_cache import FeatureCache


class ConcatOnRead:
    """The earlier FeatureCache: pending rows joined to the table with torch.cat at every read."""

    def __init__(self, table: torch.Tensor) -> None:
        self.features, self.pos, self.pending, self.pending_ids = table, {}, [], []

    def add(self, ids: list[str], feats: torch.Tensor) -> None:
        for i, key in enumerate(ids):
            self.pos[key] = self.features.shape[0] + len(self.pending)
            self.pending.append(feats[i])
            self.pending_ids.append(key)

    def get(self, ids: list[str]) -> torch.Tensor:
        if self.pending:
            self.features = torch.cat([self.features, torch.stack(self.pending)])
            self.pending, self.pending_ids = [], []
        return self.features[[self.pos[i] for i in ids]]


def step_ms(cache, start: int, steps: int, batch: int, dim: int) -> float:
    feats = torch.randn(batch, dim)
    t = time.perf_counter()
    for s in range(steps):
        ids = [f"caption {start + s * batch + i}" for i in range(batch)]
        cache.add(ids, feats)
        cache.get(ids)
    return (time.perf_counter() - t) / steps * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 1_000_000])
    p.add_argument("--dim", type=int, default=768)  # ViT-L/14's joint space
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(2)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sizes:
            table = torch.randn(n, a.dim)
            ours = FeatureCache(tmp, f"{n:016d}", "text")
            ours.add([f"caption {i}" for i in range(n)], table)  # already cached corpus
            old = ConcatOnRead(table.clone())
            old.pos = dict(ours.pos)
            rows[n] = (step_ms(ours, n, a.steps, a.batch, a.dim), step_ms(old, n, a.steps, a.batch, a.dim))
            del ours, old, table
    for n, (ours, old) in rows.items():
        print(f"{n:>9,} cached captions, batch {a.batch}, dim {a.dim}: blocks {ours:7.2f} ms/step, "
              f"concat on read {old:8.2f} ms/step, ratio {ours / old:.3f}")
    small, large = rows[min(rows)][0], rows[max(rows)][0]
    print(f"blocks, {max(rows):,} vs {min(rows):,} cached: {large / small:.2f}x the step cost")


if __name__ == "__main__":
    main()
