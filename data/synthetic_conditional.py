"""Conditional retrieval sets from the synthetic world (FocalLens's evaluation, METHODS.md "FocalLens").

A query = an image + an instruction in the words of the world's instruction shards ("what colour is
the circle?"), with its answer. Positives = the other gallery images whose answer to the same
instruction is the same (they "share the named attribute": a red circle for "what colour is the
circle?" answered "red"; the same object count for "how many objects are there?"). A gallery image
the instruction does not apply to (no circle) is a negative. Written as an ordinary evaluation set
(data/evalset.py): queries carry ``texts = [instruction]``, ``answer``, ``question_type`` and
``gt_ids``; the protocol's ``text_format`` is ``"instruction"``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Iterator, Sequence

from cirlab.data.evalset import EvalSet, Protocol, write_eval_set
from cirlab.data.synthetic import (ALL_COMBOS, HELD_OUT, NUMBER_WORDS, Obj, _jpeg, _np_rng, _py_rng,
                                   random_scene, render)

QUESTION_TYPES = ("colour", "shape", "count", "size")
# far from the streams synthetic.py uses (1-5 and the eval splits)
_STREAM = 41


def _questions(scene: Sequence[Obj]) -> list[tuple[str, str, str, tuple]]:
    """Every unambiguous (type, instruction, answer, key) of a scene; key says what a gallery image must share."""
    out = [("count", "how many objects are there?", NUMBER_WORDS[len(scene)], ("count",))]
    shapes, colours = [o.shape for o in scene], [o.colour for o in scene]
    for o in scene:
        if shapes.count(o.shape) == 1:
            out.append(("colour", f"what colour is the {o.shape}?", o.colour, ("colour", o.shape)))
            out.append(("size", f"what size is the {o.shape}?", o.size, ("size", o.shape)))
        if colours.count(o.colour) == 1:
            out.append(("shape", f"what shape is the {o.colour} object?", o.shape, ("shape", o.colour)))
    return out


def answers_of(scene: Sequence[Obj], key: tuple) -> set[str]:
    """The answers `scene` gives to the instruction `key` names (empty: it does not apply)."""
    kind = key[0]
    if kind == "count":
        return {NUMBER_WORDS[len(scene)]}
    if kind == "colour":
        return {o.colour for o in scene if o.shape == key[1]}
    if kind == "size":
        return {o.size for o in scene if o.shape == key[1]}
    if kind == "shape":
        return {o.shape for o in scene if o.colour == key[1]}
    raise ValueError(f"unknown question kind {kind!r}")


def write_conditional_set(out_dir: str | os.PathLike, seed: int = 0, image_size: int = 64, n_gallery: int = 400,
                          n_queries: int = 200, split: str = "test",
                          question_types: Sequence[str] = QUESTION_TYPES, shard_size: int = 1000) -> EvalSet:
    """Write one conditional set (new scenes of the training combinations) into ``out_dir``."""
    bad = [t for t in question_types if t not in QUESTION_TYPES]
    if bad or not question_types:
        raise ValueError(f"question_types {list(question_types)} must be a non-empty subset of {QUESTION_TYPES}")
    if n_queries > n_gallery:
        raise ValueError(f"n_queries={n_queries} > n_gallery={n_gallery}: queries are gallery images")
    rng, nrng = _py_rng(seed, _STREAM), _np_rng(seed, _STREAM)
    seen = [c for c in ALL_COMBOS if c not in HELD_OUT]
    scenes = [random_scene(rng, seen) for _ in range(n_gallery)]
    ids = [f"{split}-c{i:06d}" for i in range(n_gallery)]
    images = [_jpeg(render(s, nrng, image_size)) for s in scenes]

    queries: list[dict[str, Any]] = []
    for qi, gi in enumerate(rng.sample(range(n_gallery), n_queries)):
        # balance question types: each query draws a type first, then one of its instructions
        options = [q for q in _questions(scenes[gi]) if q[0] in question_types]
        types = sorted({q[0] for q in options})
        qtype = rng.choice(types)
        _, instruction, answer, key = rng.choice([q for q in options if q[0] == qtype])
        gt = [ids[j] for j in range(n_gallery) if j != gi and answer in answers_of(scenes[j], key)]
        if not gt:
            continue  # nothing shares the attribute: no ground truth to rank (rare; counted below)
        queries.append({"id": f"{split}-cq{qi:06d}", "ref": images[gi], "ref_id": ids[gi], "texts": [instruction],
                        "answer": answer, "question_type": qtype, "target_id": gt[0], "gt_ids": gt,
                        "text_format": "instruction"})

    def gallery() -> Iterator[dict[str, Any]]:
        for gid, img in zip(ids, images):
            yield {"id": gid, "image": img}

    protocol = Protocol(name="synthetic-conditional", split=split, exclude_reference=True, recall_ks=[1, 5, 10],
                        map_ks=[10], text_format="instruction", breakdown=["question_type"],
                        score_keys=["mAP@10"])
    return write_eval_set(Path(out_dir), protocol, iter(queries), gallery(), maxcount=shard_size)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m cirlab.data.synthetic_conditional --out DIR`: write one conditional set."""
    import argparse

    p = argparse.ArgumentParser(prog="cirlab.data.synthetic_conditional", description=write_conditional_set.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gallery", type=int, default=400)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--split", default="test")
    a = p.parse_args(argv)
    es = write_conditional_set(a.out, a.seed, a.image_size, a.gallery, a.queries, a.split)
    print(f"wrote {es.queries.total} queries and {es.gallery.total} gallery images to {es.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
