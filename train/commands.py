"""`cirlab evaluate` and `cirlab import`: a trained checkpoint on evaluation sets; released weights in.

Each command is a typed function; `run_function_command` builds its parser from the signature with
jsonargparse (so every option is typed, documented by the docstring, and readable from a config file
with `--config`), and the CLI imports it only when the command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from cirlab.errors import CirlabError
from cirlab.typed_commands import run_function_command
from cirlab.train.checkpointing import load_task  # noqa: F401  (the public place users import it from)


def evaluate(task: Any, sets: Sequence[str], batch_size: int = 128, accelerator: str = "auto",
             precision: Optional[str] = None, devices: int = 1) -> dict[str, dict[str, float]]:
    """Rank every evaluation set with the task; CIRR/CIRCO test splits also get their submission files."""
    import lightning as L

    from cirlab.data.retrieval import RetrievalDataModule

    dm = RetrievalDataModule(test_sets=list(sets), eval_batch_size=batch_size, num_workers=0)
    kw = {"precision": precision} if precision else {}
    trainer = L.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, **kw)
    trainer.test(task, datamodule=dm, verbose=False)
    return task.last_results


def _ranks_evaluation_sets(task: Any) -> bool:
    import lightning as L

    return type(task).test_step is not L.LightningModule.test_step


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


def evaluate_command(sets: list[str], ckpt: Optional[str] = None,
                     baseline: Optional[Literal["image", "text", "sum"]] = None, model: Optional[str] = None,
                     pretrained: Optional[str] = None, out: Optional[str] = None, batch_size: int = 128,
                     accelerator: str = "auto", submission_dir: Optional[str] = None) -> int:
    """Evaluate a trained checkpoint, or a backbone as a zero-training baseline, on evaluation-set folders.

    Args:
        sets: evaluation-set folders (with protocol.json)
        ckpt: a .ckpt written by `cirlab fit` (any cirlab task)
        baseline: score a backbone with no training, the query being the reference image (image), the
            text (text) or their normalised sum (sum): the backbone of --ckpt (a CLIP run's), or of
            --model / --pretrained
        model: open_clip model name of a backbone without a checkpoint (ViT-B-32, cirlab-tiny)
        pretrained: that backbone's weights: a pretrained tag (laion2b_s34b_b79k), a weights file, or a
            run's export/ folder; none: random init
        out: write the metrics here as JSON
        batch_size: images per encoding batch
        accelerator: lightning accelerator (auto, cpu, gpu)
        submission_dir: where CIRR/CIRCO test-server files go
    """
    from cirlab.data.evalset import load_eval_set

    if ckpt and (model or pretrained):
        raise CirlabError("--ckpt brings its own backbone; --model / --pretrained name a backbone without one",
                          "give --ckpt alone (add --baseline to score its backbone), or --baseline with "
                          "--model and --pretrained")
    if not ckpt and not model:
        raise CirlabError("nothing to evaluate: no --ckpt and no --model",
                          "--ckpt RUN.ckpt, or a zero-training baseline: --baseline sum --model ViT-B-32 "
                          "--pretrained laion2b_s34b_b79k")
    if model and not baseline:
        raise CirlabError(f"--model {model} without a checkpoint is scored as a zero-training baseline, and "
                          "--baseline is not set", "add --baseline sum (or image, or text)")
    for s in sets:  # fail before loading the model, naming the folder
        load_eval_set(s)
    if ckpt:
        task = load_task(ckpt)
    if baseline:
        from cirlab.train.baselines import BaselineTask

        if ckpt:
            task = BaselineTask.on_backbone_of(task, baseline)
        else:
            from cirlab.train.base import exported_backbone
            from cirlab.train.config import BackboneConfig

            if pretrained and Path(pretrained).is_dir():
                pretrained = exported_backbone(pretrained)
            task = BaselineTask(baseline, backbone=BackboneConfig(model, pretrained)).eval()
    from cirlab.train.conditional import ConditionalEmbeddingTask

    if isinstance(task, ConditionalEmbeddingTask):  # FocalLens: image + instruction -> images, its own protocol
        return _report(task.evaluate_conditional_sets(list(sets)), out)
    if not _ranks_evaluation_sets(task):
        raise CirlabError(f"{ckpt} holds a {type(task).__name__}, which does not rank evaluation sets "
                          "(`cirlab evaluate` scores composed-retrieval and conditional tasks)",
                          "score its backbone as a zero-training baseline: add --baseline sum (or image, or "
                          "text); its own validation: `cirlab validate -c RECIPE --ckpt_path CKPT`")
    if submission_dir:
        task.eval_cfg.submission_dir = submission_dir
    return _report(evaluate(task, sets, batch_size, accelerator), out)


def _report(results: dict[str, dict[str, float]], out: Optional[str]) -> int:
    for name, metrics in results.items():
        print(format_metrics(name, metrics))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(results, indent=1))
    return 0


def evaluate_cli(argv: Sequence[str]) -> int:
    return run_function_command(evaluate_command, argv, "cirlab evaluate")


IMPORT_KINDS = ("clip4cir-combiner", "pic2word", "searle-phi", "lincir-phi", "clip")


def import_command(kind: Literal["clip4cir-combiner", "pic2word", "searle-phi", "lincir-phi", "clip"],
                   src: str, out: str, model: Optional[str] = None) -> int:
    """Turn a reference repository's released checkpoint into safetensors.

    Args:
        kind: the release format; clip = a CLIP state dict (CLIP4Cir stage-1 {'CLIP': …}, OpenAI or open_clip)
        src: the released file
        out: output .safetensors
        model: open_clip model name for --kind clip (e.g. RN50x4-quickgelu)
    """
    from safetensors.torch import save_file

    if kind == "clip":
        if not model:
            raise CirlabError("--kind clip needs --model", "name the open_clip model the weights belong to")
        from cirlab.models import Backbone

        state = Backbone(model, src).merged_state_dict()
    else:
        from cirlab.models import import_reference_checkpoint

        state = import_reference_checkpoint(src, kind).state_dict()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out)
    print(f"wrote {out} ({len(state)} tensors)")
    return 0


def import_cli(argv: Sequence[str]) -> int:
    return run_function_command(import_command, argv, "cirlab import")


def export_command(kind: Literal["pic2word"], export_dir: str, out: Optional[str] = None,
                   model: Optional[str] = None) -> int:
    """Write a run's export in a reference repository's released layout (so the authors' scripts read it).

    Args:
        kind: the layout: pic2word = {'state_dict', 'state_dict_img2text'} with DDP's module. prefix
        export_dir: a run's export/ folder (runs/<name>/version_N/export)
        out: the file to write (default: beside the export)
        model: open_clip model name, only when the export holds backbone weights rather than backbone.json
    """
    from cirlab.train.pic2word_task import released_from_export

    print(f"wrote {released_from_export(export_dir, out, model)}")
    return 0


def export_cli(argv: Sequence[str]) -> int:
    return run_function_command(export_command, argv, "cirlab export")
