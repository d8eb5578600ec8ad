"""A task class the project has never heard of: fitted, evaluated and retrieved through the CLI.

The class lives in a module written by this test (not in cirlab), named only by its recipe's
class_path; nothing in the project lists it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runs import save_tiny_backbone

USER_TASK = '''
"""A user's own composed-retrieval method: the reference feature plus a learned scale of the text's."""
from dataclasses import dataclass
from typing import Optional

import torch

from cirlab.data.evalset import Protocol
from cirlab.losses import info_nce
from cirlab.train.composed import ComposedRetrievalTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig


@dataclass
class MixConfig:
    init: float = 0.5


class WeightedSum(ComposedRetrievalTask):
    def __init__(self, mix: Optional[MixConfig] = None, backbone: Optional[BackboneConfig] = None,
                 optimizer: Optional[OptimizerConfig] = None, scheduler: Optional[SchedulerConfig] = None,
                 evaluation: Optional[EvalConfig] = None) -> None:
        self.mix = mix or MixConfig()
        super().__init__(backbone, optimizer, scheduler, evaluation)

    def configure_models(self) -> None:
        super().configure_models()
        self.backbone.set_trainable(image=False, text=False)
        self.alpha = torch.nn.Parameter(torch.tensor(self.mix.init))

    def export_modules(self):
        return {}

    def query_features(self, ref, texts, protocol):
        tok = self.backbone.tokenize(self.query_texts(texts, protocol)).to(self.device)
        return self.normalize(ref) + self.alpha * self.normalize(self.backbone.encode_text(tok))

    def training_step(self, batch, batch_idx):
        ref = self.backbone.encode_image(batch["ref"])
        tgt = self.backbone.encode_image(batch["tgt"])
        q = self.query_features(ref, [[t[0]] for t in batch["texts"]], Protocol("train"))
        loss = info_nce(self.normalize(q), self.normalize(tgt), 10.0)
        self.log("train/loss", loss, batch_size=ref.shape[0])
        return loss
'''


def _cirlab(*args: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cirlab.train.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd, env=env)


@pytest.mark.slow
def test_a_task_defined_outside_cirlab_fits_evaluates_and_retrieves(small_world, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "my_tasks.py").write_text(USER_TASK)
    backbone = tmp_path / "clip.safetensors"
    save_tiny_backbone(backbone)
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, max_epochs: 1, enable_progress_bar: false,
           logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path / 'runs'}, name: mine}}}}}}
model:
  class_path: my_tasks.WeightedSum
  init_args:
    mix: {{init: 0.25}}
    backbone: {{model_name: cirlab-tiny, pretrained: {backbone}, image_transform: targetpad}}
    optimizer: {{name: adamw, lr: 1.0e-2}}
data:
  class_path: cirlab.data.retrieval.RetrievalDataModule
  init_args:
    train: {small_world.path('triplets/train')}
    kind: triplet
    val_sets: [{small_world.path('eval/val')}]
    batch_size: 8
    steps_per_epoch: 3
    num_workers: 0
""")
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = _cirlab("fit", "-c", str(recipe), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "runs" / "mine" / "version_0"
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    # evaluate: the checkpoint names my_tasks.WeightedSum; cirlab imports it (from PYTHONPATH)
    out = tmp_path / "metrics.json"
    r = _cirlab("evaluate", "--ckpt", str(ckpt), "--sets", str(small_world.path("eval/test")), "--out", str(out),
                "--accelerator", "cpu", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads(out.read_text())["synthetic"]
    assert 0.0 <= metrics["R@10"] <= 100.0 and "mAP@5" in metrics
    # the trained scalar came back from the checkpoint (it moved away from its initial 0.25)
    import torch

    assert float(torch.load(ckpt, weights_only=False)["state_dict"]["alpha"]) != pytest.approx(0.25)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (64, 64), (60 * i, 255 - 60 * i, 100)).save(gallery / f"g{i}.png")
    r = _cirlab("retrieve", "--ckpt", str(ckpt), "--gallery", str(gallery), "--image", str(gallery / "g0.png"),
                "--text", "make it red", "--top-k", "3", "--html", str(tmp_path / "r.html"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "r.html").is_file()
    assert sum(1 for line in r.stdout.splitlines() if "g" in line and ".png" in line) >= 3
    # a second fit gets its own run folder: nothing of the first is overwritten
    r = _cirlab("fit", "-c", str(recipe), "--trainer.max_epochs=1", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "runs" / "mine" / "version_1" / "metrics.csv").is_file()
    assert (run / "metrics.csv").is_file() and ckpt.is_file()
