"""The demo's second table: conditional retrieval on the synthetic world, plain CLIP vs FocalLens.

`run_focallens_demo` writes a conditional evaluation set from the world (new scenes of the training
combinations, data/synthetic_conditional.py), scores the unconditional CLIP baseline on it (the
demo's pre-trained tiny CLIP, the instruction ignored), fine-tunes FocalLens from that same CLIP on
the world's instruction shards through recipes/quickstart/focallens.yaml (`cirlab fit`, as every
other demo step) and scores the trained model on the same set. Both rows carry the conditional
protocol's metrics (mAP@10, R@1/5/10, per question type, answer-text A-R@1).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional

from cirlab.errors import CirlabError

BASELINE_ROW = "unconditional CLIP (no training)"
FOCALLENS_ROW = "FocalLens (instruction-tuned)"

# The table's columns: metric key -> header
COLUMNS = {"mAP@10": "mAP@10", "R@1": "R@1", "R@5": "R@5", "R@10": "R@10", "A-R@1": "answer R@1"}

# "full" fits the demo's budget (~90 s on 2 loaded cores, eval included); "long" trains 8x longer (the
# issue-14 measurement, `cirlab demo-focallens` after `make demo`); "fast" is a smoke run for tests
SCALES: dict[str, dict[str, Any]] = {
    "full": dict(epochs=6, steps=40, batch_size=128, warmup=30, gallery=400, queries=200, workers=0),
    "long": dict(epochs=12, steps=160, batch_size=128, warmup=30, gallery=400, queries=200, workers=2),
    "fast": dict(epochs=1, steps=3, batch_size=32, warmup=1, gallery=48, queries=16, workers=0),
}


def _fit(recipe: Path, out: Path, name: str, overrides: list[str]) -> Any:
    """`cirlab fit -c recipe` with this demo's paths; returns the CLI (its model is the trained task)."""
    from cirlab.train.cli import run_lightning

    return run_lightning(["fit", "-c", str(recipe), f"--trainer.default_root_dir={out / 'runs' / name}",
                          f"--trainer.logger.init_args.save_dir={out / 'runs'}",
                          f"--trainer.logger.init_args.name={name}", *overrides])


def run_focallens_demo(world_root: str | Path, out: str | Path, clip_export_dir: str | Path, seed: int = 0,
                       scale: str = "full") -> dict[str, dict[str, float]]:
    """{row name: conditional metrics} for the plain CLIP baseline and FocalLens fine-tuned from it.

    world_root: a world from `cirlab.data.synthetic.build_world` (its instructions/ shards);
    out: folder for the conditional set and the FocalLens run; clip_export_dir: the demo CLIP run's
    export/ folder (holding backbone.safetensors).
    """
    from cirlab.data.synthetic_conditional import write_conditional_set
    from cirlab.train.base import build_backbone, exported_backbone
    from cirlab.train.config import BackboneConfig
    from cirlab.train.conditional_eval import UnconditionalBaseline, evaluate_conditional, load_conditional_set
    from cirlab.train.recipes import recipes_root

    if scale not in SCALES:
        raise CirlabError(f"unknown FocalLens demo scale {scale!r}", f"use one of {', '.join(SCALES)}")
    cfg = SCALES[scale]
    world, out = Path(world_root), Path(out)
    instructions = _instructions_of(world)
    pretrained = exported_backbone(clip_export_dir)  # a clear error when the export is missing
    t0 = time.perf_counter()

    cond_dir = out / "conditional"
    write_conditional_set(cond_dir, seed=seed, image_size=_image_size(world), n_gallery=cfg["gallery"],
                          n_queries=cfg["queries"])

    recipe = recipes_root() / "quickstart" / "focallens.yaml"
    # the evaluation runs once, after training, on both models (not inside every epoch)
    cli = _fit(recipe, out, "focallens", [
        "--seed_everything", str(seed), f"--model.init_args.backbone.pretrained={pretrained}",
        "--model.init_args.eval_sets=[]", f"--model.init_args.scheduler.warmup_steps={cfg['warmup']}",
        f"--data.init_args.train={instructions}", f"--data.init_args.batch_size={cfg['batch_size']}",
        f"--data.init_args.steps_per_epoch={cfg['steps']}", f"--data.init_args.num_workers={cfg['workers']}",
        f"--trainer.max_epochs={cfg['epochs']}", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", "--trainer.callbacks=[]"])
    task = cli.model
    task.eval()
    device = task.device
    cset = load_conditional_set(cond_dir, task.image_transform(train=False), task.eval_cfg.batch_size)
    # the baseline: the backbone as it came from the CLIP run (the task's own was fine-tuned)
    clip = build_backbone(BackboneConfig(task.backbone_cfg.model_name, pretrained)).eval()
    rows = {
        BASELINE_ROW: evaluate_conditional(UnconditionalBaseline(clip), cset, task.eval_cfg.batch_size,
                                           "cpu", progress=False),
        FOCALLENS_ROW: evaluate_conditional(task, cset, task.eval_cfg.batch_size, device, progress=False),
    }
    print(f"FocalLens demo: {time.perf_counter() - t0:.0f} s (conditional set of {len(cset.queries)} queries)")
    return rows


def _instructions_of(world: Path) -> Path:
    instructions = world / "instructions"
    if not (instructions / "index.json").is_file():
        raise CirlabError(f"{world} holds no instruction shards (instructions/index.json)",
                          "pass the folder written by cirlab.data.synthetic.build_world")
    return instructions


def _image_size(world: Path) -> int:
    import json

    meta = world / "world.json"
    return int(json.loads(meta.read_text()).get("image_size", 64)) if meta.is_file() else 64


def shape_aware_clip(world: str | Path, out: str | Path, seed: int = 0) -> Path:
    """Pre-train the demo's tiny CLIP so that it sees shape; returns its export folder.

    The demo's own pre-training (train/demo.py `_pretrain_clip`): a supervised warm-up of the image
    tower on the world's one-object pictures (recipes/quickstart/shapes.yaml, 300 steps), then
    clip.yaml from it. Without the warm-up a linear probe finds shape at 37 % (docs/zero-shot-synthetic.md
    attempt 3), and FocalLens cannot answer "what colour is the circle?"; with it 87 % after the
    warm-up alone, 92 % after the CLIP pre-training (attempt 4).
    """
    world, out = Path(world), Path(out)
    if not (world / "objects" / "index.json").is_file():
        raise CirlabError(f"{world} holds no objects/ shards (one-object pictures for the shape warm-up)",
                          "rebuild the world with this version: cirlab data synthetic --out DIR")
    from cirlab.train.demo import SCALES, _pretrain_clip

    print("shape warm-up of the image tower (shapes.yaml), then CLIP pre-training from it (clip.yaml)", flush=True)
    return _pretrain_clip(out, world, SCALES["full"], seed)


def focallens_demo_command(world: str = "demo_out/world", out: str = "demo_out/focallens-long",
                           clip: Optional[str] = None, scale: Literal["long", "full", "fast"] = "long",
                           seed: int = 0) -> int:
    """The conditional-retrieval table alone, on a world from `cirlab demo` (issue 14's measurement).

    Args:
        world: the demo's synthetic world (instructions/ and objects/ shards)
        out: output folder (CLIP runs, conditional set, FocalLens run, results_conditional.json)
        clip: a CLIP export/ folder to start from; by default a CLIP that sees shape is pre-trained
            first (shape warm-up + clip.yaml, ~5 min on 2 cores)
        scale: long (1,920 FocalLens steps, ~12 min on 2 cores), full (the demo's 240) or fast (smoke run)
        seed: seed of every run and of the conditional set
    """
    import json

    from cirlab.train.demo import print_table

    t0 = time.perf_counter()
    _instructions_of(Path(world))  # before minutes of CLIP pre-training, not after
    export = Path(clip) if clip else shape_aware_clip(world, out, seed)
    rows = run_focallens_demo(world, out, export, seed=seed, scale=scale)
    minutes = (time.perf_counter() - t0) / 60
    print_table(rows, f"conditional retrieval on the synthetic world: plain CLIP vs FocalLens ({scale}, "
                      f"{minutes:.1f} min)", COLUMNS)
    (Path(out) / "results_conditional.json").write_text(json.dumps(rows, indent=1))
    return 0


def focallens_demo_cli(argv: list[str]) -> int:
    from cirlab.typed_commands import run_function_command

    return run_function_command(focallens_demo_command, argv, "cirlab demo-focallens")
