"""Benchmark: CLIPTask's training step vs a plain CLIP step (open_clip's loss recipe), same batch.

Arms, same backbone (random weights), same batch of images and distinct captions, alternating in
one process:
- `plain`: encode both towers, symmetric cross-entropy of scale * img @ txt.T, backward, AdamW step
  (what open_clip's ClipLoss does on one process).
- `task`: `CLIPTask.training_step` as the demo runs it (identical captions masked: the ids hashed
  and the mask built every step), backward, AdamW step.
- `task+negatives`: the same with `hard_negatives=1`, one shape-swapped caption per pair (one more
  text-tower pass over B captions).
- `task+dense`: the demo's `dense_references: 0.5, dense_inversions: 0.25` on a batch whose
  every other pair is a difference caption (the world's mix): a no-grad text pass over the chosen
  references and the pseudo-token pass for their captions.
Goal: task / plain <= 1.05 (the masking is free); task+negatives is the price of NegCLIP,
task+dense that of the dense reference tokens.

Run: python -m benchmarks.clip_step [--model cirlab-tiny --batch 128 --steps 3 --rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

ARMS = ("plain", "task", "task+negatives", "task+dense")


def run(model: str, batch: int, steps: int, rounds: int, threads: int) -> dict[str, float]:
    """Best seconds per step of every arm (the arms alternate, so load drift hits them alike)."""
    from cirlab.data import synthetic as S
    from cirlab.train.clip_task import CLIPTask
    from cirlab.train.config import BackboneConfig
    from cirlab.train.optim import build_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    task = CLIPTask(backbone=BackboneConfig(model), hard_negatives=1)
    task.train()
    opt = build_optimizer(task.named_parameters(), task.optimizer_cfg)
    dense_task = CLIPTask(backbone=BackboneConfig(model), dense_references=0.5, dense_inversions=0.25)
    dense_task.backbone.load_state_dict(task.backbone.state_dict())
    dense_task.train()
    dense_opt = build_optimizer(dense_task.named_parameters(), dense_task.optimizer_cfg)
    size = task.backbone.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size)
    objs = [S.Obj(i % 9, S.SHAPES[i % 4], list(S.COLOURS)[i % len(S.COLOURS)], S.SIZES[i % 2]) for i in range(batch)]
    texts = [f"a photo of {S.object_phrase(o)} number {i}" for i, o in enumerate(objs)]
    negatives = [[t.replace(o.shape, S.SHAPES[(S.SHAPES.index(o.shape) + 1) % 4])] for t, o in zip(texts, objs)]

    def optimise(loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain() -> None:
        img = task.normalize(task.backbone.encode_image(images))
        txt = task.normalize(task.backbone.encode_text(task.backbone.tokenize(texts)))
        logits = task.logit_scale() * img @ txt.T
        labels = torch.arange(batch)
        optimise((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)

    def with_task(k: int) -> None:
        task.hard_negatives = k
        optimise(task.training_step({"image": images, "text": texts, "negatives": negatives}, 0))

    # the world's mix: every other pair a difference caption with its reference kept apart
    refs = [S.object_phrase(o) if i % 2 else None for i, o in enumerate(objs)]
    dense_texts = [f"a photo of * , make the {o.shape} red number {i}" if i % 2 else None for i, o in enumerate(objs)]

    def with_dense() -> None:
        batch_ = {"image": images, "text": texts, "reference": refs, "dense_text": dense_texts}
        dense_opt.zero_grad(set_to_none=True)
        dense_task.training_step(batch_, 0).backward()
        dense_opt.step()

    arms = {"plain": plain, "task": lambda: with_task(0), "task+negatives": lambda: with_task(1),
            "task+dense": with_dense}
    best = dict.fromkeys(ARMS, float("inf"))
    for _ in range(rounds):
        for name in ARMS:
            arms[name]()  # warm-up
            for _ in range(steps):
                t0 = time.perf_counter()
                arms[name]()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict[str, float]:
    import logging
    import warnings

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="cirlab-tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step outside a Trainer
    logging.getLogger("lightning").setLevel(logging.ERROR)
    t = run(a.model, a.batch, a.steps, a.rounds, a.threads)
    print(f"{a.model} batch {a.batch}, {a.threads} threads: " + ", ".join(f"{k} {v:.3f} s" for k, v in t.items()))
    print(f"  task / plain {t['task'] / t['plain']:.3f}x, task+negatives / plain "
          f"{t['task+negatives'] / t['plain']:.3f}x, task+dense / plain {t['task+dense'] / t['plain']:.3f}x", flush=True)
    return t


if __name__ == "__main__":
    main()
