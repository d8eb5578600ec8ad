"""`cirlab demo` / `make demo`: the whole quickstart on the synthetic world, one table at the end.

Steps: write the synthetic world -> pre-train a tiny CLIP: a shape warm-up of its image tower
(recipes/quickstart/shapes.yaml), then both towers on the world's captions (recipes/quickstart/clip.yaml)
-> from that CLIP, two at a time in two processes: CLIP4Cir stage 1 (combiner-stage1.yaml) and stage 2
(combiner.yaml), FocalLens on the world's instructions (train/focallens_demo.py), LinCIR
(lincir.yaml), Pic2Word (pic2word.yaml) and SEARLE -> evaluate everything and the zero-training
baselines on the held-out test split -> print the tables (composed retrieval; conditional retrieval,
plain CLIP vs FocalLens) and write a report page with a few queries and their top results.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from safetensors.torch import load_file

COLUMNS = ("R@1", "R@5", "R@10", "mAP@5", "mAP@10")

# (world scenes, eval queries, clip epochs, stage-1 epochs, stage-2 epochs, lincir epochs, SEARLE sizes)
SCALES = {
    "full": dict(scenes=4000, queries=400, clip_epochs=20, s1_epochs=3, s2_epochs=20, lincir_epochs=4, p2w_epochs=8,
                 searle=dict(max_images=512, oti_steps=40, epochs=10), searle_query_oti_steps=40),
    # a smoke run of every step (tests): a few steps each
    "fast": dict(scenes=150, queries=30, clip_epochs=1, s1_epochs=1, s2_epochs=1, lincir_epochs=1, p2w_epochs=1,
                 steps=4,
                 searle=dict(max_images=64, oti_steps=4, epochs=1), searle_query_oti_steps=2),
}


def _fit(recipe: Path, out: Path, name: str, overrides: list[str]) -> Path:
    """Run `cirlab fit -c recipe` with the demo's paths; return the run's export folder."""
    from cirlab.train.cli import run_lightning

    args = ["fit", "-c", str(recipe), f"--trainer.default_root_dir={out / 'runs' / name}",
            f"--trainer.logger.init_args.save_dir={out / 'runs'}", f"--trainer.logger.init_args.name={name}",
            *overrides]
    cli = run_lightning(args)
    export = Path(cli.trainer.log_dir) / "export"  # runs/<name>/version_<n>/export: each run its own
    if not export.is_dir():
        raise RuntimeError(f"{recipe.name} finished without writing {export}")
    return export


def _test(task: Any, test_set: Path) -> tuple[dict[str, float], dict[str, Any]]:
    import lightning as L

    from cirlab.data.retrieval import RetrievalDataModule

    dm = RetrievalDataModule(test_sets=[str(test_set)], eval_batch_size=256, num_workers=0)
    # nine rows: the trainer's "GPU available ..." lines once per row would bury the table
    info = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = info.level
    info.setLevel(logging.WARNING)
    try:
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.test(task, datamodule=dm, verbose=False)
    finally:
        info.setLevel(level)
    return task.last_results["synthetic"], task.last_rankings["synthetic"]


def searle_settings(oti_steps: int, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """The demo's SEARLE follows recipes/quickstart/searle.yaml (one place for the synthetic world's
    values): its OTI config (for the training tokens and for SEARLE-OTI at query time) with the
    demo scale's step count, and phi's regulariser (`lambda_reg`, `top_k_concepts`)."""
    import yaml

    from cirlab.train.oti import OTIConfig

    model = yaml.safe_load((_recipes() / "searle.yaml").read_text())["model"]["init_args"]
    oti = OTIConfig(**{**model["oti"], "steps": oti_steps, "seed": seed})
    return oti, {"lambda_reg": model["lambda_reg"], "top_k_concepts": model["top_k_concepts"]}


def _load_module(module: torch.nn.Module, path: Path) -> None:
    module.load_state_dict(load_file(str(path)))


def evaluate_all(out: Path, clip: Path, stage1: Path, stage2: Path, lincir: Path, test_set: Path,
                 searle: Optional[Path] = None, query_oti_steps: int = 40, pic2word: Optional[Path] = None
                 ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Every row of the demo table, evaluated on the same test split."""
    from cirlab.train.base import exported_backbone
    from cirlab.train.baselines import BaselineTask
    from cirlab.train.combiner_task import CombinerTask
    from cirlab.train.config import BackboneConfig
    from cirlab.train.lincir_task import LinCIRTask

    tiny = "cirlab-tiny"
    rows: dict[str, dict[str, float]] = {}
    ranks: dict[str, dict[str, Any]] = {}
    for mode, label in (("image", "image only (no training)"), ("text", "text only (no training)"),
                        ("sum", "image + text (no training)")):
        task = BaselineTask(mode, backbone=BackboneConfig(tiny, exported_backbone(clip)))
        rows[label], ranks[label] = _test(task, test_set)
    s1 = CombinerTask(stage=1, backbone=BackboneConfig(tiny, exported_backbone(stage1),
                                                       image_transform="targetpad"))
    s1.backbone.requires_grad_(False)  # evaluated only: its gallery is stage 2's (shared_galleries)
    rows["CLIP4Cir stage 1 (fine-tuned sum)"], ranks["CLIP4Cir stage 1 (fine-tuned sum)"] = _test(s1, test_set)
    s2 = CombinerTask(stage=2, backbone=BackboneConfig(tiny, exported_backbone(stage2),
                                                       image_transform="targetpad"))
    _load_module(s2.combiner, stage2 / "combiner.safetensors")
    rows["CLIP4Cir Combiner (stage 2)"], ranks["CLIP4Cir Combiner (stage 2)"] = _test(s2, test_set)
    lc = LinCIRTask(image_tower=True, backbone=BackboneConfig(tiny, exported_backbone(lincir)))
    _load_module(lc.phi, lincir / "phi.safetensors")
    rows["LinCIR (text-only training)"], ranks["LinCIR (text-only training)"] = _test(lc, test_set)
    if pic2word is not None:
        from cirlab.train.pic2word_task import Pic2WordTask

        pw = Pic2WordTask(backbone=BackboneConfig(tiny, exported_backbone(pic2word)))
        _load_module(pw.mapper, pic2word / "mapper.safetensors")
        rows["Pic2Word (image-only training)"], ranks["Pic2Word (image-only training)"] = _test(pw, test_set)
    if searle is not None:
        from cirlab.train.searle_task import SEARLETask

        cfg = BackboneConfig(tiny, exported_backbone(searle), image_transform="targetpad")
        sr = SEARLETask(backbone=cfg)
        _load_module(sr.phi, searle / "phi.safetensors")
        rows["SEARLE (phi distilled from OTI)"], ranks["SEARLE (phi distilled from OTI)"] = _test(sr, test_set)
        root = searle.parent  # <out>/searle/export -> <out>/searle (concepts, phrases)
        so = SEARLETask(inversion="oti", concepts=str(root / "concepts"), phrases=str(root / "phrases.jsonl"),
                        oti=searle_settings(query_oti_steps)[0], backbone=cfg)
        rows["SEARLE-OTI (OTI at query time)"], ranks["SEARLE-OTI (OTI at query time)"] = _test(so, test_set)
    return rows, ranks


def print_table(rows: dict[str, dict[str, float]], title: str, columns: Optional[dict[str, str]] = None) -> str:
    """Print a rich table and return it as markdown; ``columns`` maps metric keys to headers."""
    from rich.console import Console
    from rich.table import Table

    columns = columns or {c: c for c in COLUMNS}
    table = Table(title=title)
    table.add_column("method")
    for header in columns.values():
        table.add_column(header, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m.get(c, float('nan')):.1f}" for c in columns))
    console = Console(width=120)
    console.print(table)
    lines = ["| method | " + " | ".join(columns.values()) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{m.get(c, float('nan')):.1f}" for c in columns) + " |"
              for n, m in rows.items()]
    return "\n".join(lines)


def breakdown_columns(rows: dict[str, dict[str, float]], k: int = 10) -> dict[str, str]:
    """R@k per edit type and per composition (seen / held-out), as found in the results."""
    keys = sorted({key for m in rows.values() for key in m if key.endswith(f"/R@{k}") and "=" in key},
                  key=lambda key: (not key.startswith("change="), key))
    return {key: key.split("/")[0].split("=", 1)[1] for key in keys}


def _gallery_images(test_set: Path) -> dict[str, bytes]:
    from cirlab.train.retrieve import ShardGallery

    return ShardGallery(test_set / "gallery").encoded()


def _recipes() -> Path:
    from cirlab.train.recipes import recipes_root

    return recipes_root() / "quickstart"  # the shipped recipes: works from any folder after pip install


def _common(cfg: dict[str, Any], seed: int) -> list[str]:
    common = ["--seed_everything", str(seed)]
    if cfg.get("steps"):
        common.append(f"--data.init_args.steps_per_epoch={cfg['steps']}")
    return common


def _pretrain_clip(out: Path, w: Path, cfg: dict[str, Any], seed: int) -> Path:
    """The demo's CLIP: a supervised shape warm-up of the image tower (contrastive pre-training from
    scratch never learns shape here), then CLIP on the world's pairs from those weights, with
    difference captions whose reference is one dense token (docs/zero-shot-synthetic.md, attempt 7)."""
    shapes = _fit(_recipes() / "shapes.yaml", out, "shapes", _common(cfg, seed) + [
        f"--data.init_args.train={w / 'objects'}"])
    return _fit(_recipes() / "clip.yaml", out, "clip", _common(cfg, seed) + [
        f"--model.init_args.backbone.pretrained={shapes / 'backbone.safetensors'}",
        f"--data.init_args.train={w / 'pairs'}", f"--data.init_args.val={w / 'pairs_val'}",
        f"--trainer.max_epochs={cfg['clip_epochs']}"])


def _combiner_branch(out: Path, w: Path, clip: Path, cfg: dict[str, Any], seed: int) -> tuple[Path, Path]:
    """CLIP4Cir stage 1 (both towers, summed query), then stage 2 (the Combiner on cached features)."""
    common, recipes = _common(cfg, seed), _recipes()
    print("CLIP4Cir stage 1: fine-tuning both towers with the summed query (combiner-stage1.yaml)", flush=True)
    stage1 = _fit(recipes / "combiner-stage1.yaml", out, "combiner-stage1", common + [
        f"--model.init_args.backbone.pretrained={clip / 'backbone.safetensors'}",
        "--data.init_args.num_workers=0",  # two branches already fill both cores: a worker only competes
        f"--data.init_args.train={w / 'triplets' / 'train'}", f"--data.init_args.val_sets=[{w / 'eval' / 'val'}]",
        f"--trainer.max_epochs={cfg['s1_epochs']}"])
    print("CLIP4Cir stage 2: the Combiner on cached frozen features (combiner.yaml)", flush=True)
    stage2 = _fit(recipes / "combiner.yaml", out, "combiner", common + [
        f"--model.init_args.backbone.pretrained={stage1 / 'backbone.safetensors'}",
        f"--model.init_args.cache_dir={out / 'feature_cache'}",
        f"--data.init_args.train={w / 'triplets' / 'train'}", f"--data.init_args.val_sets=[{w / 'eval' / 'val'}]",
        f"--trainer.max_epochs={cfg['s2_epochs']}"])
    return stage1, stage2


def _lincir_branch(out: Path, w: Path, clip: Path, cfg: dict[str, Any], seed: int) -> Path:
    """LinCIR: phi trained from captions alone."""
    print("LinCIR: training phi from captions alone (lincir.yaml)", flush=True)
    return _fit(_recipes() / "lincir.yaml", out, "lincir", _common(cfg, seed) + [
        f"--model.init_args.backbone.pretrained={clip / 'backbone.safetensors'}",
        f"--model.init_args.cache_dir={out / 'feature_cache'}",
        f"--data.init_args.train={w / 'texts'}", f"--trainer.max_epochs={cfg['lincir_epochs']}"])


def _pic2word_branch(out: Path, w: Path, clip: Path, cfg: dict[str, Any], seed: int) -> Path:
    """Pic2Word: the mapping network from the world's images alone."""
    print("Pic2Word: the mapping network from the world's images alone (pic2word.yaml)", flush=True)
    return _fit(_recipes() / "pic2word.yaml", out, "pic2word", _common(cfg, seed) + [
        f"--model.init_args.backbone.pretrained={clip / 'backbone.safetensors'}",
        f"--model.init_args.cache_dir={out / 'feature_cache'}",
        f"--data.init_args.train={w / 'images'}", f"--data.init_args.val_sets=[{w / 'eval' / 'val'}]",
        f"--trainer.max_epochs={cfg['p2w_epochs']}"])


def _searle_branch(out: Path, w: Path, clip: Path, cfg: dict[str, Any], seed: int) -> Path:
    """SEARLE: concepts, phrases, OTI tokens of the world's images, then phi distilled from them."""
    from cirlab.train.searle_task import searle_quickstart

    print("SEARLE: concepts, phrases, OTI on the world's images, then phi distilled from the tokens", flush=True)
    sc = cfg["searle"]
    oti, phi_reg = searle_settings(sc["oti_steps"], seed)
    return Path(searle_quickstart(str(w), str(out / "searle"), str(clip / "backbone.safetensors"),
                                  max_images=sc["max_images"], oti=oti, epochs=sc["epochs"], seed=seed, **phi_reg))


def _focallens_branch(out: Path, w: Path, clip: Path, cfg: dict[str, Any], seed: int,
                      scale: str) -> dict[str, dict[str, float]]:
    from cirlab.train.focallens_demo import run_focallens_demo

    print("FocalLens: the instruction-tuned image encoder on the conditional set (focallens.yaml)", flush=True)
    return run_focallens_demo(w, out / "focallens", clip, seed=seed, scale=scale)


def _in_log(log: str, fn: Any, *args: Any) -> tuple[Any, float]:
    """Run `fn(*args)` in this (spawned) process with its output in `log`; (result, seconds)."""
    import os
    import sys

    torch.set_num_threads(1)  # two branches share the two cores
    # Redirect file descriptors 1 and 2 only, and keep this process's sys.stdout / sys.stderr: a
    # logging handler made in an earlier branch (Lightning's and wandb's, on import) holds the stream
    # of that moment, which must stay open and now write into this branch's log.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):  # a file now, not a terminal: each line lands as written
            stream.reconfigure(line_buffering=True)
    try:
        t = time.perf_counter()
        result = fn(*args)
        return result, time.perf_counter() - t
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()  # the log is whole when the parent reports the branch done


def _run_branches(out: Path, branches: dict[str, tuple[Any, tuple]]) -> dict[str, Any]:
    """The methods' trainings, independent once the CLIP exists, in two processes side by side (one
    thread each: a tiny model keeps two threads busy only part of the time, two processes fill the
    gaps, and serial parts such as start-up and evaluation overlap); each branch's output goes to
    out/logs/<branch>.log. Submitted longest first; a process takes the next branch when it is free."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    # spawn, not fork: this process has run torch's thread pools, which a forked child must not inherit
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {name: pool.submit(_in_log, str(logs / f"{name}.log"), fn, *args)
                   for name, (fn, args) in branches.items()}
        for name, fut in futures.items():
            try:
                results[name], seconds = fut.result()
            except Exception as exn:
                raise RuntimeError(f"demo branch {name!r} failed: {type(exn).__name__}: {exn} "
                                   f"(its output: {logs / f'{name}.log'})") from exn
            print(f"      {name}: done in {seconds:.0f} s (log: {logs / f'{name}.log'})", flush=True)
    return results


def run_demo(out: str | Path = "demo_out", scale: str = "full", seed: int = 0) -> dict[str, dict[str, float]]:
    """The whole demo; returns the composed-retrieval rows. The methods train in spawned processes,
    which import the calling script again: call this from `cirlab demo`, or in a script under
    `if __name__ == "__main__":` (multiprocessing's rule for spawn)."""
    from cirlab.data.synthetic import build_world

    import warnings

    cfg = SCALES[scale]
    out = Path(out).resolve()
    # the demo runs on this machine by design: Lightning's hint to launch through srun, printed at
    # each fit where SLURM is installed, is noise here (slurm/ holds the cluster jobs)
    warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
    t0 = time.perf_counter()
    print(f"[1/5] writing the synthetic world ({cfg['scenes']} training scenes) to {out / 'world'}")
    world = build_world(out / "world", seed=seed, n_train_scenes=cfg["scenes"], n_eval_queries=cfg["queries"])
    w = world.root
    print("[2/5] pre-training the tiny CLIP: its image tower on the world's shapes (recipes/quickstart/shapes.yaml), "
          "then both towers on the world's captions (recipes/quickstart/clip.yaml)")
    clip = _pretrain_clip(out, w, cfg, seed)
    print("[3/5] training every method from that CLIP, two at a time in two processes: CLIP4Cir stages 1-2 "
          "(combiner-stage1.yaml, combiner.yaml), FocalLens (focallens.yaml), LinCIR (lincir.yaml), "
          "Pic2Word (pic2word.yaml), SEARLE", flush=True)
    args = (out, w, clip, cfg, seed)
    done = _run_branches(out, {  # the longest first: each process takes the next when it is free
        "combiner": (_combiner_branch, args), "focallens": (_focallens_branch, args + (scale,)),
        "lincir": (_lincir_branch, args), "pic2word": (_pic2word_branch, args), "searle": (_searle_branch, args),
    })
    (stage1, stage2), conditional = done["combiner"], done["focallens"]
    lincir, pic2word, searle = done["lincir"], done["pic2word"], done["searle"]
    print("[4/5] evaluating every model and the baselines on the held-out test split")
    test_set = w / "eval" / "test"
    from cirlab.train.evaluation import shared_galleries

    with shared_galleries():  # nine rows, three image encoders: each gallery encoded once per encoder
        rows, ranks = evaluate_all(out, clip, stage1, stage2, lincir, test_set, searle, cfg["searle_query_oti_steps"],
                                   pic2word)
    print("[5/5] the tables and the report page")
    minutes = (time.perf_counter() - t0) / 60
    md = print_table(rows, f"synthetic world, test split ({world.counts.get('eval/test/queries', '?')} queries), "
                           f"{minutes:.1f} min")
    by_type = breakdown_columns(rows)
    if by_type:  # where each method wins: R@10 per edit type and for seen / held-out compositions
        md += "\n\nR@10 by edit type and composition:\n\n" + print_table(
            rows, "R@10 by edit type and by composition (held_out = target holds an unseen colour+shape)", by_type)
    from cirlab.train.focallens_demo import COLUMNS as CONDITIONAL_COLUMNS

    md += "\n\nConditional retrieval (image + instruction -> images sharing the asked attribute):\n\n" + print_table(
        conditional, "conditional retrieval on the synthetic world: plain CLIP vs FocalLens", CONDITIONAL_COLUMNS)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    (out / "results_conditional.json").write_text(json.dumps(conditional, indent=1))
    (out / "results.md").write_text(md + "\n")
    from cirlab.train.report import write_report

    n_queries = world.counts.get("eval/test/queries", "?")
    report = write_report(out / "report.html", rows, ranks, _gallery_images(test_set), COLUMNS,
                          title="cirlab quickstart: composed retrieval on the synthetic world",
                          subtitle=f"held-out test split, {n_queries} queries; every method's top 5, hits marked")
    minutes = (time.perf_counter() - t0) / 60
    print(f"report page: {report}   results: {out / 'results.json'}, {out / 'results_conditional.json'}   "
          f"({minutes:.1f} min in all)")
    return rows


def demo_command(out: str = "demo_out", scale: Literal["full", "fast"] = "full", seed: int = 0) -> int:
    """The quickstart: synthetic world -> tiny CLIP -> CLIP4Cir, LinCIR, Pic2Word, SEARLE, FocalLens -> two tables.

    Args:
        out: output folder
        scale: full (the real demo: 8.6-13 min on 2 cores, by the host's load) or fast (a smoke run for tests)
        seed: seed of the world and of every run
    """
    run_demo(out, scale, seed)
    return 0


def demo_cli(argv: list[str]) -> int:
    from cirlab.typed_commands import run_function_command

    return run_function_command(demo_command, argv, "cirlab demo")
