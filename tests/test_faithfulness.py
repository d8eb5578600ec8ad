"""Issue 11: the deviations from the reference code (navervision/lincir, ABaldrati/CLIP4Cir) that a
line-by-line comparison found, each fixed or made a documented option. Expected values are written
by hand from the reference's code, never recomputed the way cirlab computes them."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import yaml

from cirlab.data.datamodules import ShardDataModule, per_device_batch_size
from cirlab.data.evalset import Protocol
from cirlab.data.masking import MaskMissingCaptions, clean_caption
from cirlab.errors import CirlabError
from cirlab.models import DOLLAR_TOKEN_ID, STAR_TOKEN_ID
from cirlab.train.config import BackboneConfig
from cirlab.train.lincir_task import LinCIRTask, MaskingConfig

REPO = Path(__file__).resolve().parent.parent
LINCIR_RECIPES = [REPO / "recipes" / "lincir" / f"captions-ViT-{a}-14.yaml" for a in ("L", "H", "bigG")]
STAGE2_RECIPES = sorted((REPO / "recipes" / "combiner").glob("*stage2*.yaml"))


def _lincir(**kw) -> LinCIRTask:
    kw.setdefault("cache_text_features", False)
    return LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"), **kw)


def _recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ----------------------------------------------------------------------------- 1. z from the cleaned caption
RAW = "Actor <PERSON> pays $5 for a Coffee"
CLEANED = "actor person pays 5 for a coffee"  # the reference's clean_caption, by hand
LONG = "Red, " * 50 + "blue"  # 101 BPE tokens: "red" "," alternating
# the first 75 tokens ("red , ... red", 38 reds) decoded, with the HF decoder's " ," -> "," clean-up
LONG_CLEANED = "red, " * 37 + "red"


def test_clean_caption_is_the_references():
    assert clean_caption(RAW) == CLEANED
    assert clean_caption(LONG) == LONG_CLEANED
    assert clean_caption(None) == ""
    assert clean_caption("  $$ A Cat  ") == "a cat"


def test_worker_hook_gives_every_sample_its_cleaned_caption():
    samples = MaskMissingCaptions("lexicon", "synthetic")([{"text": RAW, "masked": "actor $ pays 5 for $"},
                                                           {"text": LONG}])
    assert [s["cleaned"] for s in samples] == [CLEANED, LONG_CLEANED]
    assert samples[0]["masked"] == "actor $ pays 5 for $"  # a stored mask is kept


def test_lincir_z_is_the_feature_of_the_cleaned_caption(tmp_path):
    # the loss is MSE(z_hat, z) with z the frozen tower's feature of the CLEANED caption (the text
    # the mask was made from), not of the raw caption lower-cased
    t = _lincir(noise=False, cache_text_features=True, cache_dir=str(tmp_path))
    t.eval()  # phi without dropout: the loss is deterministic
    masked = ["actor $ pays 5 for $", "$ , red"]
    with torch.no_grad():
        loss = t.training_step({"text": [RAW, LONG], "masked": masked}, 0)
        z = t.backbone.encode_text(t.backbone.tokenize([CLEANED, LONG_CLEANED]))
        z_hat = t.backbone.encode_text_with_pseudo_tokens(t.backbone.tokenize(masked), t.phi(z), DOLLAR_TOKEN_ID)
        z_raw = t.backbone.encode_text(t.backbone.tokenize([RAW.lower()]))
    assert torch.allclose(loss, F.mse_loss(z_hat, z), atol=1e-6)
    assert not torch.allclose(z[:1], z_raw, atol=1e-3)  # the raw caption really is another text
    assert sorted(t._text_cache.ids) == sorted([CLEANED, LONG_CLEANED])  # cached under the cleaned text
    assert torch.allclose(t._text_cache.get([CLEANED, LONG_CLEANED]), z, atol=1e-6)


# ----------------------------------------------------------------------------- 3. `$` inside a query text
PLAIN = Protocol("custom", text_format="plain")


def test_a_dollar_in_the_text_stays_the_dollar_sign_by_default(caplog):
    t = _lincir(image_tower=True)
    t.eval()
    ref = torch.randn(1, 64)
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="cirlab.train.lincir_task"):
        q = t.query_features(ref, [["costs less than $5"]], PLAIN)
        t.query_features(ref, [["costs less than $5"]], PLAIN)
        # independently: the pseudo token at a `*` placeholder, the text's `$` left as it is
        star = t.backbone.tokenize(["a photo of * that costs less than $5"])
        expected = t.backbone.encode_text_with_pseudo_tokens(star, t.phi(ref), STAR_TOKEN_ID)
    assert torch.allclose(q, expected, atol=1e-5)
    warned = [r for r in caplog.records if "holds a '$' token" in r.getMessage()]
    assert len(warned) == 1 and "literal" in warned[0].getMessage()  # said once, with the rule applied


def test_dollar_in_text_pseudo_is_the_references_every_dollar_rule():
    t = _lincir(image_tower=True, dollar_in_text="pseudo")
    t.eval()
    ref = torch.randn(1, 64)
    with torch.no_grad():
        q = t.query_features(ref, [["costs less than $5"]], PLAIN)
        # the reference's encode_with_pseudo_tokens_HF replaces every `$` token: here both `*`
        star = t.backbone.tokenize(["a photo of * that costs less than *5"])
        assert (star == STAR_TOKEN_ID).sum() == 2
        expected = t.backbone.encode_text_with_pseudo_tokens(star, t.phi(ref), STAR_TOKEN_ID)
        literal = _lincir(image_tower=True)
        literal.load_state_dict(t.state_dict())
        literal.eval()
        other = literal.query_features(ref, [["costs less than $5"]], PLAIN)
    assert torch.allclose(q, expected, atol=1e-5)
    assert not torch.allclose(q, other, atol=1e-3)


@pytest.mark.parametrize("kw, match", [
    ({"prompt": "{} looks like $"}, "before the"),
    ({"prompt": "a $ photo of $ that {}"}, "exactly one"),
    ({"dollar_in_text": "every"}, "dollar_in_text"),
])
def test_prompt_and_dollar_rule_errors(kw, match):
    with pytest.raises(CirlabError, match=match):
        _lincir(**kw)


# ----------------------------------------------------------------------------- 5. model selection on CIRR val
def test_lincir_recipes_select_phi_on_cirr_val_every_1000_steps():
    for path in LINCIR_RECIPES:
        r = _recipe(path)
        tr = r["trainer"]
        assert tr["val_check_interval"] == 1000 and tr["check_val_every_n_epoch"] is None, path.name
        assert tr.get("limit_val_batches", 1.0) != 0, path.name
        (ckpt,) = [c["init_args"] for c in tr["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert (ckpt["monitor"], ckpt["mode"], ckpt["save_top_k"]) == ("val/cirr/R@1", "max", 1), path.name
        assert r["data"]["init_args"]["val_sets"] == ["datasets/cirr/eval/val"], path.name
        assert r["model"]["init_args"]["image_tower"] is True, path.name
        text = path.read_text()
        for corpus in ("dangne/gcc_caption_only", "FredZhang7/stable-diffusion-prompts-2.47M",
                       "Geonmo/midjourney-prompts-only", "cirlab data convert --kind text"):
            assert corpus in text, (path.name, corpus)


def test_recipe_checkpoint_selects_the_best_cirr_val_r1(cirr_root, small_world, tmp_path):
    # a real CIRR val set (the official layout in miniature, converted) and the recipes' own
    # ModelCheckpoint settings: the monitored key exists and the best checkpoint holds the best R@1
    from lightning.pytorch.callbacks import ModelCheckpoint

    from cirlab.data.benchmarks.cirr import convert_cirr
    from cirlab.data.retrieval import RetrievalDataModule

    convert_cirr(cirr_root, tmp_path / "cirr")
    ckpt_args = [c["init_args"] for c in _recipe(LINCIR_RECIPES[0])["trainer"]["callbacks"]
                 if c["class_path"].endswith("ModelCheckpoint")][0]
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), **ckpt_args)
    seen = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append(float(trainer.callback_metrics["val/cirr/R@1"]))

    torch.manual_seed(0)
    t = LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"),
                   image_tower=True, cache_dir=str(tmp_path / "cache"))
    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=16, steps_per_epoch=6,
                             num_workers=0, val_sets=[str(tmp_path / "cirr" / "eval" / "val")])
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record(), ckpt], val_check_interval=2,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(t, datamodule=dm)
    assert len(seen) == 3  # steps 2, 4, 6
    assert Path(ckpt.best_model_path).name == "best.ckpt"
    assert float(ckpt.best_model_score) == pytest.approx(max(seen))


# ----------------------------------------------------------------------------- 6. CLIP4Cir stage-2 precision
def test_stage2_recipes_run_the_references_mixed_precision():
    for path in STAGE2_RECIPES:
        assert _recipe(path)["trainer"]["precision"] == "16-mixed", path.name


def test_stage2_cache_is_filled_under_the_runs_autocast_and_evaluation_is_fp32(small_world, tmp_path):
    # 16-mixed on CPU: Lightning runs bf16 autocast instead (and warns); on a GPU the same path is fp16
    from cirlab.data.retrieval import RetrievalDataModule
    from cirlab.train.combiner_task import CombinerTask

    torch.manual_seed(0)
    task = CombinerTask(stage=2, backbone=BackboneConfig("cirlab-tiny"), cache_dir=str(tmp_path / "cache"))
    dm = RetrievalDataModule(train=str(small_world.path("triplets/train")), kind="triplet", batch_size=32,
                             steps_per_epoch=2, num_workers=0)
    with pytest.warns(UserWarning, match="bf16-mixed"):  # Lightning says so when the Trainer is made
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="16-mixed", logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(task, datamodule=dm)
    assert task._image_cache.dir.name.endswith("-bfloat16") and task._text_cache.dir.name.endswith("text-bfloat16")
    ids, texts = task._image_cache.ids[:3], task._text_cache.ids[:3]
    tf = task.image_transform(train=False)
    images = {s["ref_id"]: s["ref"] for s in dm.triplet_samples(transform=tf)}
    images.update({s["tgt_id"]: s["tgt"] for s in dm.triplet_samples(transform=tf)})
    pixels = torch.stack([images[i] for i in ids])
    task.eval()
    with torch.no_grad():
        full = task.backbone.encode_image(pixels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = task.backbone.encode_image(pixels).float()
            low_text = task.encode_texts(texts).float()
        # evaluation ignores an active autocast: the reference validates in fp32
        ref, q_texts = torch.randn(2, 64), [["is red"], ["is blue"]]
        fp32 = task.query_features(ref, q_texts, PLAIN)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = task.query_features(ref, q_texts, PLAIN)
            gal = task.gallery_features(pixels)
    cached = task._image_cache.get(ids)
    assert torch.allclose(cached, low, atol=1e-6) and not torch.allclose(cached, full, atol=1e-4)
    assert torch.allclose(task._text_cache.get(texts), low_text, atol=1e-6)
    assert under.dtype == torch.float32 and torch.allclose(under, fp32, atol=1e-6)
    assert gal.dtype == torch.float32 and torch.allclose(gal, full, atol=1e-6)


# ----------------------------------------------------------------------------- 7. global batch size
def test_per_device_batch_from_the_global_one():
    assert per_device_batch_size(512, 8) == 64  # LinCIR: 64 x 8 GPUs
    assert per_device_batch_size(512, 1) == 512
    assert per_device_batch_size(4096, 4, accumulate=2) == 512
    with pytest.raises(CirlabError) as e:
        per_device_batch_size(512, 3)
    assert "512" in str(e.value) and "3" in str(e.value)


def test_batch_size_and_global_batch_size_exclude_each_other(small_world):
    with pytest.raises(CirlabError, match="both batch_size .16.* and global_batch_size .64."):
        ShardDataModule(train=str(small_world.path("texts")), kind="text", batch_size=16, global_batch_size=64)
    with pytest.raises(CirlabError, match="global_batch_size"):
        ShardDataModule(train=str(small_world.path("texts")), kind="text", global_batch_size=0)
    assert ShardDataModule(train=str(small_world.path("texts")), kind="text").batch_size == 32


class _Batches(L.Callback):
    def __init__(self):
        self.sizes = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sizes.append(len(batch["text"]))


@pytest.mark.parametrize("accumulate, expected", [(1, 24), (2, 12)])
def test_the_trainer_gets_the_derived_per_device_batch(small_world, tmp_path, accumulate, expected):
    rec = _Batches()
    dm = ShardDataModule(train=str(small_world.path("texts")), kind="text", global_batch_size=24,
                         steps_per_epoch=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
                        accumulate_grad_batches=accumulate, limit_val_batches=0, default_root_dir=str(tmp_path))
    trainer.fit(_lincir(), datamodule=dm)
    assert rec.sizes and set(rec.sizes) == {expected} and dm.batch_size == expected


def test_a_global_batch_that_does_not_divide_is_one_clear_error(small_world, tmp_path):
    dm = ShardDataModule(train=str(small_world.path("texts")), kind="text", global_batch_size=25,
                         steps_per_epoch=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
                        limit_val_batches=0, default_root_dir=str(tmp_path))
    with pytest.raises(CirlabError, match="global_batch_size 25 does not divide over 1 device.* x 2"):
        trainer.fit(_lincir(), datamodule=dm)


def test_published_recipes_state_the_papers_global_batch():
    expected = {"lincir/captions-ViT-L-14.yaml": 512, "lincir/captions-ViT-H-14.yaml": 512,
                "lincir/captions-ViT-bigG-14.yaml": 512,
                "combiner/fashioniq-stage1-RN50x4.yaml": 128, "combiner/cirr-stage1-RN50x4.yaml": 128,
                "combiner/fashioniq-stage2-RN50x4.yaml": 4096, "combiner/cirr-stage2-RN50x4.yaml": 4096}
    for name, batch in expected.items():
        data = _recipe(REPO / "recipes" / name)["data"]["init_args"]
        assert data.get("global_batch_size") == batch and "batch_size" not in data, name
