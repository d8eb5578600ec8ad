"""Benchmark: one OTI step vs the floor of the text-tower work it needs.

The floor, same batch, same run: the frozen text tower forward on the B content prompts and the B
`$` phrases (pre-tokenised, the pseudo token at the first `$`) and the backward to the tokens only
(the original phrases' features are frozen and cached, so they cost nothing per step). One OTI step
(`cirlab.train.oti.oti_batch`, phrase features cache warm) adds sampling the templates and phrases,
their token rows, the losses, AdamW and the EMA. Also reported: OTI images/s per core at the
reference's 350 steps per image.

Run: python -m benchmarks.oti_step [--model ViT-B-32 --batch 32 --steps 5 --rounds 3 --threads 2]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

PHRASES = ["a photo of {} that was taken in the garden of my grandmother last summer when it rained",
           "a photo of {} that shows how it looks from the side in the light of the morning sun",
           "a photo of {} that i found on the internet and liked a lot because of the colours"]
CONCEPTS = ["dog", "red bicycle", "coffee cup", "mountain", "sailing boat", "teddy bear", "violin", "lemon"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="alternate the arms this many times; best counts")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)

    from cirlab.data.concepts import CONCEPT_TEMPLATES
    from cirlab.data.phrases import oti_phrase
    from cirlab.models import DOLLAR_TOKEN_ID, Backbone
    from cirlab.train.oti import OTIConfig, PhraseBank, _Tokens, oti_batch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bb = Backbone(a.model, load_image_tower=False).eval().requires_grad_(False)
    b = a.batch
    table = {c: [t.format(c) for t in PHRASES] for c in CONCEPTS}
    bank = PhraseBank(table, top_k=15)
    concepts = [CONCEPTS[i % len(CONCEPTS):] + CONCEPTS[:i % len(CONCEPTS)] for i in range(b)]
    feats = torch.randn(b, bb.embed_dim)
    tokens = _Tokens(bb.tokenize)
    cfg = OTIConfig(steps=a.steps, batch_size=b)
    # warm: every original phrase's feature cached, every token row made (the steady state of a long job)
    bank.features([p for v in table.values() for p in v], lambda t: bb.encode_text(bb.tokenize(t)))
    tokens([t.format(" $ ") for t in CONCEPT_TEMPLATES] + [oti_phrase(p, c) for c, v in table.items() for p in v])

    rng = random.Random(0)
    floor_texts = [rng.choice(CONCEPT_TEMPLATES).format(" $ ") for _ in range(b)] + \
                  [oti_phrase(rng.choice(table[c[0]]), c[0]) for c in concepts]
    floor_tokens = bb.tokenize(floor_texts)

    def floor() -> float:
        t0 = time.perf_counter()
        for _ in range(a.steps):
            pseudo = torch.randn(b, bb.token_dim, requires_grad=True)
            out = bb.encode_text_with_pseudo_tokens(floor_tokens, pseudo.repeat(2, 1), DOLLAR_TOKEN_ID,
                                                    first_only=True)
            out.float().pow(2).mean().backward()
        return (time.perf_counter() - t0) / a.steps

    def oti() -> float:
        t0 = time.perf_counter()
        oti_batch(bb, feats, [bank.concepts_for(c) for c in concepts], bank, cfg, random.Random(1),
                  torch.Generator().manual_seed(1), tokens)
        return (time.perf_counter() - t0) / a.steps

    floor(), oti()  # warm-up
    best = {"floor": float("inf"), "oti": float("inf")}
    for _ in range(a.rounds):
        best["floor"] = min(best["floor"], floor())
        best["oti"] = min(best["oti"], oti())
    ratio = best["oti"] / best["floor"]
    per_core = b / (350 * best["oti"]) / a.threads
    print(f"model {a.model}, batch {b} ({2 * b} text rows), {a.threads} threads, best of {a.rounds} x {a.steps} steps")
    print(f"text-tower floor  {best['floor']:.3f} s/step")
    print(f"OTI step          {best['oti']:.3f} s/step  = {ratio:.2f}x the floor (goal <= 1.10x)")
    print(f"OTI throughput    {b / (350 * best['oti']):.3f} images/s at 350 steps/image = {per_core:.3f} images/s per core")
    return {"floor_s": best["floor"], "oti_s": best["oti"], "ratio": ratio, "images_per_s_per_core": per_core}


if __name__ == "__main__":
    main()
