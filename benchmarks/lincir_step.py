"""Benchmark: a LinCIR training step vs one plain forward+backward through the same text tower.

Two floors, same batch: `plain` = the text tower forward and backward with its weights' gradients
(an ordinary training step through the tower, the issue's floor), and the stricter `input-grad` =
the frozen tower forward with a pseudo token at every `$` and backward to that token only (what
any method training through a frozen tower must pay; cheaper, since no weight gradients are
formed). LinCIR adds phi (tiny) and z, the caption features: from the cache (no extra pass) or
from one no-grad forward (without).
Same text tower (ViT-B-32's unless --model), same batch, same run. Peak memory: each arm runs in a
fresh subprocess and reports ru_maxrss after its steps minus before them.

Run: python -m benchmarks.lincir_step [--model ViT-B-32 --batch 64 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CAPTION = "a large {} dog sitting on a red couch next to a small cat in a sunny living room number {}"
COLOURS = ["brown", "black", "white", "grey"]


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_arm(arm: str, model: str, batch: int, steps: int, threads: int) -> dict[str, float]:
    from cirlab.data.masking import KeywordMasker
    from cirlab.models import DOLLAR_TOKEN_ID
    from cirlab.train.config import BackboneConfig
    from cirlab.train.lincir_task import LinCIRTask

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = LinCIRTask(backbone=BackboneConfig(model), cache_text_features=(arm == "cached"),
                      cache_dir="/tmp/cirlab-bench-lincir")
    task.train()
    opt = task.configure_optimizers()["optimizer"]
    caps = [CAPTION.format(COLOURS[i % 4], i) for i in range(batch)]
    masker = KeywordMasker(tagger="auto")
    masked = masker.mask_batch(caps)
    tokens = task.backbone.tokenize(masked)
    if arm == "cached":  # warm the cache (one pass; later epochs reuse it)
        task.caption_features(caps)

    if arm == "plain":
        task.backbone.set_trainable(image=False, text=True)

    def step():
        if arm == "plain":
            out = task.backbone.encode_text(tokens)
            out.float().pow(2).mean().backward()
            task.backbone.zero_grad(set_to_none=True)
        elif arm == "floor":
            pseudo = torch.randn(batch, task.backbone.token_dim, requires_grad=True)
            out = task.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, DOLLAR_TOKEN_ID)
            out.float().pow(2).mean().backward()
        else:
            loss = task.smp_loss(caps, masked)
            opt.zero_grad()
            loss.backward()
            opt.step()

    step()  # warm-up
    before = _maxrss()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sec = (time.perf_counter() - t0) / steps
    return {"arm": arm, "s_per_step": sec, "peak_extra_mb": (_maxrss() - before) / 2**20,
            "peak_rss_mb": _maxrss() / 2**20}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=2, help="alternate the arms this many times; best counts")
    a = p.parse_args(argv)
    if a.arm:
        print(json.dumps(run_arm(a.arm, a.model, a.batch, a.steps, a.threads)))
        return {}
    best: dict[str, dict[str, float]] = {}
    for _ in range(a.rounds):
        for arm in ("plain", "floor", "cached", "uncached"):
            out = subprocess.run([sys.executable, "-m", "benchmarks.lincir_step", "--arm", arm, "--model", a.model,
                                  "--batch", str(a.batch), "--steps", str(a.steps), "--threads", str(a.threads)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if arm not in best or r["s_per_step"] < best[arm]["s_per_step"]:
                best[arm] = r
    plain, floor = best["plain"]["s_per_step"], best["floor"]["s_per_step"]
    names = {"plain": "plain fwd+bwd", "floor": "input-grad", "cached": "LinCIR cached", "uncached": "LinCIR uncached"}
    for arm in ("plain", "floor", "cached", "uncached"):
        r = best[arm]
        print(f"{names[arm]:16s} {r['s_per_step']:.3f} s/step  vs plain {r['s_per_step'] / plain:.2f}x  "
              f"vs input-grad {r['s_per_step'] / floor:.2f}x  peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_extra_mb']:.0f} MB during steps)")
    return best


if __name__ == "__main__":
    main()
