"""Benchmark: encoding a gallery under one instruction (FocalLens) vs plain (unconditional) encoding.

ViT-B/16 with random weights (the cost does not depend on the values), the gate opened (a closed
gate would skip the instruction path), an instruction of exactly 8 tokens (SOT, 6 words, EOT). The
conditional arm encodes the instruction once with the frozen text tower, as the conditional
evaluation does, then every gallery batch with the 8 extra tokens; the baseline is encode_image on
the same batches. Arms alternate, best of --repeats each, same process. Goal: ratio <= 1.1.
Also printed: the median over rounds of each round's conditional / plain ratio (the two arms of a
round run back to back, so a slow phase of a noisy machine slows both: steadier than the bests').

Run: python -m benchmarks.focallens_encode [--model ViT-B-16 --images 64 --batch 16 --repeats 3 --conditioning xattn|mean]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

INSTRUCTION = "focus on the colour of cars"  # 6 words -> 8 tokens with SOT and EOT


def main(argv: list[str] | None = None) -> dict[str, float]:
    from cirlab.models.backbone import Backbone
    from cirlab.models.focallens import FocalLens

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--conditioning", default="xattn", choices=["xattn", "mean"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    bb = Backbone(a.model, freeze_text=True).eval().to(a.device)
    fl = FocalLens.for_backbone(bb, a.conditioning).eval().to(a.device)
    with torch.no_grad():
        fl.gate.normal_(0, 0.02)
    n_tokens = int(FocalLens.instruction_lengths(bb, bb.tokenize([INSTRUCTION]))[0])
    assert n_tokens == 8, n_tokens
    images = torch.randn(a.images, 3, bb.image_size, bb.image_size, device=a.device)

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def plain() -> None:
        for s in range(0, a.images, a.batch):
            bb.encode_image(images[s:s + a.batch])

    def conditional() -> None:
        instr, lengths = fl.encode_instructions(bb, [INSTRUCTION], images.device)  # once per gallery
        for s in range(0, a.images, a.batch):
            fl.encode_images(bb, images[s:s + a.batch], instr, lengths)

    best = {"plain": float("inf"), "conditional": float("inf")}
    rounds: list[dict[str, float]] = []
    with torch.no_grad():
        plain(), conditional()  # warm-up
        for _ in range(a.repeats):
            rounds.append({})
            for name, fn in (("plain", plain), ("conditional", conditional)):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                rounds[-1][name] = time.perf_counter() - t
                best[name] = min(best[name], rounds[-1][name])
    out = {"model": a.model, "device": a.device, "images": a.images, "batch": a.batch, "instruction_tokens": n_tokens,
           "plain_s": round(best["plain"], 4), "conditional_s": round(best["conditional"], 4),
           "ratio": round(best["conditional"] / best["plain"], 3),
           "median_round_ratio": round(statistics.median(r["conditional"] / r["plain"] for r in rounds), 3)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
