"""SLURM batch jobs: render and submit the sbatch templates of slurm/, and preemption handling.

`submit(recipe, nodes, gpus_per_node, time, ...)` turns a recipe into an sbatch script (one
`cirlab fit` per GPU started by srun; Lightning's SLURM environment gives the ranks) and submits
it; `--array sweep.yaml` makes one array task per entry of a YAML list of overrides.

Every job names its run after the SLURM job (`slurm-<jobid>`, `slurm-<arrayjob>_<task>` in an
array), which a requeued job keeps: the logger's version (CSV, TensorBoard) or id (wandb) and the
trainer's `default_root_dir` are that name, so the requeue continues the same run folder and
Lightning finds the `hpc_ckpt_*.ckpt` there and resumes from it by itself.

`SlurmRequeue` (added to every job's callbacks) turns the `--signal=USR1@90` warning into a
checkpoint at the next step boundary (model, optimizer, schedule, the stream position) on all
ranks together, then `scontrol requeue`. Lightning's own handler saves inside the signal handler,
possibly mid-step, which can record a batch as consumed before its update (a skipped sample).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import yaml

from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

TEMPLATES = {"single": "single-node.sbatch", "multi": "multi-node.sbatch", "array": "array.sbatch"}
_LOGGER_VERSION_KEY = {  # how each logger is told its run name
    "CSVLogger": "version", "TensorBoardLogger": "version", "WandbLogger": "id",
}


# --------------------------------------------------------------------------- run names


def slurm_run_id(env: Optional[dict[str, str]] = None) -> Optional[str]:
    """`slurm-<jobid>` (`slurm-<arrayjob>_<task>` in an array) inside a SLURM job, else None.

    A requeued job keeps its job id, so this names the same run folder before and after a requeue.
    """
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    return None


def logger_run_overrides(logger_class: str, run_id: str) -> list[str]:
    """The CLI overrides that give a recipe's logger the run name `run_id` (version or wandb id)."""
    name = logger_class.rsplit(".", 1)[-1]
    key = _LOGGER_VERSION_KEY.get(name)
    if key is None:
        raise CirlabError(f"cannot name the run of logger {logger_class} after the SLURM job",
                          "use CSVLogger, TensorBoardLogger or WandbLogger in the recipe's trainer.logger")
    return [f"--trainer.logger.init_args.{key}={run_id}"]


# --------------------------------------------------------------------------- preemption


class SlurmRequeue(pl.Callback):
    """On the requeue signal: checkpoint at the next step boundary on every rank, then requeue.

    Active only inside a SLURM job. The checkpoint goes to `trainer.default_root_dir/hpc_ckpt_N.ckpt`,
    where Lightning looks when the requeued job starts with no `ckpt_path`. Ranks agree on the step
    with one all-reduce per step (the signal reaches them at slightly different times).
    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True, exit_after_s: float = 300.0) -> None:
        self.signum = getattr(signal, signal_name)
        self.requeue = requeue
        self.exit_after_s = exit_after_s
        self._pending = False
        self._previous: Any = None
        self._rng_saving: Optional[list[dict[str, Any]]] = None  # every rank's states, while saving
        self._rng_restore: Optional[list[dict[str, Any]]] = None  # read from the resumed checkpoint

    # the global random states travel in this callback's checkpoint entry: a resumed run draws the
    # same dropout masks as the uninterrupted one (restored at its first step, after the loader
    # started: creating a DataLoader iterator draws a seed from the global torch generator)
    def state_dict(self) -> dict[str, Any]:
        return {"rng": self._rng_saving} if self._rng_saving is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_restore = state_dict.get("rng")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        states, self._rng_restore = self._rng_restore, None
        if states is None:
            return
        from cirlab.train.rng_state import restore_rng_states

        if len(states) != trainer.world_size:
            log.warning("resumed on %d ranks from a checkpoint of %d: random states not restored (the sample "
                        "order differs anyway)", trainer.world_size, len(states))
            return
        restore_rng_states(states[trainer.global_rank])

    def _handler(self, signum: int, frame: Any) -> None:
        self._pending = True  # acted on at the next step boundary, never inside the step

    @staticmethod
    def _restore_metrics(trainer: pl.Trainer) -> None:
        """Put the preempted job's metrics rows back in front of the requeued job's.

        Lightning's CSV writer deletes an existing metrics.csv when it starts, so the sbatch script
        moves it to metrics.csv.requeued before the requeued job starts (see slurm/*.sbatch)."""
        import csv

        from lightning.pytorch.loggers import CSVLogger

        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if not isinstance(logger, CSVLogger):
                continue
            path = Path(logger.log_dir) / "metrics.csv"
            aside = path.with_name("metrics.csv.requeued")
            if not aside.is_file():
                continue
            writer = logger.experiment
            writer.save()  # rows of the new run so far go to their own file first
            new_rows = list(csv.DictReader(open(path, newline=""))) if path.is_file() else []
            old = list(csv.DictReader(open(aside, newline="")))
            keys = sorted(set().union(*(r.keys() for r in old + new_rows)) | set(writer.metrics_keys))
            with open(path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=keys)
                out.writeheader()
                out.writerows(old + new_rows)
            writer.metrics_keys = keys
            aside.unlink()
            log.warning("requeued run: metrics appended to %s", path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_metrics(trainer)
        # after Lightning registered its handlers (which save inside the signal handler): replace them
        if slurm_run_id() is not None:
            self._previous = signal.signal(self.signum, self._handler)
            log.info("SLURM job %s: %s checkpoints at the next step and requeues", os.environ.get("SLURM_JOB_ID"),
                     signal.Signals(self.signum).name)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def _agreed(self, trainer: pl.Trainer) -> bool:
        flag = self._pending
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([int(flag)], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._previous is None or not self._agreed(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            # act one step later: a resume at an epoch start would see the epoch's end (validation,
            # new loader iterators) draw from the random generators the uninterrupted run drew from
            self._pending = True
            return
        self._pending = False
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        from cirlab.train.rng_state import collect_rng_states

        states = [collect_rng_states()]
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, collect_rng_states())
        self._rng_saving = states
        try:
            trainer.save_checkpoint(path)  # a collective: every rank's stream position is gathered
        finally:
            self._rng_saving = None
        ok = True
        if trainer.is_global_zero:
            log.warning("preemption signal: saved %s at step %d", path, trainer.global_step)
            if self.requeue:
                ok = requeue_job()
        trainer.strategy.barrier()
        if not self.requeue or not ok:
            return  # keep training (Lightning logs this step as usual); the checkpoint is there for a restart
        # this step's metrics are logged by Lightning after this hook, which this job never returns to:
        # log them now, then flush, so the requeued job appends after them
        trainer._logger_connector.update_train_step_metrics()
        for logger in trainer.loggers:
            logger.save()
        log.warning("requeued: waiting for SLURM to stop this job")
        # SLURM stops the old job with SIGTERM, then SIGKILL after KillWait: leave at the SIGTERM
        # (Lightning's own SIGTERM handler only takes note, which would keep us until the SIGKILL)
        signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
        deadline = _time.monotonic() + self.exit_after_s
        while _time.monotonic() < deadline:  # SLURM sends SIGTERM/SIGKILL to the job steps
            _time.sleep(1.0)
        os._exit(0)


def requeue_job(env: Optional[dict[str, str]] = None) -> bool:
    """`scontrol requeue` this job (array task); True when SLURM accepted it."""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        log.error("cannot requeue: SLURM_JOB_ID is %r", job)
        return False
    r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        log.error("scontrol requeue %s failed: %s", job, r.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job)
    return True


# --------------------------------------------------------------------------- templates


def template_dir() -> Path:
    """slurm/ beside the packages (editable installs), or the installed `cirlab.slurm` data."""
    here = Path(__file__).resolve().parent.parent / "slurm"
    if (here / TEMPLATES["single"]).is_file():
        return here
    try:
        import importlib.resources as resources

        return Path(str(resources.files("cirlab.slurm")))
    except (ModuleNotFoundError, TypeError) as exn:
        raise CirlabError("the sbatch templates (slurm/) are not installed", "reinstall cirlab") from exn


def render(template: str, values: dict[str, Any]) -> str:
    """Replace every `{{name}}` in a template; a name without a value is an error (never left blank)."""
    missing = sorted(set(re.findall(r"{{(\w+)}}", template)) - set(values))
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    return re.sub(r"{{(\w+)}}", lambda m: str(values[m.group(1)]), template)


def _resolve_recipe(recipe: str) -> Path:
    path = Path(recipe)
    if path.is_file():
        return path.resolve()
    for base in (Path(__file__).resolve().parent.parent / "recipes",):
        for cand in (base / recipe, base / f"{recipe}.yaml"):
            if cand.is_file():
                return cand.resolve()
    raise CirlabError(f"recipe {recipe} does not exist", "give a YAML path or a shipped name such as quickstart/clip")


def _override_value(overrides: list[str], key: str) -> Optional[str]:
    """The value an override list gives `key` (`--key=value` or `--key value`), last one wins."""
    value = None
    for i, arg in enumerate(overrides):
        if arg.startswith(f"--{key}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(overrides):
            value = overrides[i + 1]
    return value


@dataclass
class RunLayout:
    """Where a job's runs go: the logger class and its save_dir/name (after the overrides)."""

    logger_class: str
    save_dir: str
    name: str

    def run_dir(self, run_id: str) -> str:
        return str(Path(self.save_dir) / self.name / run_id)


def run_layout(recipe: Path, overrides: list[str]) -> RunLayout:
    """The recipe's logger section (CLI default: CSVLogger in runs/lightning_logs), overrides applied."""
    cfg = yaml.safe_load(recipe.read_text()) or {}
    logger = (cfg.get("trainer") or {}).get("logger")
    if isinstance(logger, list):
        if len(logger) != 1:
            raise CirlabError(f"{recipe} has {len(logger)} loggers: a SLURM job names one logger's run",
                              "keep one logger in trainer.logger")
        logger = logger[0]
    if logger is False or logger is None:
        logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
    args = dict(logger.get("init_args") or {})
    cls = _override_value(overrides, "trainer.logger.class_path") or str(logger.get("class_path"))
    save_dir = _override_value(overrides, "trainer.logger.init_args.save_dir") or args.get("save_dir") or "runs"
    default_name = "lightning_logs" if not cls.endswith("WandbLogger") else "wandb"
    name = _override_value(overrides, "trainer.logger.init_args.name") or args.get("name") or default_name
    return RunLayout(cls, str(Path(save_dir).resolve()), str(name))


def sweep_overrides(sweep: str | os.PathLike) -> list[list[str]]:
    """A YAML list of override sets -> one argument list per array task.

    Each entry is a mapping of dotted recipe keys to values (`model.init_args.optimizer.lr: 1e-4`)
    or a list of `--key=value` strings.
    """
    path = Path(sweep)
    if not path.is_file():
        raise CirlabError(f"sweep file {path} does not exist", "give a YAML list of override sets")
    entries = yaml.safe_load(path.read_text())
    if not isinstance(entries, list) or not entries:
        raise CirlabError(f"sweep file {path} is not a non-empty YAML list",
                          "write one entry per run, e.g. `- {model.init_args.optimizer.lr: 1.0e-4}`")
    out = []
    for i, entry in enumerate(entries):
        if isinstance(entry, dict):
            args = []
            for key, value in entry.items():
                text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
                text = text.removesuffix("\n...").strip()
                args.append(f"--{str(key).removeprefix('--')}={text}")
            out.append(args)
        elif isinstance(entry, list) and all(isinstance(a, str) for a in entry):
            out.append(list(entry))
        else:
            raise CirlabError(f"entry {i} of {path} is neither a mapping of recipe keys nor a list of overrides",
                              "e.g. `- {model.init_args.optimizer.lr: 1.0e-4}` or `- [--trainer.max_epochs=2]`")
    return out


@dataclass
class Submission:
    """A rendered (and, unless dry_run, submitted) job."""

    script: Path
    text: str
    job_id: Optional[str] = None
    run_dirs: list[str] = field(default_factory=list)  # with $RUN_ID where SLURM fills in the job id


def submit(recipe: str, nodes: int = 1, gpus_per_node: int = 1, time: str = "24:00:00",
           array: Optional[str] = None, dry_run: bool = False, overrides: Optional[list[str]] = None,
           partition: Optional[str] = None, account: Optional[str] = None, cpus_per_task: int = 8,
           mem: Optional[str] = None, job_name: Optional[str] = None, accelerator: str = "gpu",
           max_parallel: Optional[int] = None, signal_seconds: int = 90, out_dir: str = "slurm_jobs",
           sbatch_args: Optional[list[str]] = None, python: Optional[str] = None,
           env: Optional[dict[str, str]] = None) -> Submission:
    """Render the sbatch script for `recipe` on `nodes` x `gpus_per_node` and submit it.

    accelerator "gpu" asks SLURM for GPUs (`--gpus-per-node`); "cpu" runs `gpus_per_node` CPU
    processes per node (CPU clusters, tests). `array` is a YAML list of override sets: one array
    task (and one run folder) per entry. `overrides` are extra `cirlab fit` arguments for every task.
    `env` adds `export NAME=value` lines to the script. dry_run writes and returns the script only.
    """
    if nodes < 1 or gpus_per_node < 1:
        raise CirlabError(f"nodes={nodes} and gpus_per_node={gpus_per_node} must be >= 1")
    if accelerator not in ("gpu", "cpu"):
        raise CirlabError(f"accelerator {accelerator!r} is not gpu or cpu")
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", time):
        raise CirlabError(f"time {time!r} is not a SLURM time limit", "write e.g. 24:00:00 or 1-12:00:00")
    overrides = list(overrides or [])
    path = _resolve_recipe(recipe)
    layout = run_layout(path, overrides)
    sweep = sweep_overrides(array) if array else None
    name = job_name or f"cirlab-{path.stem}"
    jobs = Path(out_dir).resolve()
    jobs.mkdir(parents=True, exist_ok=True)
    kind = "array" if sweep else ("single" if nodes == 1 else "multi")
    stamp = _time.strftime("%Y%m%d-%H%M%S")
    script = jobs / f"{name}-{stamp}.sbatch"
    directives = [f"#SBATCH --partition={partition}"] if partition else []
    directives += [f"#SBATCH --account={account}"] if account else []
    directives += [f"#SBATCH --mem={mem}"] if mem else []
    directives += [f"#SBATCH --gpus-per-node={gpus_per_node}"] if accelerator == "gpu" else []
    directives += [f"#SBATCH {a}" for a in sbatch_args or []]
    if sweep:
        args_file = script.with_suffix(".args")
        args_file.write_text("".join(shlex.join(a) + "\n" for a in sweep))
        directives.append(f"#SBATCH --array=0-{len(sweep) - 1}" + (f"%{max_parallel}" if max_parallel else ""))
    fit = [python or sys.executable, "-m", "cirlab.train.cli", "fit", "-c", str(path),
           f"--trainer.accelerator={accelerator}", f"--trainer.num_nodes={nodes}",
           f"--trainer.devices={gpus_per_node}"]
    if nodes * gpus_per_node > 1 and _override_value(overrides, "trainer.strategy") is None \
            and "strategy" not in ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}):
        fit.append("--trainer.strategy=ddp")
    fit += ["--trainer.callbacks+=cirlab.train.slurm.SlurmRequeue"]
    run_args = [*logger_run_overrides(layout.logger_class, "$RUN_ID"), f"--trainer.default_root_dir={layout.run_dir('$RUN_ID')}"]
    exports = "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in (env or {}).items())
    values = {
        "job_name": name, "nodes": nodes, "tasks_per_node": gpus_per_node, "cpus_per_task": cpus_per_task,
        "time": time, "signal_seconds": signal_seconds, "log_dir": str(jobs), "workdir": str(Path.cwd()),
        "directives": "\n".join(directives), "exports": exports,
        "fit": " ".join(shlex.quote(a) for a in fit + overrides),
        # $RUN_ID is set by the script; keep these unquoted for the shell to expand
        "run_args": " ".join(f'"{a}"' for a in run_args),
        "args_file": str(script.with_suffix(".args")),
        "run_dir": layout.run_dir("$RUN_ID"),
    }
    text = render((template_dir() / TEMPLATES[kind]).read_text(), values)
    script.write_text(text)
    n_runs = len(sweep) if sweep else 1
    run_dirs = [layout.run_dir("slurm-$SLURM_JOB_ID" if not sweep else f"slurm-$ARRAY_JOB_ID_{i}")
                for i in range(n_runs)]
    sub = Submission(script, text, None, run_dirs)
    if dry_run:
        return sub
    if shutil.which("sbatch") is None:
        raise CirlabError("sbatch is not on PATH: this machine is not a SLURM login node",
                          f"use --dry-run and submit {script} where SLURM runs")
    r = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise CirlabError(f"sbatch refused {script}: {r.stderr.strip()}", "check the partition, account and time")
    sub.job_id = r.stdout.strip().split(";")[0]
    log.warning("submitted job %s (%s)", sub.job_id, script)
    return sub


def slurm_cli(argv: list[str]) -> int:
    """`cirlab slurm submit -c RECIPE --nodes 2 --gpus-per-node 8 --time 24:00:00 [--array sweep.yaml]
    [--dry-run] [-- extra cirlab fit overrides]`."""
    from jsonargparse import ArgumentParser

    if not argv or argv[0] != "submit":
        print("usage: cirlab slurm submit -c RECIPE [--nodes N] [--gpus_per_node G] [--time T] "
              "[--array sweep.yaml] [--dry_run] [-- overrides...]", file=sys.stderr)
        return 2
    argv = argv[1:]
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    def snake(a: str) -> str:  # --gpus-per-node and --gpus_per_node both work
        if not a.startswith("--"):
            return a
        key, eq, value = a[2:].partition("=")
        key = key.replace("-", "_")
        if key == "dry_run" and not eq:  # a flag
            eq, value = "=", "true"
        return "--" + key + eq + value

    argv = [snake(a) for a in argv]
    parser = ArgumentParser(prog="cirlab slurm submit", description=submit.__doc__)
    parser.add_argument("-c", "--recipe", required=True, help="recipe YAML path or shipped name")
    parser.add_function_arguments(submit, skip={"recipe", "overrides", "env"})
    cfg = parser.parse_args(argv)
    kwargs = {k: v for k, v in vars(cfg).items() if k != "recipe" and not k.startswith("__")}
    sub = submit(cfg.recipe, overrides=extra, **kwargs)
    if sub.job_id is None:
        print(sub.text)
        print(f"# written to {sub.script} (not submitted)")
    else:
        print(f"submitted job {sub.job_id}: {sub.script}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sys.exit(slurm_cli(sys.argv[1:]))
