"""A real SLURM on this machine for tests: munged, slurmctld and two slurmd (nodes n1, n2 on this
host, 2 CPUs each), with a generated slurm.conf in a temporary folder; plus a callback that
records the sample ids of every training step (jobs import it with PYTHONPATH=tests)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import lightning.pytorch as pl

_CONF = """ClusterName=cirlabtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/sock
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldPort={port}
SlurmdPort={port1}
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=5
SlurmdParameters=config_overrides
NodeName=n1 NodeHostname={host} Port={port1} CPUs=2 State=UNKNOWN
NodeName=n2 NodeHostname={host} Port={port2} CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def why_not_available() -> str | None:
    """Why a local SLURM cannot start here (None when it can)."""
    if os.geteuid() != 0:
        return "not root: slurmctld/slurmd/munged must run as root (CI installs and runs them as root)"
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm munge; .ci/run does it)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LocalSlurm:
    """Start with `start()`, stop with `stop()` (kills exactly the daemons it started)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def start(self, timeout: float = 60.0) -> "LocalSlurm":
        r = self.root
        for d in ("state", "spool-n1", "spool-n2", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        (r / "munge").chmod(0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        host = socket.gethostname()
        ports = [_free_port() for _ in range(3)]
        (r / "slurm.conf").write_text(_CONF.format(host=host, root=r, port=ports[0], port1=ports[1], port2=ports[2]))
        m = r / "munge"
        subprocess.run(["munged", f"--key-file={key}", f"--socket={m}/sock", f"--pid-file={m}/pid",
                        f"--log-file={m}/log", f"--seed-file={m}/seed", "--force"], check=True, env=self.env)
        conf = str(r / "slurm.conf")
        subprocess.run(["slurmctld", "-f", conf], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-f", conf, "-N", node], check=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=self.env).stdout
            if out.split()[:2] == ["idle", "2"]:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SLURM did not come up: sinfo says {out!r}; see {r}/slurmctld.log")

    def stop(self) -> None:
        """Cancel every job of this cluster (slurmstepd outlives slurmd), then stop the daemons."""
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], capture_output=True, env=self.env)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-t", "R,CG,PD"], capture_output=True, text=True, env=self.env)
            if out.returncode != 0 or not out.stdout.strip():
                break
            subprocess.run(["scancel", "--user=root"], capture_output=True, env=self.env)
            time.sleep(1.0)
        for pid_file in ("slurmd-n1.pid", "slurmd-n2.pid", "slurmctld.pid", "munge/pid"):
            p = self.root / pid_file
            if p.is_file():
                try:
                    os.kill(int(p.read_text().strip()), 15)
                except (ProcessLookupError, ValueError):
                    pass

    def run(self, *args: str) -> str:
        return subprocess.run(list(args), capture_output=True, text=True, check=True, env=self.env).stdout

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as key -> value (JobState, Restarts, ...)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                             env=self.env).stdout
        fields: dict[str, str] = {}
        for line in out.splitlines()[:1]:
            for tok in line.split():
                if "=" in tok:
                    k, v = tok.split("=", 1)
                    fields[k] = v
        return fields

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Every record of a job (one per array task)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True,
                             env=self.env).stdout
        recs = []
        for line in out.splitlines():
            recs.append(dict(tok.split("=", 1) for tok in line.split() if "=" in tok))
        return recs

    def wait(self, job_id: str, timeout: float, done=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                      "NODE_FAIL", "OUT_OF_MEMORY")) -> list[dict[str, str]]:
        """Wait until every task of a job reached a final state; returns their records."""
        deadline = time.monotonic() + timeout
        held_since: dict[str, float] = {}
        while time.monotonic() < deadline:
            recs = self.jobs(job_id)
            if recs and all(r.get("JobState") in done for r in recs):
                return recs
            for rec in recs:  # a requeued job waits ~2 min (BeginTime); an admin may release it sooner,
                # but not at once: released within ~1 s, slurmctld re-allocates the node while slurmd
                # still tears the old run down, and kills the relaunch ("Job credential revoked",
                # job FAILED). After KillWait (5 s) plus a margin the old run is gone.
                if rec.get("JobState") == "PENDING" and rec.get("Reason") == "BeginTime":
                    since = held_since.setdefault(rec["JobId"], time.monotonic())
                    if time.monotonic() - since >= 8.0:
                        subprocess.run(["scontrol", "update", f"JobId={rec['JobId']}", "StartTime=now"],
                                       capture_output=True, env=self.env)
            time.sleep(1.0)
        raise TimeoutError(f"job {job_id} not done after {timeout} s: {self.jobs(job_id)}")


class RecordBatches(pl.Callback):
    """Appends {"step", "epoch", "ids", "restart"} per training step to $CIRLAB_TEST_RECORD; sleeps
    $CIRLAB_TEST_STEP_SLEEP seconds per step before a requeue (time for a test to send a signal mid-epoch)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        path = os.environ.get("CIRLAB_TEST_RECORD")
        if path and trainer.is_global_zero:
            with open(path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                    "ids": list(batch["id"]), "restart": os.environ.get("SLURM_RESTART_COUNT", "0")})
                        + "\n")
        if os.environ.get("SLURM_RESTART_COUNT", "0") == "0":  # the requeued job has nothing to wait for
            time.sleep(float(os.environ.get("CIRLAB_TEST_STEP_SLEEP", "0")))


def read_record(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
