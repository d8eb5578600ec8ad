"""The `cirlab` command: LightningCLI's fit/validate/test/predict plus cirlab's own commands.

Every command is looked up in `COMMANDS` and imported only when it runs, so `cirlab --help` starts
without torch or Lightning. A user error (`cirlab.errors.CirlabError`) prints one line,
``cirlab <command>: error: …``, and exits 2; ``--debug`` or ``CIRLAB_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import logging
import os
import re
import sys
from typing import Callable, Optional

HELP = """usage: cirlab <command> [options]     (cirlab <command> --help: its options)

Training (LightningCLI; recipes are YAML with class_path/init_args, shipped ones by name):
  fit        train a recipe:            cirlab fit -c quickstart/combiner
  validate   run the validation sets:   cirlab validate -c RECIPE --ckpt_path CKPT
  test       run the test sets:         cirlab test -c RECIPE --ckpt_path CKPT
  predict    (LightningCLI's own)

cirlab commands:
  data       write shards: convert (JSONL/CSV + images, evaluation sets), synthetic, fashioniq, cirr,
             circo, mask
  evaluate   evaluate a trained checkpoint on evaluation sets, print and save the metrics
  retrieve   top-k gallery images for a query image + text with a trained checkpoint (HTML page)
  import     turn a reference repository's released checkpoint into cirlab safetensors
  export     write a run's export in a reference repository's released layout (pic2word)
  searle     SEARLE's batch jobs before fit: concepts, phrases, oti (recipes/searle/)
  recipes    list the recipes that ship with cirlab (cirlab recipes; cirlab recipes show NAME)
  slurm      render and submit sbatch jobs for a recipe: cirlab slurm submit -c RECIPE --nodes 2 ...
  demo       the quickstart: synthetic world -> tiny CLIP -> every method (Combiner, LinCIR, Pic2Word,
             SEARLE, FocalLens) -> tables and a report page
  demo-focallens  after `cirlab demo`: FocalLens trained 8x longer on its world -> conditional table

Options of every command: --debug (show the traceback of an error).
Recipe keys: docs/recipes.md.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

# command -> "module:function"; each function takes the remaining arguments and returns an exit code
COMMANDS: dict[str, str] = {
    "data": "cirlab.data.commands:cli",
    "evaluate": "cirlab.train.commands:evaluate_cli",
    "retrieve": "cirlab.train.retrieve:retrieve_cli",
    "searle": "cirlab.train.searle_commands:searle_cli",
    "import": "cirlab.train.commands:import_cli",
    "export": "cirlab.train.commands:export_cli",
    "recipes": "cirlab.train.recipes:recipes_cli",
    "demo": "cirlab.train.demo:demo_cli",
    "demo-focallens": "cirlab.train.focallens_demo:focallens_demo_cli",
    "slurm": "cirlab.train.slurm:slurm_cli",
}

# Messages that say nothing to a cirlab user (each checked: the behaviour they describe is intended).
_NOISE = (
    r".*isinstance\(treespec, LeafSpec\)",             # a Lightning/torch version skew
    r".*`IterableDataset` has `__len__` defined",         # our streams split per worker themselves
    r".*smaller than the logging interval",
    r".*Found \d+ module\(s\) in eval mode",             # frozen backbones are in eval mode on purpose
    r".*all_gather is deprecated",
    r".*does not have many workers",
    r".*Total length of .* across ranks is zero",        # an evaluation loader of a kept gallery
    r".*It is recommended to use `self.log\(.*sync_dist=True",  # evaluation logs the same value on every rank
)


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_known_noise() -> None:
    """Silence known-harmless library chatter so that progress and results stay readable."""
    import warnings

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


def _typed_model_keys(argv: list[str]) -> list[str]:
    """The model settings given as flags (`--model.init_args.oti.steps=4` -> "oti.steps")."""
    keys = []
    for arg in argv:
        if arg.startswith("--model."):
            key = arg[len("--model."):].split("=", 1)[0].removeprefix("init_args.")
            if key and key != "class_path" and key not in keys:
                keys.append(key)
    return keys


def _plain(value):
    """A parsed setting as plain data (nested Namespaces as dicts), for comparing and re-parsing."""
    return value.as_dict() if hasattr(value, "as_dict") else value


def _print_error(command: str, message: str, hint: Optional[str]) -> int:
    """`cirlab <command>: error: ...` (and `  hint: ...`) on stderr; the exit code 2."""
    print(f"cirlab {command}: error: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)
    return 2


def _lightning_cli_class():
    from lightning.pytorch.cli import LightningCLI

    import cirlab.train.strategies  # noqa: F401  registers `trainer.strategy: cirlab_fsdp`

    class CirlabCLI(LightningCLI):
        """LightningCLI with cirlab's defaults: any BaseTask subclass and any LightningDataModule."""

        def add_arguments_to_parser(self, parser) -> None:
            # CSV metrics and a rich progress bar unless the recipe names others (wandb, TensorBoard, …)
            parser.set_defaults({
                "trainer.default_root_dir": "runs",
                "trainer.logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "runs"}},
                "trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.RichProgressBar"}],
            })

        def _parse_ckpt_path(self) -> None:
            # Lightning puts a checkpoint's model settings over the parsed ones (the weights need them),
            # over the flags typed on this command line too: a typed flag wins again, and says so
            # (`cirlab test --ckpt_path C --model.init_args.inversion=oti` silently tested phi before)
            sub = self.config.get("subcommand")
            before = copy.deepcopy(self.config[sub].get("model")) if sub else None
            super()._parse_ckpt_path()
            if before is None or not self.config[sub].get("ckpt_path"):
                return
            model, typed, changed = self.config[sub].model, {}, []
            for key in _typed_model_keys(sys.argv[1:]):
                want, have = _plain(before.get(f"init_args.{key}")), _plain(model.get(f"init_args.{key}"))
                if want != have:
                    node = typed
                    *parents, leaf = key.split(".")
                    for part in parents:
                        node = node.setdefault(part, {})
                    node[leaf] = want
                    changed.append(f"{key}: {have!r} -> {want!r}")
            if typed:  # merged the way Lightning merged the checkpoint's
                self.config = self.parser.parse_object(
                    {sub: {"model": {"class_path": model["class_path"], "init_args": typed}}}, self.config)
            if changed:
                logging.getLogger("cirlab").warning("the command line's model settings over the checkpoint's: %s",
                                                    "; ".join(changed))

        def before_instantiate_classes(self) -> None:
            import torch

            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer = cfg.get("trainer")
            if trainer is None:
                return
            if self.subcommand == "fit" and cfg.get("ckpt_path"):
                from cirlab.train.resume import continue_wandb_run

                continue_wandb_run(trainer, cfg.get("ckpt_path"))
            if trainer.get("enable_progress_bar") is False and trainer.get("callbacks"):
                # the default rich bar would make Lightning refuse `enable_progress_bar: false`
                trainer.callbacks = [c for c in trainer.callbacks
                                     if not str(getattr(c, "class_path", "")).endswith("ProgressBar")]
            if trainer.get("precision") is None:
                return
            requested = str(trainer.precision)
            on_cuda = str(trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
            chosen = precision_for_device(requested, on_cuda, on_cuda and torch.cuda.is_bf16_supported())
            if chosen != requested:
                logging.getLogger("cirlab").warning("this GPU has no bfloat16: trainer.precision %s -> %s",
                                                    requested, chosen)
                trainer.precision = chosen

    return CirlabCLI


def run_lightning(args: list[str], exit_on_error: bool = True):
    """LightningCLI over `args` (e.g. ["fit", "-c", "quickstart/clip"]); returns the CLI object."""
    from lightning.pytorch import LightningDataModule

    from cirlab.train.base import BaseTask
    from cirlab.train.recipes import resolve_recipe_args

    args = resolve_recipe_args(list(args))
    saved = sys.argv
    # LightningCLI reads sys.argv, and Lightning's DDP launcher starts the other ranks with sys.argv:
    # they must see the same (resolved) arguments as this process
    sys.argv = [sys.argv[0], *args]
    try:
        return _lightning_cli_class()(BaseTask, LightningDataModule, subclass_mode_model=True,
                                      subclass_mode_data=True, args=None,
                                      save_config_kwargs={"overwrite": True},
                                      parser_kwargs={"exit_on_error": exit_on_error})
    finally:
        sys.argv = saved


def _class_keys(class_path: str) -> list[str]:
    """The recipe keys a class takes: its dataclass fields or constructor arguments."""
    import dataclasses
    import inspect

    module, name = class_path.rsplit(".", 1)
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return []
    if dataclasses.is_dataclass(cls):
        return [f.name for f in dataclasses.fields(cls)]
    keys: list[str] = []
    for klass in cls.__mro__:  # subclasses pass **kwargs on: collect the whole chain
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        keys += [p for p in inspect.signature(init).parameters if p not in ("self", "args", "kwargs") and p not in keys]
    return keys


def recipe_error_message(message: str) -> str:
    """jsonargparse's nested error as one line: the bad key, where it was given, the closest valid key."""
    bad = re.search(r"Option '([^']+)' is not accepted|Unrecognized arguments: (\S+)|Key \"([^\"]+)\" is not", message)
    if bad:
        key = next(g for g in bad.groups() if g).lstrip("-")
        owners = re.findall(r"class_path '([\w.]+)'", message[:bad.start()])
        owner = owners[-1] if owners else None
        valid = _class_keys(owner) if owner else []
        close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=1)
        where = f" in {owner}" if owner else ""
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"recipe key {key!r} does not exist{where}{hint}; every key is listed in docs/recipes.md and "
                "by `cirlab fit -c RECIPE --print_config`")
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    detail = [ln for ln in lines if not ln.startswith(("Subtypes:", "Errors:", "Given value", "- Expected a"))]
    return "; ".join(detail[-2:] if len(detail) > 2 else detail)


def _run_lightning_command(argv: list[str]) -> int:
    import argparse

    from cirlab.errors import CirlabError

    try:
        run_lightning(argv, exit_on_error=False)
    except argparse.ArgumentError as err:
        raise CirlabError(recipe_error_message(str(err)), f"`cirlab {argv[0]} --help` shows the options") from None
    return 0


def _load(target: str) -> Callable[[list[str]], int]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CIRLAB_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        debug = True
    # wandb never phones home unless the user asks for it
    os.environ.setdefault("WANDB_MODE", "offline")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(HELP)
        return 0
    command = argv[0]
    if command not in COMMANDS and command not in LIGHTNING_COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS) + list(LIGHTNING_COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"cirlab: error: unknown command {command!r}{hint}; `cirlab --help` lists the commands",
              file=sys.stderr)
        return 2
    quiet_known_noise()
    from cirlab.errors import CirlabError, user_error_in

    try:
        if command in LIGHTNING_COMMANDS:
            return _run_lightning_command(argv)
        return _load(COMMANDS[command])(argv[1:]) or 0
    except Exception as err:
        if debug:
            raise
        # the user's mistake, also when raised while a recipe's class was built (jsonargparse wraps it)
        mistake = user_error_in(err)
        if isinstance(mistake, CirlabError):
            return _print_error(command, mistake.message, mistake.hint)
        if mistake is not None:  # a path that is not there
            return _print_error(command, " ".join(str(mistake).split()), "check the path (--debug shows the traceback)")
        if type(err).__name__ == "MisconfigurationException":  # Lightning's verdict on a trainer setting
            return _print_error(command, " ".join(str(err).split()),
                                "check the recipe's trainer section (--debug shows the traceback)")
        raise
    except KeyboardInterrupt:
        print(f"cirlab {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
