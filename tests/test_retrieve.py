"""Trained checkpoints back in use: `cirlab evaluate` and `cirlab retrieve` for every task kind.

LinCIR trains without an image tower; its checkpoints must still evaluate and retrieve (the tower is
rebuilt from `backbone.pretrained`), and a frozen random backbone must not be dropped from a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest

from cirlab.errors import CirlabError
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from cli_runs import save_tiny_backbone

from cirlab.data.evalset import Protocol
from cirlab.data.retrieval import RetrievalDataModule
from cirlab.data.streaming import ShardStream
from cirlab.models import Backbone
from cirlab.train.combiner_task import CombinerTask
from cirlab.train.commands import evaluate, load_task
from cirlab.train.config import BackboneConfig, OptimizerConfig
from cirlab.train.lincir_task import LinCIRTask, MaskingConfig
from cirlab.train.retrieve import list_images, retrieve_cli


@pytest.fixture(scope="module")
def gallery_dir(small_world, tmp_path_factory):
    """The test gallery's first 24 images as PNG files, the way a user's folder looks."""
    out = tmp_path_factory.mktemp("gallery")
    stream = ShardStream(small_world.path("eval/test") / "gallery", "image", resampled=False, shuffle=False,
                         shuffle_buffer=0, batch_size=None, rank=0, world_size=1, equal_steps=False)
    for i, s in enumerate(stream):
        if i == 24:
            break
        s["image"].save(out / f"{i:02d}.png")
    return out


@pytest.fixture(scope="module")
def tiny_clip_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "backbone.safetensors"
    save_tiny_backbone(path)
    return path


def _fit_with_checkpoint(task, datamodule, tmp_path) -> str:
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", filename="last")
    L.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[ck], enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(task, datamodule=datamodule)
    return ck.best_model_path


def _lincir_checkpoint(world, tmp_path, pretrained) -> tuple[LinCIRTask, str]:
    torch.manual_seed(0)
    task = LinCIRTask(backbone=BackboneConfig("cirlab-tiny", pretrained), masking=MaskingConfig("lexicon", "synthetic"),
                      cache_dir=str(tmp_path / "cache"), optimizer=OptimizerConfig("adamw", lr=1e-3))
    dm = RetrievalDataModule(train=str(world.path("texts")), kind="text", batch_size=16, steps_per_epoch=2,
                             num_workers=0)
    return task, _fit_with_checkpoint(task, dm, tmp_path)


def _manual_ranking(task, gallery, image, text):
    """The ranking computed directly from the task's features, to check the command against."""
    task.prepare_for_evaluation()
    task.eval()
    tf = task.image_transform(train=False)
    with torch.no_grad():
        g = task.gallery_features(torch.stack([tf(Image.open(p).convert("RGB")) for p in gallery]))
        ref = task.gallery_features(tf(Image.open(image).convert("RGB"))[None])
        q = task.query_features(ref, [[text]], Protocol("custom", text_format="plain"))
    scores = F.normalize(q, dim=-1) @ F.normalize(g, dim=-1).T
    return [gallery[i] for i in scores[0].argsort(descending=True).tolist()]


def _retrieve_lines(capsys, ckpt, gallery_dir, tmp_path, text, k=5):
    image = list_images(gallery_dir)[3]
    html, grid = tmp_path / "page.html", tmp_path / "strip.png"
    capsys.readouterr()  # drop what earlier steps printed
    assert retrieve_cli(["--ckpt", ckpt, "--gallery", str(gallery_dir), "--image", str(image), "--text", text,
                         "--top-k", str(k), "--html", str(html), "--grid", str(grid)]) == 0
    out = [line for line in capsys.readouterr().out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    ranked = [line.split()[2] for line in out[:k]]
    scores = [float(line.split()[1]) for line in out[:k]]
    assert scores == sorted(scores, reverse=True)
    assert html.read_text().count('class="result') == k
    assert Image.open(grid).size[0] > 128 * k  # the query and k results in one strip
    return image, ranked


def test_lincir_checkpoint_evaluates_and_retrieves_with_its_image_tower(small_world, gallery_dir, tiny_clip_file,
                                                                        tmp_path, capsys):
    trained, ckpt = _lincir_checkpoint(small_world, tmp_path, str(tiny_clip_file))
    raw = torch.load(ckpt, weights_only=True)
    assert not any(k.startswith("backbone.") for k in raw["state_dict"])  # phi only: the tower comes from file
    loaded = load_task(ckpt)
    assert type(loaded) is LinCIRTask and loaded.backbone.model.visual is None  # loaded when first needed
    loaded.prepare_for_evaluation()
    for k, v in trained.phi.state_dict().items():
        assert torch.equal(loaded.phi.state_dict()[k], v)
    reference = Backbone("cirlab-tiny", str(tiny_clip_file))
    for k, v in reference.model.visual.state_dict().items():
        assert torch.equal(loaded.backbone.model.visual.state_dict()[k], v)

    results = evaluate(loaded, [str(small_world.path("eval/test"))], accelerator="cpu")
    assert 0.0 <= results["synthetic"]["R@10"] <= 100.0

    image, ranked = _retrieve_lines(capsys, ckpt, gallery_dir, tmp_path, "make the circle red")
    expected = _manual_ranking(loaded, list_images(gallery_dir), image, "make the circle red")
    assert ranked == [str(p) for p in expected[:5]]


def test_combiner_checkpoint_retrieves(small_world, gallery_dir, tmp_path, capsys):
    torch.manual_seed(0)
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adamw", lr=1e-4))
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=8,
                             steps_per_epoch=1, num_workers=0)
    ckpt = _fit_with_checkpoint(task, dm, tmp_path)
    image, ranked = _retrieve_lines(capsys, ckpt, gallery_dir, tmp_path, "add a small blue square")
    expected = _manual_ranking(load_task(ckpt), list_images(gallery_dir), image, "add a small blue square")
    assert ranked == [str(p) for p in expected[:5]]


def test_a_frozen_random_backbone_stays_in_the_checkpoint(small_world, tmp_path):
    # nothing could rebuild it: dropping it would silently swap the text tower on reload
    trained, ckpt = _lincir_checkpoint(small_world, tmp_path, None)
    raw = torch.load(ckpt, weights_only=True)
    assert any(k.startswith("backbone.model.transformer.") for k in raw["state_dict"])
    loaded = load_task(ckpt)
    tokens = trained.backbone.tokenize(["a small red circle at the top left"])
    trained.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.backbone.encode_text(tokens), trained.backbone.encode_text(tokens), atol=1e-6)


def test_evaluating_a_task_built_without_its_image_tower(small_world, tiny_clip_file):
    dm = lambda: RetrievalDataModule(test_sets=[str(small_world.path("eval/test"))], num_workers=0)  # noqa: E731
    trainer = lambda: L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,  # noqa: E731
                                enable_model_summary=False)
    # from a pretrained backbone, evaluation loads the frozen image tower itself, equal to the file's
    task = LinCIRTask(backbone=BackboneConfig("cirlab-tiny", str(tiny_clip_file)),
                      masking=MaskingConfig("lexicon", "synthetic"))
    assert task.backbone.model.visual is None
    trainer().test(task, datamodule=dm(), verbose=False)
    assert task.last_results["synthetic"]["R@10"] >= 0
    full = LinCIRTask(image_tower=True, backbone=BackboneConfig("cirlab-tiny", str(tiny_clip_file)))
    images = torch.rand(2, 3, 64, 64)
    full.eval()
    with torch.no_grad():
        assert torch.allclose(task.backbone.encode_image(images), full.backbone.encode_image(images), atol=1e-6)
    # from random weights no tower can be rebuilt: one clear error
    task = LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"))
    with pytest.raises(CirlabError, match="no image tower can be rebuilt"):
        trainer().test(task, datamodule=dm(), verbose=False)


def test_cirlab_test_with_a_lincir_checkpoint_adds_the_image_tower(small_world, tiny_clip_file, tmp_path, capsys):
    # Lightning replaces the model section with the checkpoint's hyperparameters (image_tower: false)
    from cirlab.train.cli import main

    _, ckpt = _lincir_checkpoint(small_world, tmp_path, str(tiny_clip_file))
    expected = evaluate(load_task(ckpt), [str(small_world.path("eval/test"))], accelerator="cpu")["synthetic"]
    recipe = tmp_path / "lincir.yaml"
    recipe.write_text(f"""
trainer: {{accelerator: cpu, devices: 1, logger: false, enable_progress_bar: false, callbacks: []}}
model:
  class_path: cirlab.train.lincir_task.LinCIRTask
  init_args:
    backbone: {{model_name: cirlab-tiny, pretrained: {tiny_clip_file}}}
data:
  class_path: cirlab.data.retrieval.RetrievalDataModule
  init_args: {{test_sets: [{small_world.path("eval/test")}], num_workers: 0}}
""")
    assert main(["test", "-c", str(recipe), "--ckpt_path", ckpt]) == 0
    out = capsys.readouterr().out
    assert "test/synthetic/R@10" in out
    row = next(line for line in out.splitlines() if "test/synthetic/R@10" in line)
    assert float(row.split("│")[2]) == pytest.approx(expected["R@10"], abs=1e-4)


def test_a_frozen_backbone_is_exported_as_a_pointer_to_its_source(small_world, tiny_clip_file, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from cirlab.train.base import exported_backbone

    task = LinCIRTask(backbone=BackboneConfig("cirlab-tiny", str(tiny_clip_file)),
                      masking=MaskingConfig("lexicon", "synthetic"), cache_dir=str(tmp_path / "cache"))
    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=8, steps_per_epoch=1,
                             num_workers=0)
    L.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path, name="run", version=""),
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0).fit(task, datamodule=dm)
    export = tmp_path / "run" / "export"
    assert sorted(p.name for p in export.iterdir()) == ["backbone.json", "phi.safetensors"]
    assert exported_backbone(export) == str(tiny_clip_file.resolve())
    rebuilt = LinCIRTask(image_tower=True, backbone=BackboneConfig("cirlab-tiny", exported_backbone(export)))
    tokens = task.backbone.tokenize(["a small red circle"])
    with torch.no_grad():
        assert torch.equal(rebuilt.backbone.encode_text(tokens), task.backbone.encode_text(tokens))
    with pytest.raises(CirlabError, match="no backbone.safetensors or backbone.json"):
        exported_backbone(tmp_path)


# --------------------------------------------------------------------------- a new user's galleries and texts


@pytest.fixture(scope="module")
def combiner_ckpt(small_world, tmp_path_factory) -> str:
    torch.manual_seed(0)
    task = CombinerTask(stage=1, backbone=BackboneConfig("cirlab-tiny", image_transform="targetpad"),
                        optimizer=OptimizerConfig("adamw", lr=1e-4))
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=8,
                             steps_per_epoch=1, num_workers=0)
    return _fit_with_checkpoint(task, dm, tmp_path_factory.mktemp("combiner"))


@pytest.fixture()
def messy_gallery(gallery_dir, tmp_path) -> Path:
    """The 24 PNGs, a 0-byte file, a file of garbage, and a 16-bit RGB copy of 05.png."""
    import shutil

    import numpy as np
    from test_user_errors import png16

    g = tmp_path / "messy"
    shutil.copytree(gallery_dir, g)
    (g / "zero.png").write_bytes(b"")
    (g / "sub").mkdir()
    (g / "sub" / "bad.jpg").write_bytes(b"not an image at all")
    pixels = np.asarray(Image.open(g / "05.png").convert("RGB")).astype(np.uint16)
    (g / "deep16.png").write_bytes(png16(pixels * 257))  # its top byte is 05.png again
    return g


def _retrieve(capsys, ckpt, gallery, image, text, tmp_path, k=30):
    from test_user_errors import cirlab

    return cirlab(capsys, "retrieve", "--ckpt", ckpt, "--gallery", str(gallery), "--image", str(image),
                  "--text", text, "--top-k", str(k), "--html", str(tmp_path / "page.html"),
                  "--grid", str(tmp_path / "grid.png"))


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cirlab retrieve: warning: ")]


def test_retrieve_skips_counts_and_lists_unreadable_gallery_files(combiner_ckpt, messy_gallery, tmp_path, capsys):
    code, out, err = _retrieve(capsys, combiner_ckpt, messy_gallery, messy_gallery / "03.png", "make it red", tmp_path)
    assert code == 0, err
    (warning,) = _warnings(err)
    assert "skipped 2 unreadable gallery image(s) of 27" in warning
    assert f"{messy_gallery / 'sub' / 'bad.jpg'} (" in warning and f"{messy_gallery / 'zero.png'} (empty file (0 bytes))" in warning
    ranked = {line.split()[2]: float(line.split()[1]) for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()}
    assert len(ranked) == 25 and not any("zero" in p or "bad" in p for p in ranked)
    # the 16-bit copy decodes to 05.png's pixels, so it scores the same (clipping made it white)
    assert ranked[str(messy_gallery / "deep16.png")] == pytest.approx(ranked[str(messy_gallery / "05.png")], abs=1e-4)
    page = (tmp_path / "page.html").read_text()
    assert "skipped 2 unreadable gallery image(s)" in page and page.count('class="result') == 25
    assert Image.open(tmp_path / "grid.png").width > 25 * 112


def test_retrieve_warns_about_an_empty_text_and_a_cut_one(combiner_ckpt, gallery_dir, tmp_path, capsys):
    image = gallery_dir / "03.png"
    code, out, err = _retrieve(capsys, combiner_ckpt, gallery_dir, image, "  ", tmp_path, k=3)
    assert code == 0 and len(out.splitlines()) >= 3
    (warning,) = _warnings(err)
    assert "the query text is empty" in warning and "image-only query" in warning
    assert "(no text: image only)" in (tmp_path / "page.html").read_text()
    code, out, err = _retrieve(capsys, combiner_ckpt, gallery_dir, image, " ".join(["red"] * 10_000), tmp_path, k=3)
    assert code == 0
    (warning,) = _warnings(err)
    assert "(10000 words, 10002 tokens)" in warning and "77-token context and is cut" in warning
    assert "(10000 words in all)" in (tmp_path / "page.html").read_text()  # the page shows the start only
    code, out, err = _retrieve(capsys, combiner_ckpt, gallery_dir, image, "make it red", tmp_path, k=3)
    assert code == 0 and _warnings(err) == []


def test_loading_a_checkpoint_that_carries_its_backbone_does_not_say_initialized_randomly(combiner_ckpt, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        Backbone("cirlab-tiny")  # a real random init: open_clip says so
    assert "initialized randomly" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        task = load_task(combiner_ckpt)  # trained from random init; the weights are the checkpoint's
    assert "initialized randomly" not in caplog.text, caplog.text
    raw = torch.load(combiner_ckpt, weights_only=True)["state_dict"]
    for k, v in task.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, raw[k]), k


def test_a_folder_of_image_shards_is_a_gallery_named_by_sample_id(small_world, combiner_ckpt, tmp_path, capsys):
    """--gallery on shards (an evaluation set's gallery/) ranks as the same images saved as files do."""
    shards = small_world.path("eval/test") / "gallery"
    files = tmp_path / "as_files"
    files.mkdir()
    stream = ShardStream(shards, "image", resampled=False, shuffle=False, shuffle_buffer=0, batch_size=None,
                         rank=0, world_size=1, equal_steps=False)
    for s in stream:
        s["image"].save(files / f"{s['id']}.png")  # lossless: the same pixels as the shard's
    query = files / sorted(p.name for p in files.iterdir())[5]
    expected = _manual_ranking(load_task(combiner_ckpt), list_images(files), query, "make it red")
    code, out, err = _retrieve(capsys, combiner_ckpt, shards, query, "make it red", tmp_path, k=5)
    assert code == 0, err
    ranked = [line.split()[2] for line in out.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert ranked == [p.stem for p in expected[:5]]  # sample ids, in the order the files rank
    page = (tmp_path / "page.html").read_text()
    assert page.count('class="result') == 5 and all(i in page for i in ranked)


def test_retrieve_mistakes_are_one_error_line(small_world, combiner_ckpt, gallery_dir, tmp_path, capsys):
    from test_user_errors import assert_one_error

    image = gallery_dir / "03.png"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"")
    (broken / "b.jpg").write_bytes(b"garbage")
    zero = tmp_path / "zero.png"
    zero.write_bytes(b"")
    for gallery, query, fragments in [
        (small_world.path("triplets/train"), image, ["holds triplet shards, not images", "--kind image"]),
        (tmp_path / "nowhere", image, ["gallery folder", "nowhere", "does not exist", "--gallery"]),
        (empty, image, ["no images (.jpg", str(empty)]),
        (broken, image, ["none of the 2 gallery images is readable", "a.png (empty file (0 bytes))"]),
        (gallery_dir, tmp_path / "missing.png", ["query image", "missing.png", "does not exist", "--image"]),
        (gallery_dir, zero, ["query image", "zero.png", "is not readable", "empty file"]),
    ]:
        code, _, err = _retrieve(capsys, combiner_ckpt, gallery, query, "make it red", tmp_path)
        assert_one_error(code, "\n".join(line for line in err.splitlines() if not line.startswith("WARNING:")),
                         "retrieve", *fragments)
