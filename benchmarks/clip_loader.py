"""Benchmark: the demo's CLIP pre-training in `Trainer.fit` with the loader in the main process vs
in worker processes, on the same machine and world.

Each arm is a real fit of `recipes/quickstart/clip.yaml`'s task and data (cirlab-tiny, batch 128,
dense references 0.5 / inversions 0.25, pair shards of a small synthetic world, JPEG decode and
the CLIP train transform in the loader), validation off; the arms alternate, so load drift hits
them alike. The figure is the training loop's wall time (first batch to the end of the last
epoch, the loader's restarts at each epoch included, as in the demo's 20 epochs) over its steps.
Why: on 2 cores a loader worker competes with the step's 2 threads; `clip.yaml` sets
`num_workers: 0` from this measurement (docs/zero-shot-synthetic.md, attempt 9).

Run: python -m benchmarks.clip_loader [--workers 0 2 --epochs 2 --steps 20 --rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _fit_seconds_per_step(pairs: str, workers: int, epochs: int, steps: int) -> float:
    import lightning.pytorch as pl

    from cirlab.data.retrieval import RetrievalDataModule
    from cirlab.train.clip_task import CLIPTask
    from cirlab.train.config import BackboneConfig

    class Clock(pl.Callback):
        start = end = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if not self.start:
                self.start = time.perf_counter()  # after setup and the first batch's load

        def on_train_end(self, trainer, pl_module) -> None:
            self.end = time.perf_counter()

    pl.seed_everything(0, verbose=False)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny", image_transform="clip", train_scale=[0.8, 1.0]),
                    dense_references=0.5, dense_inversions=0.25)
    data = RetrievalDataModule(train=pairs, kind="pair", batch_size=128, steps_per_epoch=steps,
                               num_workers=workers)
    clock = Clock()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[clock])
    trainer.fit(task, datamodule=data)
    # the first batch's load is outside the clock: count the steps after it
    return (clock.end - clock.start) / (epochs * steps - 1)


def run(workers: list[int], epochs: int, steps: int, rounds: int, scenes: int) -> dict[int, float]:
    """Best seconds per training step of each worker count over the rounds."""
    from cirlab.data.synthetic import build_world

    with tempfile.TemporaryDirectory() as tmp:
        world = build_world(Path(tmp) / "world", seed=0, n_train_scenes=scenes, n_eval_queries=50, workers=1)
        pairs = str(world.path("pairs"))
        best = {w: float("inf") for w in workers}
        for _ in range(rounds):
            for w in workers:
                best[w] = min(best[w], _fit_seconds_per_step(pairs, w, epochs, steps))
    return best


def main(argv: list[str] | None = None) -> dict[int, float]:
    import logging
    import warnings

    p = argparse.ArgumentParser()
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scenes", type=int, default=1000, help="training scenes of the generated world")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    t = run(a.workers, a.epochs, a.steps, a.rounds, a.scenes)
    base = t[a.workers[0]]
    print(f"CLIP fit, {a.epochs} epochs x {a.steps} steps of 128: " + ", ".join(
        f"workers {w} {s:.3f} s a step ({s / base:.3f}x of workers {a.workers[0]})" for w, s in t.items()), flush=True)
    return t


if __name__ == "__main__":
    main()
