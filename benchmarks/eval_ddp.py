"""Benchmark: evaluation of one large gallery under 2 DDP processes vs 1 (same run, same machine).

The evaluation component splits the gallery shards over the ranks, so each rank encodes its share;
the features are gathered and each rank ranks its share of the queries. Measured: gallery images
encoded per rank (goal <= 0.55x the single-process count) and the wall time of `trainer.test`
(a ratio; on a 2-core machine both processes share the same cores, so the time ratio shows the
overhead of splitting, not the speed-up of N GPUs).

Run: python -m benchmarks.eval_ddp [--gallery 50000 --queries 1000 --image-size 32]
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_set(out: Path, n_gallery: int, n_queries: int, size: int, shard: int, seed: int = 0) -> Path:
    """A synthetic evaluation set: random small images, queries naming a reference and a target."""
    from cirlab.data.evalset import Protocol, write_eval_set

    rng = np.random.default_rng(seed)

    def png(i: int) -> bytes:
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()

    gallery = ({"id": f"g{i:07d}", "image": png(i)} for i in range(n_gallery))
    pick = np.random.default_rng(seed + 1)
    blank = io.BytesIO()
    Image.new("RGB", (1, 1)).save(blank, format="PNG")  # the reference's feature comes from the gallery
    queries = []
    for q in range(n_queries):
        ref, tgt = (int(x) for x in pick.integers(0, n_gallery, 2))
        queries.append({"id": f"q{q:06d}", "ref": blank.getvalue(), "ref_id": f"g{ref:07d}", "texts": [f"make it shade {q % 97}"],
                        "target_id": f"g{tgt:07d}", "gt_ids": [f"g{tgt:07d}"], "text_format": "plain"})
    protocol = Protocol(name="bench", split="test", exclude_reference=True, recall_ks=[1, 10, 50])
    return write_eval_set(out, protocol, queries, gallery, maxcount=shard).root


def worker(eval_set: str, out: str, devices: int, batch: int) -> None:
    """One `trainer.test` of the image+text baseline on cirlab-tiny (random weights, seeded)."""
    import lightning as L
    import torch

    from cirlab.data.retrieval import RetrievalDataModule
    from cirlab.train.baselines import BaselineTask
    from cirlab.train.config import BackboneConfig

    torch.manual_seed(0)
    torch.set_num_threads(max(1, 2 // devices))  # the 2 cores shared out
    task = BaselineTask("sum", backbone=BackboneConfig("cirlab-tiny"))
    dm = RetrievalDataModule(test_sets=[eval_set], eval_batch_size=batch, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    t0 = time.perf_counter()
    trainer.test(task, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - t0
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"encoded": task.encoded_gallery_images("test"), "seconds": seconds,
         "metrics": task.last_results.get("bench", {})}))


def run(eval_set: Path, devices: int, batch: int, tmp: Path) -> list[dict]:
    out = tmp / f"out{devices}"
    out.mkdir()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "benchmarks.eval_ddp", "--worker", str(eval_set), str(out), str(devices),
                    str(batch)], check=True)
    wall = time.perf_counter() - t0
    ranks = [json.loads((out / f"rank{i}.json").read_text()) for i in range(devices)]
    for r in ranks:
        r["wall"] = wall
    return ranks


def main(argv: list[str] | None = None) -> dict[str, float]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        worker(argv[1], argv[2], int(argv[3]), int(argv[4]))
        return {}
    p = argparse.ArgumentParser()
    p.add_argument("--gallery", type=int, default=50000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--shard", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        eval_set = write_set(tmp / "set", a.gallery, a.queries, a.image_size, a.shard)
        print(f"wrote {a.gallery} gallery images and {a.queries} queries in {time.perf_counter() - t0:.1f} s")
        one = run(eval_set, 1, a.batch, tmp)
        two = run(eval_set, 2, a.batch, tmp)
    assert all(r["metrics"] == one[0]["metrics"] for r in two), "2 processes disagree with 1"
    encoded = max(r["encoded"] for r in two) / one[0]["encoded"]
    res = {"gallery": a.gallery, "encoded_1": one[0]["encoded"], "encoded_2_per_rank": [r["encoded"] for r in two],
           "encoded_ratio": encoded, "test_seconds_1": one[0]["seconds"],
           "test_seconds_2": max(r["seconds"] for r in two), "wall_1": one[0]["wall"], "wall_2": two[0]["wall"]}
    res["time_ratio"] = res["test_seconds_2"] / res["test_seconds_1"]
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
