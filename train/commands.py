"""`cirlab evaluate` and `cirlab import`: a trained checkpoint on evaluation sets; released weights in."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional, Sequence


TASK_MODULES = ("cirlab.train.clip_task", "cirlab.train.combiner_task", "cirlab.train.lincir_task",
                "cirlab.train.baselines")


def load_task(ckpt: str | Path, **overrides: Any):
    """A task back from a Lightning checkpoint written by `cirlab fit` (any cirlab task class), ready to
    evaluate: the class's `evaluation_overrides` apply (LinCIR gets its image tower), then ``overrides``."""
    import importlib

    import torch

    from cirlab.train.base import BaseTask

    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    for module in TASK_MODULES:  # each registers its recipe dataclasses as safe to unpickle
        importlib.import_module(module)
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    class_path = ckpt.get("cirlab_task") or ckpt.get("hyper_parameters", {}).get("_class_path")
    if class_path is None or class_path.rsplit(".", 1)[0] not in TASK_MODULES:
        raise ValueError(f"{path} was not written by a cirlab task (class {class_path!r}); "
                         f"known task modules: {', '.join(TASK_MODULES)}")
    module, name = class_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    if not issubclass(cls, BaseTask):
        raise ValueError(f"{class_path} is not a cirlab task")
    kwargs = {**cls.evaluation_overrides, **overrides}
    return cls.load_from_checkpoint(str(path), map_location="cpu", weights_only=True, **kwargs)


def evaluate(task: Any, sets: Sequence[str], batch_size: int = 128, accelerator: str = "auto",
             precision: Optional[str] = None) -> dict[str, dict[str, float]]:
    """Rank every evaluation set with the task; CIRR/CIRCO test splits also get their submission files."""
    import lightning as L

    from cirlab.data.retrieval import RetrievalDataModule

    dm = RetrievalDataModule(test_sets=list(sets), eval_batch_size=batch_size, num_workers=0)
    kw = {"precision": precision} if precision else {}
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, **kw)
    trainer.test(task, datamodule=dm, verbose=False)
    return task.last_results


def format_metrics(name: str, metrics: dict[str, float]) -> str:
    """One line of overall metrics, then one indented line per breakdown field ("change=colour/R@10")."""
    overall = {k: v for k, v in metrics.items() if "=" not in k}
    lines = [name + ": " + ", ".join(f"{k} {v:.2f}" for k, v in overall.items())]
    groups: dict[str, list[str]] = {}
    for key, v in metrics.items():
        if "=" in key:
            field_value, metric = key.split("/", 1)
            field, value = field_value.split("=", 1)
            groups.setdefault(field, []).append(f"{value} {metric} {v:.2f}")
    lines += [f"  by {field}: " + ", ".join(items) for field, items in groups.items()]
    return "\n".join(lines)


def evaluate_cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="cirlab evaluate",
                                description="Evaluate a trained checkpoint on evaluation-set folders.")
    p.add_argument("--ckpt", required=True, help="a .ckpt written by `cirlab fit`")
    p.add_argument("--sets", nargs="+", required=True, help="evaluation-set folders (with protocol.json)")
    p.add_argument("--out", default=None, help="write the metrics here as JSON")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--submission-dir", default=None, help="where CIRR/CIRCO test-server files go")
    a = p.parse_args(list(argv))
    task = load_task(a.ckpt)
    if a.submission_dir:
        task.eval_cfg.submission_dir = a.submission_dir
    results = evaluate(task, a.sets, a.batch_size, a.accelerator)
    for name, metrics in results.items():
        print(format_metrics(name, metrics))
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return 0


IMPORT_KINDS = ("clip4cir-combiner", "pic2word", "searle-phi", "lincir-phi", "clip")


def import_cli(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="cirlab import",
                                description="Turn a reference repository's released checkpoint into safetensors.")
    p.add_argument("--kind", required=True, choices=IMPORT_KINDS,
                   help="clip = a CLIP state dict (CLIP4Cir stage-1 {'CLIP': …}, OpenAI or open_clip); needs --model")
    p.add_argument("--src", required=True, help="the released file")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--model", default=None, help="open_clip model name for --kind clip (e.g. RN50x4-quickgelu)")
    a = p.parse_args(list(argv))
    from safetensors.torch import save_file

    if a.kind == "clip":
        if not a.model:
            p.error("--kind clip needs --model (the open_clip name the weights belong to)")
        from cirlab.models import Backbone

        state = Backbone(a.model, a.src).merged_state_dict()
    else:
        from cirlab.models import import_reference_checkpoint

        state = import_reference_checkpoint(a.src, a.kind).state_dict()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, a.out)
    print(f"wrote {a.out} ({len(state)} tensors)")
    return 0
