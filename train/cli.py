"""The `cirlab` command: LightningCLI's fit/validate/test plus cirlab's own subcommands."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from typing import Callable, Optional

from lightning.pytorch.cli import LightningCLI

HELP = """usage: cirlab <command> [options]

Training (LightningCLI; recipes are YAML with class_path/init_args):
  fit        train a recipe:            cirlab fit -c recipes/quickstart/combiner.yaml
  validate   run the validation sets:   cirlab validate -c RECIPE --ckpt_path CKPT
  test       run the test sets:         cirlab test -c RECIPE --ckpt_path CKPT
  predict    (LightningCLI's own)

cirlab commands:
  data       write shards: convert (JSONL/CSV + images), synthetic, fashioniq, cirr, circo, mask
  evaluate   evaluate a trained checkpoint on evaluation sets, print and save the metrics
  retrieve   top-k gallery images for a query image + text with a trained checkpoint (HTML page)
  import     turn a reference repository's released checkpoint into cirlab safetensors
  demo       the quickstart: synthetic world -> tiny CLIP -> Combiner (2 stages) + LinCIR -> table

`cirlab <command> --help` describes each command's options.
"""


# Messages that say nothing to a cirlab user (each checked: the behaviour they describe is intended).
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)",             # a Lightning/torch version skew
    r".*`IterableDataset` has `__len__` defined",         # our streams split per worker themselves
    r".*smaller than the logging interval",
    r".*Found \d+ module\(s\) in eval mode",             # frozen backbones are in eval mode on purpose
    r".*all_gather is deprecated",
    r".*does not have many workers",
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_known_noise() -> None:
    """Silence known-harmless library chatter so that progress and results stay readable."""
    for pattern in _NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())


def precision_for_device(requested: str, on_cuda: bool, bf16_supported: bool) -> str:
    """The recipes' bf16-mixed where the GPU has bfloat16, else 16-mixed: autocast refuses bf16 on
    pre-Ampere GPUs (V100, T4). CPU autocast runs bf16 everywhere; other precisions stay as asked."""
    if requested == "bf16-mixed" and on_cuda and not bf16_supported:
        return "16-mixed"
    return requested


class CirlabCLI(LightningCLI):
    """LightningCLI with cirlab's defaults: any BaseTask subclass and any LightningDataModule."""

    def add_arguments_to_parser(self, parser) -> None:
        # CSV metrics and a rich progress bar unless the recipe names others (wandb, TensorBoard, …)
        parser.set_defaults({
            "trainer.default_root_dir": "runs",
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
            "trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.RichProgressBar"}],
        })

    def before_instantiate_classes(self) -> None:
        import torch

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.get("trainer")
        if trainer is None or trainer.get("precision") is None:
            return
        requested = str(trainer.precision)
        on_cuda = str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
        chosen = precision_for_device(requested, on_cuda, on_cuda and torch.cuda.is_bf16_supported())
        if chosen != requested:
            logging.getLogger("cirlab").warning("this GPU has no bfloat16: trainer.precision %s -> %s", requested, chosen)
            trainer.precision = chosen

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model section with the checkpoint's hyperparameters; evaluating
        subcommands then re-apply the task's `evaluation_overrides` (LinCIR's image tower)."""
        super()._parse_ckpt_path()
        sub = self.config.get("subcommand")
        if sub not in ("validate", "test", "predict") or not self.config[sub].get("ckpt_path"):
            return
        model = self.config[sub].get("model")
        class_path = getattr(model, "class_path", None)
        if not class_path:
            return
        module, name = class_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name, None)
        for key, value in getattr(cls, "evaluation_overrides", {}).items():
            model.init_args[key] = value


def run_lightning(args: Optional[list[str]]) -> int:
    """LightningCLI over `args` (None: read sys.argv, as a console script)."""
    saved = sys.argv
    if args is not None:
        sys.argv = sys.argv[:1]  # LightningCLI warns when both args and sys.argv carry arguments
    try:
        _cli(args)
    finally:
        sys.argv = saved
    return 0


def _cli(args: Optional[list[str]]) -> None:
    from lightning.pytorch import LightningDataModule

    from cirlab.train.base import BaseTask

    CirlabCLI(BaseTask, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True, args=args,
              save_config_kwargs={"overwrite": True})


def _data(argv: list[str]) -> int:
    from cirlab.data.commands import cli

    return cli(argv)


def _evaluate(argv: list[str]) -> int:
    from cirlab.train.commands import evaluate_cli

    return evaluate_cli(argv)


def _retrieve(argv: list[str]) -> int:
    from cirlab.train.retrieve import retrieve_cli

    return retrieve_cli(argv)


def _import(argv: list[str]) -> int:
    from cirlab.train.commands import import_cli

    return import_cli(argv)


def _demo(argv: list[str]) -> int:
    from cirlab.train.demo import demo_cli

    return demo_cli(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "data": _data, "evaluate": _evaluate, "retrieve": _retrieve, "import": _import, "demo": _demo,
}


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # wandb never phones home unless the user asks for it
    os.environ.setdefault("WANDB_MODE", "offline")
    quiet_known_noise()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:]) or 0
    if argv[0] not in ("fit", "validate", "test", "predict"):
        print(f"cirlab: unknown command {argv[0]!r}\n", file=sys.stderr)
        print(HELP, file=sys.stderr)
        return 2
    from_sys_argv = argv == sys.argv[1:]
    return run_lightning(None if from_sys_argv else argv)


if __name__ == "__main__":
    sys.exit(main())
