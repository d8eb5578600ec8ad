"""Stream resume latency late vs early in an epoch: time from `load_state_dict` to the first batch.

A 200k-sample text epoch (small samples: a caption + json each) in shards of 1000, shuffled
(shard order + a 1000-sample buffer), batch 256. A stream is read to 10 % and to 90 % of the
epoch and its position saved; a fresh stream loads each position and the time to its first batch
is measured (and the shard files it opened). The goal: 90 % costs at most 1.5x the 10 % resume
(a resume that re-reads the consumed part grows with the position: ~9x here). A fresh start's
first batch is the baseline of the same run.

    python -m benchmarks.resume_latency [--n 200000] [--shard 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from cirlab.data.shards import write_shards
from cirlab.data.streaming import ShardStream, StreamLoader, make_dataset


def write_texts(folder: Path, n: int, shard: int) -> None:
    samples = ({"id": f"t{i}", "text": f"a small red square left of a big blue circle number {i}"} for i in range(n))
    write_shards(samples, folder, "text", maxcount=shard)


def stream(folder: Path, batch: int) -> ShardStream:
    return make_dataset(folder, "text", resampled=False, batch_size=batch, shuffle_buffer=1000, seed=0,
                        equal_steps=True)


def position(folder: Path, batch: int, fraction: float) -> dict:
    """The saved state after reading `fraction` of the epoch."""
    s = stream(folder, batch)
    stop = int(len(s) * fraction)
    for k, _ in enumerate(StreamLoader(s), start=1):
        if k == stop:
            break
    return json.loads(json.dumps(s.state_dict()))


def first_batch(folder: Path, batch: int, state: dict | None) -> tuple[float, int]:
    """Seconds from construction + load_state_dict to the first batch, and shard files opened."""
    t0 = time.perf_counter()
    s = stream(folder, batch)
    if state is not None:
        s.load_state_dict(state)
    next(iter(StreamLoader(s)))
    return time.perf_counter() - t0, s.shards_opened


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--shard", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "texts"
        t0 = time.perf_counter()
        write_texts(folder, args.n, args.shard)
        print(f"wrote {args.n} samples in {args.n // args.shard} shards ({time.perf_counter() - t0:.1f} s)")
        states = {f: position(folder, args.batch, f) for f in (0.1, 0.9)}
        times: dict[str, list[float]] = {"fresh": [], "10%": [], "90%": []}
        opened: dict[str, int] = {}
        for _ in range(args.rounds):  # alternate, so machine load hits all alike
            for name, state in (("fresh", None), ("10%", states[0.1]), ("90%", states[0.9])):
                sec, n_open = first_batch(folder, args.batch, state)
                times[name].append(sec)
                opened[name] = n_open
        med = {k: statistics.median(v) for k, v in times.items()}
        print("| start | first batch, median s | rounds (s) | shard files opened |")
        print("|---|---|---|---|")
        for k in times:
            print(f"| {k} | {med[k]:.3f} | {', '.join(f'{t:.3f}' for t in times[k])} | {opened[k]} |")
        print(f"90 % / 10 % resume: {med['90%'] / med['10%']:.2f}x (goal <= 1.5x); "
              f"10 % resume / fresh start: {med['10%'] / med['fresh']:.2f}x")


if __name__ == "__main__":
    main()
