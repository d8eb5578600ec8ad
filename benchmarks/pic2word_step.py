"""Benchmark: a Pic2Word training step with cached image features vs the reference's loop, which
runs the frozen image tower on every batch.

Arms, same backbone (random weights), same batch, alternating in one process per model:
- `reference`: the reference's step: image tower forward (no grad) on the batch, mapper, the text
  tower on the full 77-token "a photo of *" sequence, backward to the mapper, AdamW step.
- `uncached`: our task with `cache_image_features: false` (the image tower every step; the text
  tower on the prompt's 6 positions only, see Pic2WordTask.trim_tokens).
- `cached`: our task with `cache_image_features: true` (features read from the FeatureCache).
- `floor-77` / `floor`: one text-tower forward + backward to the `*` input alone (no mapper, no
  optimizer), on 77 positions and on the 6 our step uses: what any step through the frozen text
  tower must pay.
Goals (issue 12): reference / cached >= 1.5x at ViT-B/32 and >= 4x at ViT-L/14; cached / floor
<= 1.1x.

Run: python -m benchmarks.pic2word_step [--models ViT-B-32 ViT-L-14 --batch 8 --steps 2 --rounds 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

ARMS = ("reference", "uncached", "cached", "floor-77", "floor")


def run_model(model: str, batch: int, steps: int, threads: int, device: str, rounds: int,
              names: tuple[str, ...] = ARMS) -> dict[str, float]:
    """Best seconds per step of every arm; the arms alternate within one process (one backbone), so
    a machine's load drifting over the run hits them alike."""
    from cirlab.losses import info_nce
    from cirlab.models import STAR_TOKEN_ID
    from cirlab.train.config import BackboneConfig
    from cirlab.train.feature_cache import FeatureCache
    from cirlab.train.optim import build_optimizer
    from cirlab.train.pic2word_task import TRAIN_PROMPT, Pic2WordTask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = Pic2WordTask(backbone=BackboneConfig(model)).to(device)
    task.train()
    opt = build_optimizer(task.named_parameters(), task.optimizer_cfg)
    size = task.backbone.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, device=device)
    ids = [f"img{i}" for i in range(batch)]
    full_tokens = task.backbone.tokenize([TRAIN_PROMPT] * batch).to(device)
    trimmed = task.trim_tokens(full_tokens)
    # the cache as fit start leaves it: every image encoded once; each step reads its batch
    cache = FeatureCache(tempfile.mkdtemp(prefix="cirlab-bench-p2w-"), task.backbone.fingerprint(), "image")
    with torch.no_grad():
        cache.add(ids, task.backbone.encode_image(images))

    def optimise(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def reference() -> None:  # image forward every step, the full-length prompt
        with torch.no_grad():
            feats = task.backbone.encode_image(images)
        text = task.backbone.encode_text_with_pseudo_tokens(full_tokens, task.mapper(feats), STAR_TOKEN_ID,
                                                            first_only=True)
        optimise(info_nce(task.normalize(feats), task.normalize(text), task.logit_scale(), symmetric=True))

    def uncached() -> None:
        optimise(task.pic2word_loss(task.image_features({"image": images, "id": ids})))

    def cached() -> None:
        optimise(task.pic2word_loss(cache.get(ids).to(device)))

    def floor(tokens: torch.Tensor) -> None:
        pseudo = torch.randn(batch, task.backbone.token_dim, device=device, requires_grad=True)
        out = task.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, STAR_TOKEN_ID, first_only=True)
        out.float().pow(2).mean().backward()

    arms = {"reference": reference, "uncached": uncached, "cached": cached,
            "floor-77": lambda: floor(full_tokens), "floor": lambda: floor(trimmed)}

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    best = dict.fromkeys(names, float("inf"))
    for _ in range(rounds):
        for name in names:
            arms[name]()  # warm-up
            sync()
            for _ in range(steps):  # the fastest single step: the least disturbed by other load
                t0 = time.perf_counter()
                arms[name]()
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-L-14"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="alternate the arms this many times; best counts")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS,
                   help="a subset, e.g. the cheap cached/floor arms with more rounds")
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.model:
        print(json.dumps(run_model(a.model, a.batch, a.steps, a.threads, a.device, a.rounds, tuple(a.arms))))
        return {}
    results = {}
    for model in a.models:  # each model in a fresh process
        out = subprocess.run([sys.executable, "-m", "benchmarks.pic2word_step", "--model", model,
                              "--batch", str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads),
                              "--device", a.device, "--rounds", str(a.rounds), "--arms", *a.arms],
                             capture_output=True, text=True,
                             check=True)
        t = json.loads(out.stdout.strip().splitlines()[-1])
        results[model] = t
        print(f"{model} batch {a.batch} on {a.device}: " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))
        ratios = [("reference / cached", "reference", "cached"), ("uncached / cached", "uncached", "cached"),
                  ("cached / floor", "cached", "floor"), ("cached / floor-77", "cached", "floor-77")]
        print("  " + ", ".join(f"{label} {t[x] / t[y]:.2f}x" for label, x, y in ratios if x in t and y in t),
              flush=True)
    return results


if __name__ == "__main__":
    main()
