"""Benchmark: the demo CLIP's loader work per batch and its optimizer step, before and after the
batched transforms and the fused AdamW, same machine, same run (a ratio each).

Loader: 128 JPEG pairs of a generated world (64 px), from raw tar bytes to the normalised batch:
(a) per image: PIL decode + open_clip's train pipeline (RandomResizedCrop bicubic, to_tensor,
normalize), the stream's path before; (b) torchvision's JPEG decode + `BatchedRandomResizedCrop`
(one crop box drawn per image, the resampling for the batch as matrix products), the path now.
Evaluation side: (c) per image: PIL decode + the eval pipeline; (d) `FixedSizeFastPath` (bit-identical).
Optimizer: AdamW over the demo CLIP's parameters (cirlab-tiny, 3.4 M, most of them the token
embedding) with random gradients: the per-tensor loop (torch's CPU default) vs `fused=True`.
Figures: best of --rounds, milliseconds per batch / step.

Run: python -m benchmarks.batched_transforms [--rounds 5]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path


def _best(fn, rounds: int) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str] | None = None) -> dict[str, float]:
    import open_clip
    import torch

    from cirlab.data.streaming import decode_image, decode_pixels
    from cirlab.data.synthetic import build_world
    from cirlab.data.tar_format import iter_tar_members
    from cirlab.models.transforms import build_transform
    from cirlab.train.config import OptimizerConfig
    from cirlab.train.optim import build_optimizer

    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world", seed=0, n_train_scenes=200, n_eval_queries=20, workers=1)
        jpegs = []
        for shard in sorted(world.path("pairs").glob("*.tar")):
            with open(shard, "rb") as f:
                jpegs += [data for name, data in iter_tar_members(f) if name.endswith(".jpg")]
    jpegs = jpegs[: a.batch]
    size = 64
    old_train = open_clip.image_transform(size, is_train=True, aug_cfg={"scale": (0.8, 1.0)})
    new_train = build_transform(size, "clip", train=True, train_scale=(0.8, 1.0))
    evaluation = build_transform(size, "clip", train=False)

    def per_image(pipeline):
        def run():
            torch.manual_seed(0)
            return torch.stack([pipeline(decode_image(d)) for d in jpegs])
        return run

    def batched(transform):
        def run():
            rng = random.Random(0)
            return transform.finish([transform.defer(decode_pixels(d), rng) for d in jpegs])
        return run

    assert torch.equal(per_image(evaluation.pipeline)(), batched(evaluation)())  # the eval path is exact
    res = {"train per image": _best(per_image(old_train), a.rounds), "train batched": _best(batched(new_train), a.rounds),
           "eval per image": _best(per_image(evaluation.pipeline), a.rounds),
           "eval batched": _best(batched(evaluation), a.rounds)}

    from cirlab.train.base import build_backbone
    from cirlab.train.config import BackboneConfig

    net = build_backbone(BackboneConfig("cirlab-tiny"))
    for prm in net.parameters():
        prm.grad = torch.randn_like(prm)
    for fused in (False, True):
        cfg = OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.1, no_decay_on_bias_and_norm=True, fused=fused)
        opt = build_optimizer(net.named_parameters(), cfg)
        res[f"adamw {'fused' if fused else 'loop'}"] = _best(opt.step, a.rounds)
    print(f"torch threads {torch.get_num_threads()}, batch {len(jpegs)} x {size} px JPEGs, best of {a.rounds}")
    for k, v in res.items():
        print(f"{k:>18}: {v:8.2f} ms")
    print(f"train transform per image / batched: {res['train per image'] / res['train batched']:.2f}x; "
          f"eval: {res['eval per image'] / res['eval batched']:.2f}x; "
          f"AdamW loop / fused: {res['adamw loop'] / res['adamw fused']:.2f}x")
    return res


if __name__ == "__main__":
    main()
