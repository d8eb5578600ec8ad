"""The Pic2Word quickstart recipe through `cirlab fit` on the synthetic world's image shards, and
its recipe keys documented in docs/recipes.md."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cli_runs import REPO, save_tiny_backbone
from test_recipe_docs import keys, section

from cirlab.train.pic2word_task import RELEASED_NAME, Pic2WordTask


def test_every_pic2word_key_is_documented():
    text = section("pic2word_task.Pic2WordTask")
    missing = sorted(k for k in keys(Pic2WordTask) if f"`{k}`" not in text)
    assert not missing, f"docs/recipes.md, Pic2Word section, does not document {missing}"


@pytest.mark.slow
def test_quickstart_recipe_fits_on_the_world_images_and_exports(small_world, tmp_path):
    from safetensors.torch import load_file

    backbone = tmp_path / "clip.safetensors"
    save_tiny_backbone(backbone)
    w = small_world.root
    r = subprocess.run(
        [sys.executable, "-m", "cirlab.train.cli", "fit", "-c", "recipes/quickstart/pic2word.yaml",
         "--trainer.accelerator=cpu", "--trainer.max_epochs=1", f"--trainer.logger.init_args.save_dir={tmp_path}",
         f"--trainer.default_root_dir={tmp_path}",
         f"--model.init_args.backbone.pretrained={backbone}", f"--model.init_args.cache_dir={tmp_path / 'cache'}",
         f"--data.init_args.train={w / 'images'}", f"--data.init_args.val_sets=[{w / 'eval' / 'val'}]",
         "--data.init_args.steps_per_epoch=3", "--data.init_args.batch_size=32"],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    exports = sorted(tmp_path.glob("pic2word/version_*/export"))
    assert len(exports) == 1, sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))[:40]
    export = exports[0]
    mapper = load_file(str(export / "mapper.safetensors"))
    released = torch.load(export / RELEASED_NAME, map_location="cpu", weights_only=True)
    assert all(torch.equal(released["state_dict_img2text"][f"module.{k}"], v) for k, v in mapper.items())
    # the image features were cached once: one folder, every training image in it
    folders = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(folders) == 1 and "-image-" in folders[0].name
    results = sorted(tmp_path.glob("pic2word/version_*/val_results.json"))
    assert results, "validation on the world's val split wrote no results"
