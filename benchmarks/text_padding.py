"""Text tower forward+backward: Backbone.encode_text (padding after the last end token skipped)
vs open_clip's own encode_text over the whole 77-token context, same captions, same run.

Run: python -m benchmarks.text_padding [--model cirlab-tiny] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from cirlab.data.synthetic import random_scene, training_caption, ALL_COMBOS
from cirlab.models.backbone import Backbone


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cirlab-tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    rng = random.Random(0)
    texts = [training_caption(random_scene(rng, ALL_COMBOS), rng) for _ in range(a.batch)]  # the demo's captions
    b = Backbone(a.model)
    tokens = b.tokenize(texts)

    def ours():
        b.zero_grad(set_to_none=True)
        b.encode_text(tokens).sum().backward()

    def full():
        b.zero_grad(set_to_none=True)
        b.model.encode_text(tokens).sum().backward()

    t_full, t_ours = _time(full, a.repeats), _time(ours, a.repeats)
    used = int(b.trim_padding(tokens).shape[1])
    print(f"{a.model}, batch {a.batch}, {used} of {tokens.shape[1]} positions used: open_clip full context "
          f"{t_full * 1e3:.0f} ms, trimmed {t_ours * 1e3:.0f} ms, ratio {t_ours / t_full:.2f}x")


if __name__ == "__main__":
    main()
