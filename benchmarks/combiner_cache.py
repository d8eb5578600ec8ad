"""Benchmark: CLIP4Cir stage-2 training throughput with the feature cache vs re-encoding every step.

The reference re-encodes reference and target images (and texts) through the frozen CLIP on every
step; cirlab encodes them once and trains the Combiner from cached features. Same backbone
(ViT-B-32 sized, random weights), same Combiner, same batch, same run; images are already decoded
and transformed tensors in both arms, so the ratio understates the gain (the reference also
decodes JPEGs every epoch).

Run: python -m benchmarks.combiner_cache [--batch 64 --ref-steps 2 --cached-steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from cirlab.train.combiner_task import CombinerTask
from cirlab.train.config import BackboneConfig


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ref-steps", type=int, default=2)
    p.add_argument("--cached-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    task = CombinerTask(stage=2, backbone=BackboneConfig(a.model, image_transform="targetpad"))
    task.backbone.eval()
    opt = task.configure_optimizers()["optimizer"]
    size = task.backbone.image_size
    n = a.batch * 4  # a small pool of distinct images and texts, cycled
    images = torch.randn(n, 3, size, size)
    texts = [f"make it colour number {i} with pattern {i % 7}" for i in range(n)]
    ids = [f"img{i}" for i in range(n)]

    def combiner_step(ref, txt, tgt):
        loss = task.loss(task.combine(ref, txt), tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()

    # reference behaviour: every step runs the frozen towers on the batch
    t0 = time.perf_counter()
    for s in range(a.ref_steps):
        i = torch.arange(s * a.batch, (s + 1) * a.batch) % n
        j = (i + 1) % n
        with torch.no_grad():
            ref = task.backbone.encode_image(images[i])
            tgt = task.backbone.encode_image(images[j])
            txt = task.encode_texts([texts[k] for k in i.tolist()])
        combiner_step(ref, txt, tgt)
    ref_rate = a.ref_steps * a.batch / (time.perf_counter() - t0)

    # cirlab: fill the cache once (not timed: it is one pass, amortised over every epoch), then train
    from cirlab.train.feature_cache import FeatureCache

    task._image_cache = FeatureCache("/tmp/cirlab-bench-cache", "bench" * 4, "image")
    task._text_cache = FeatureCache("/tmp/cirlab-bench-cache", "bench" * 4, "text")
    with torch.no_grad():
        for s in range(0, n, a.batch):
            task._image_cache.add(ids[s:s + a.batch], task.backbone.encode_image(images[s:s + a.batch]))
            task._text_cache.add(texts[s:s + a.batch], task.encode_texts(texts[s:s + a.batch]))
    t0 = time.perf_counter()
    for s in range(a.cached_steps):
        i = (torch.arange(s * a.batch, (s + 1) * a.batch) % n).tolist()
        j = [(k + 1) % n for k in i]
        ref = task._image_cache.get([ids[k] for k in i])
        tgt = task._image_cache.get([ids[k] for k in j])
        txt = task._text_cache.get([texts[k] for k in i])
        combiner_step(ref, txt, tgt)
    cached_rate = a.cached_steps * a.batch / (time.perf_counter() - t0)
    res = {"reference_samples_per_s": ref_rate, "cached_samples_per_s": cached_rate,
           "speedup": cached_rate / ref_rate}
    print(f"{a.model}, batch {a.batch}, {a.threads} threads: re-encoding {ref_rate:.1f} samples/s, "
          f"cached {cached_rate:.1f} samples/s, speed-up {cached_rate / ref_rate:.0f}x")
    return res


if __name__ == "__main__":
    main()
