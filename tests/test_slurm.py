"""SLURM batch jobs: the rendered sbatch scripts, and on a real single-machine SLURM (two slurmd
nodes on this host) a requeue mid-epoch that resumes exactly, 2 nodes x 1 process = 1 node x 2
processes, and a job array of 3 runs. The real-SLURM tests skip, saying why, where SLURM cannot
start (not root, or slurm-wlm/munge missing)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cirlab.errors import CirlabError
from cirlab.train.slurm import logger_run_overrides, slurm_run_id, submit, sweep_overrides

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
RECIPE = str(REPO / "recipes" / "quickstart" / "clip.yaml")


# ----------------------------------------------------------------------------- rendering (no SLURM)


def test_run_id_follows_the_job_and_survives_a_requeue():
    assert slurm_run_id({}) is None
    assert slurm_run_id({"SLURM_JOB_ID": "17", "SLURM_RESTART_COUNT": "1"}) == "slurm-17"
    assert slurm_run_id({"SLURM_JOB_ID": "18", "SLURM_ARRAY_JOB_ID": "17", "SLURM_ARRAY_TASK_ID": "1"}) == "slurm-17_1"
    assert logger_run_overrides("lightning.pytorch.loggers.CSVLogger", "slurm-3") == \
        ["--trainer.logger.init_args.version=slurm-3"]
    assert logger_run_overrides("lightning.pytorch.loggers.WandbLogger", "slurm-3") == \
        ["--trainer.logger.init_args.id=slurm-3"]
    with pytest.raises(CirlabError, match="MLFlowLogger"):
        logger_run_overrides("lightning.pytorch.loggers.MLFlowLogger", "slurm-3")


def test_dry_run_renders_multi_node_gpu_script(tmp_path):
    sub = submit(RECIPE, nodes=2, gpus_per_node=8, time="24:00:00", dry_run=True, out_dir=str(tmp_path),
                 overrides=["--trainer.max_epochs=3"], partition="gpu")
    text = sub.text
    assert sub.job_id is None and sub.script.read_text() == text
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --time=24:00:00", "#SBATCH --signal=USR1@90", "#SBATCH --requeue",
                 "#SBATCH --partition=gpu", "#SBATCH --open-mode=append"):
        assert line in text.splitlines(), line
    srun = [ln for ln in text.splitlines() if ln.startswith("srun ")][0]
    for arg in ("--trainer.num_nodes=2", "--trainer.devices=8", "--trainer.strategy=ddp", "--trainer.max_epochs=3",
                "--trainer.callbacks+=cirlab.train.slurm.SlurmRequeue", '"--trainer.logger.init_args.version=$RUN_ID"'):
        assert arg in srun.split(), arg
    assert 'RUN_ID="slurm-${SLURM_JOB_ID}"' in text
    # every #SBATCH line comes before the first command (sbatch stops reading them there)
    lines = text.splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    one = submit(RECIPE, nodes=1, gpus_per_node=1, dry_run=True, out_dir=str(tmp_path / "one"))
    assert "--trainer.strategy=ddp" not in one.text and "#SBATCH --nodes=1" in one.text
    with pytest.raises(CirlabError, match="time"):
        submit(RECIPE, time="tomorrow", dry_run=True, out_dir=str(tmp_path))
    with pytest.raises(CirlabError, match="nosuch"):
        submit("nosuch/recipe", dry_run=True, out_dir=str(tmp_path))


def test_sweep_file_becomes_one_argument_line_per_task(tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("- {model.init_args.optimizer.lr: 1.0e-4, trainer.max_epochs: 2}\n"
                     "- [--model.init_args.optimizer.lr=3.0e-4]\n"
                     "- {model.init_args.backbone.train_scale: [0.5, 1.0], data.init_args.train: my data}\n")
    assert sweep_overrides(sweep) == [
        ["--model.init_args.optimizer.lr=0.0001", "--trainer.max_epochs=2"],
        ["--model.init_args.optimizer.lr=3.0e-4"],
        ["--model.init_args.backbone.train_scale=[0.5, 1.0]", "--data.init_args.train=my data"]]
    sub = submit(RECIPE, array=str(sweep), dry_run=True, out_dir=str(tmp_path), max_parallel=2, accelerator="cpu")
    assert "#SBATCH --array=0-2%2" in sub.text and "--gpus-per-node" not in sub.text
    assert 'RUN_ID="slurm-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"' in sub.text
    # the argument lines split back into the same words in bash
    args_file = sub.script.with_suffix(".args")
    out = subprocess.run(["bash", "-c", f'mapfile -t S < "{args_file}"; eval "set -- ${{S[2]}}"; printf "%s\\n" "$@"'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["--model.init_args.backbone.train_scale=[0.5, 1.0]", "--data.init_args.train=my data"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1\n")
    with pytest.raises(CirlabError, match="not a non-empty YAML list"):
        sweep_overrides(bad)


def test_cli_dry_run_prints_the_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cirlab.train.slurm", "submit", "-c", RECIPE, "--nodes", "2",
                        "--gpus-per-node", "4", "--time", "01:00:00", "--dry-run", "--out_dir", str(tmp_path),
                        "--", "--trainer.max_epochs=1"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "--trainer.max_epochs=1" in r.stdout and "not submitted" in r.stdout


# ----------------------------------------------------------------------------- a real SLURM


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from slurm_cluster import LocalSlurm, why_not_available

    reason = why_not_available()
    if reason:
        print(f"SLURM tests skipped: {reason}")
        pytest.skip(reason)
    c = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = c.env["SLURM_CONF"]  # sbatch inside submit() finds this cluster
    yield c
    c.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from cirlab.data.synthetic import build_world

    root = tmp_path_factory.mktemp("slurmworld") / "world"
    build_world(root, seed=0, n_train_scenes=24, n_eval_queries=10, renders_per_scene=1, shard_size=4,
                n_triplets=4, n_texts=4, instructions_per_scene=1)
    return root


def _common(world: Path, runs: Path, batch_size: int = 8) -> list[str]:
    return [f"--data.init_args.train={world}/pairs", f"--data.init_args.val={world}/pairs_val",
            "--data.init_args.resampled=false", f"--data.init_args.batch_size={batch_size}",
            "--data.init_args.steps_per_epoch=null", "--data.init_args.num_workers=1",
            "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
            f"--trainer.logger.init_args.save_dir={runs}", "--trainer.callbacks+=slurm_cluster.RecordBatches"]


def _env(record: Path, sleep: float = 0.0) -> dict[str, str]:
    return {"PYTHONPATH": str(TESTS), "CIRLAB_TEST_RECORD": str(record), "CIRLAB_TEST_STEP_SLEEP": str(sleep),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "export" / "backbone.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"weights differ by {worst}"


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def _log(c, sub_out: Path, tail: int = 3000) -> str:
    return "\n".join(p.read_text()[-tail:] for p in sorted(sub_out.glob("*.out")))


@pytest.mark.slow
def test_requeue_mid_epoch_resumes_exactly(cluster, tiny_world, tmp_path):
    from slurm_cluster import read_record

    runs = tmp_path / "runs"
    common = _common(tiny_world, runs) + ["--trainer.max_epochs=2"]
    # the uninterrupted reference, run beside the job
    ref_record = tmp_path / "ref.jsonl"
    ref = subprocess.Popen([sys.executable, "-m", "cirlab.train.cli", "fit", "-c", RECIPE, "--trainer.accelerator=cpu",
                            "--trainer.devices=1", *common, "--trainer.logger.init_args.version=reference"],
                           cwd=REPO, env=dict(os.environ, **_env(ref_record)), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    record = tmp_path / "job.jsonl"
    jobs = tmp_path / "jobs"
    sub = submit(RECIPE, nodes=1, gpus_per_node=1, time="00:15:00", accelerator="cpu", cpus_per_task=1,
                 overrides=common, env=_env(record, sleep=1.5), out_dir=str(jobs), job_name="requeue")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # signal once epoch 0 is under way (step 1 of 3 begun)
        if record.exists() and len(read_record(record)) >= 2:
            break
        state = cluster.job(sub.job_id).get("JobState")
        assert state in ("PENDING", "RUNNING"), _log(cluster, jobs)
        time.sleep(0.3)
    else:
        pytest.fail(f"the job never reached step 1: {_log(cluster, jobs)}")
    cluster.run("scancel", "--signal=USR1", sub.job_id)
    (rec,) = cluster.wait(sub.job_id, timeout=300)
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", (rec, _log(cluster, jobs))
    run_dir = runs / "clip" / f"slurm-{sub.job_id}"
    assert (run_dir / "hpc_ckpt_1.ckpt").is_file(), sorted(p.name for p in run_dir.iterdir())
    # the preemption checkpoint carries the job's global random states (restored by the requeued job)
    rng = torch.load(run_dir / "hpc_ckpt_1.ckpt", weights_only=True)["callbacks"]["SlurmRequeue"]["rng"]
    assert len(rng) == 1 and rng[0]["torch"].dtype == torch.uint8 and len(rng[0]["python"]["internal"]) == 625
    out = _log(cluster, jobs, tail=10**6)
    assert "Restoring states from the checkpoint path" in out and f"{run_dir}/hpc_ckpt_1.ckpt" in out
    assert "restart 0" in out and "restart 1" in out  # one log file, appended by the requeued job

    steps = read_record(record)
    reference = read_record(ref_record)
    from cirlab.data.shards import read_index

    n = read_index(tiny_world / "pairs").total  # the world's pairs: 24 scenes, more if it adds pairs
    assert n % 8 == 0
    assert [s["step"] for s in steps] == list(range(2 * n // 8)), steps  # no step replayed or skipped
    assert {s["restart"] for s in steps} == {"0", "1"}
    assert [s["ids"] for s in steps] == [s["ids"] for s in reference]
    for epoch in (0, 1):  # every sample of the epoch exactly once (steps of 8)
        ids = [i for s in steps if s["epoch"] == epoch for i in s["ids"]]
        assert len(ids) == n and len(set(ids)) == n
    _assert_same_weights(_weights(run_dir), _weights(runs / "clip" / "reference"))
    # metrics appended in the same folder: one loss per step, equal to the reference's
    assert _losses(run_dir) == pytest.approx(_losses(runs / "clip" / "reference"), abs=1e-5)


@pytest.mark.slow
def test_two_nodes_match_one_node_with_two_processes(cluster, tiny_world, tmp_path):
    runs = tmp_path / "runs"
    common = _common(tiny_world, runs, batch_size=4) + ["--trainer.max_steps=2", "--trainer.max_epochs=1"]
    subs = {}
    for nodes, per_node in ((2, 1), (1, 2)):
        subs[nodes] = submit(RECIPE, nodes=nodes, gpus_per_node=per_node, time="00:15:00", accelerator="cpu",
                             cpus_per_task=1, overrides=common + ["--trainer.strategy=ddp"],
                             # the test's nodes are named n1, n2 (not host names): rendezvous on this host
                             env=dict(_env(tmp_path / f"rec{nodes}.jsonl"), MASTER_ADDR="127.0.0.1"),
                             out_dir=str(tmp_path / f"jobs{nodes}"),
                             job_name=f"n{nodes}")
    for nodes, sub in subs.items():
        (rec,) = cluster.wait(sub.job_id, timeout=240)
        assert rec["JobState"] == "COMPLETED", _log(cluster, tmp_path / f"jobs{nodes}")
    assert cluster.job(subs[2].job_id)["NodeList"] == "n[1-2]"
    a, b = (runs / "clip" / f"slurm-{subs[n].job_id}" for n in (2, 1))
    assert len(_losses(a)) == 2 and _losses(a) == pytest.approx(_losses(b), abs=1e-6)
    _assert_same_weights(_weights(a), _weights(b))


@pytest.mark.slow
def test_job_array_runs_each_override_set_in_its_own_folder(cluster, tiny_world, tmp_path):
    import yaml

    runs = tmp_path / "runs"
    sweep = tmp_path / "sweep.yaml"
    lrs = [1.0e-3, 2.0e-3, 5.0e-4]
    sweep.write_text(yaml.safe_dump([{"model.init_args.optimizer.lr": lr} for lr in lrs]))
    common = _common(tiny_world, runs) + ["--trainer.max_steps=1", "--trainer.max_epochs=1"]
    sub = submit(RECIPE, array=str(sweep), time="00:15:00", accelerator="cpu", cpus_per_task=1, overrides=common,
                 env=_env(tmp_path / "rec.jsonl"), out_dir=str(tmp_path / "jobs"), job_name="sweep")
    recs = cluster.wait(sub.job_id, timeout=240)
    assert len(recs) == 3 and all(r["JobState"] == "COMPLETED" for r in recs), _log(cluster, tmp_path / "jobs")
    folders = sorted((runs / "clip").iterdir())
    assert [f.name for f in folders] == [f"slurm-{sub.job_id}_{i}" for i in range(3)]
    for folder, lr in zip(folders, lrs):
        cfg = yaml.safe_load((folder / "config.yaml").read_text())
        assert cfg["model"]["init_args"]["optimizer"]["lr"] == pytest.approx(lr)
        assert (folder / "export" / "backbone.safetensors").is_file()


# ----------------------------------------------------------------------------- sharded checkpoints


def test_consolidate_a_distributed_checkpoint_folder(tmp_path):
    """A torch.distributed.checkpoint folder (FSDP's sharded layout) gives back the model's tensors."""
    import torch.distributed.checkpoint as dcp

    from cirlab.train.sharded import consolidate_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    state = {"model": model.state_dict(), "optimizer": {"lr": torch.tensor(0.1)}}
    dcp.save(state, checkpoint_id=str(tmp_path / "sharded"), no_dist=True)
    torch.save({"epoch": 1}, tmp_path / "sharded" / "meta.pt")
    got = consolidate_checkpoint(tmp_path / "sharded")
    assert got.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.ckpt")
    assert all(torch.equal(consolidate_checkpoint(tmp_path / "plain.ckpt")[k], v) for k, v in model.state_dict().items())
    (tmp_path / "other").mkdir()
    with pytest.raises(CirlabError, match="neither an FSDP"):
        consolidate_checkpoint(tmp_path / "other")
