"""Pic2Word task: the loss by hand at scale 100, frozen towers, the prompts, the optimizer settings,
cached vs recomputed image features in a real fit, zero-shot evaluation, export in the released layout."""

from __future__ import annotations

import io
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cirlab.data.evalset import Protocol, write_eval_set
from cirlab.data.retrieval import RetrievalDataModule
from cirlab.data.shards import write_shards
from cirlab.errors import CirlabError
from cirlab.models import DOLLAR_TOKEN_ID, STAR_TOKEN_ID, Pic2WordMapper, import_reference_checkpoint
from cirlab.train.config import BackboneConfig
from cirlab.train.optim import build_optimizer, lr_lambda
from cirlab.train.pic2word_task import (PROMPTS, RELEASED_NAME, Pic2WordTask, format_prompt, placeholder_of,
                                        released_from_export, write_released_checkpoint)


def _task(**kw) -> Pic2WordTask:
    torch.manual_seed(0)
    kw.setdefault("backbone", BackboneConfig("cirlab-tiny", train_scale=[0.9, 1.0]))
    return Pic2WordTask(**kw)


def _ce_by_hand(logits: torch.Tensor) -> float:
    """Mean over rows of -log softmax at the diagonal, term by term."""
    total = 0.0
    for i in range(logits.shape[0]):
        denom = sum(math.exp(float(logits[i, j])) for j in range(logits.shape[1]))
        total += -(float(logits[i, i]) - math.log(denom))
    return total / logits.shape[0]


def _reference_text_features(task: Pic2WordTask, pseudo: torch.Tensor) -> torch.Tensor:
    """The reference's encode_text_img: "a photo of" with the token inserted before the end token."""
    m = task.backbone.model
    tokens = task.backbone.tokenize(["a photo of"]).expand(pseudo.shape[0], -1)
    eot = int(tokens[0].argmax())
    x = m.token_embedding(tokens)
    x = torch.cat([x[:, :eot], pseudo[:, None, :], x[:, eot:-1]], dim=1)
    x = x + m.positional_embedding
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    return x[:, eot + 1] @ m.text_projection


def test_loss_is_symmetric_infonce_at_clips_scale_by_hand():
    task = _task(mapper_dropout=0.0)
    task.backbone.model.logit_scale.data.fill_(math.log(100.0))  # OpenAI CLIP's value
    assert task.logit_scale().item() == pytest.approx(100.0, rel=1e-5)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(5, task.backbone.embed_dim, generator=g)
    with torch.no_grad():
        text = _reference_text_features(task, task.mapper(feats))
        # our "a photo of *" with `*` replaced is the same sequence as the reference's insertion
        torch.testing.assert_close(task.pseudo_text_features(feats), text, atol=1e-5, rtol=1e-5)
        i, t = F.normalize(feats, dim=1), F.normalize(text, dim=1)
        image_to_text = _ce_by_hand(100.0 * i @ t.T)
        text_to_image = _ce_by_hand(100.0 * t @ i.T)
        got = task.pic2word_loss(feats).item()
    assert abs(image_to_text - text_to_image) > 1e-3  # the two directions differ: the mean is a real check
    assert got == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-4)


def test_trimmed_tokens_give_the_full_sequences_features():
    task = _task()
    task.eval()
    texts = ["a photo of * , make it red", "a photo of * , add two small dogs next to the big tree"]
    full = task.backbone.tokenize(texts)
    cut = task.trim_tokens(full)
    assert full.shape[1] == 77 and cut.shape[1] == int(full[1].argmax()) + 1 < 20
    pseudo = torch.randn(2, task.backbone.token_dim)
    with torch.no_grad():
        a = task.backbone.encode_text_with_pseudo_tokens(full, pseudo, STAR_TOKEN_ID, first_only=True)
        b = task.backbone.encode_text_with_pseudo_tokens(cut, pseudo, STAR_TOKEN_ID, first_only=True)
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert task.trim_tokens(task.backbone.tokenize(["a photo of *"])).shape[1] == 6


def test_a_step_changes_the_mapper_only_and_dropout_is_on_in_training():
    task = _task()
    task.train()
    assert not task.backbone.training and task.mapper.training  # frozen towers in eval mode
    assert all(not p.requires_grad for p in task.backbone.parameters())
    before_towers = {k: v.clone() for k, v in task.backbone.state_dict().items()}
    before_mapper = {k: v.clone() for k, v in task.mapper.state_dict().items()}
    images = torch.randn(4, 3, 64, 64)
    loss = task.training_step({"image": images, "id": ["a", "b", "c", "d"]}, 0)
    loss.backward()
    assert all(p.grad is None for p in task.backbone.parameters())
    opt = build_optimizer(task.named_parameters(), task.optimizer_cfg)
    opt.step()
    assert all(torch.equal(before_towers[k], v) for k, v in task.backbone.state_dict().items())
    assert all(not torch.equal(before_mapper[k], v) for k, v in task.mapper.state_dict().items())
    feats = torch.randn(3, task.backbone.embed_dim)
    assert not torch.equal(task.mapper(feats), task.mapper(feats))  # dropout 0.1 while training
    task.eval()
    assert torch.equal(task.mapper(feats), task.mapper(feats))


def test_optimizer_and_schedule_are_the_references():
    task = _task()
    opt = build_optimizer(task.named_parameters(), task.optimizer_cfg)
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in task.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "mapper.fc_out.weight", "mapper.layers.0.0.weight", "mapper.layers.1.0.weight"]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "mapper.fc_out.bias", "mapper.layers.0.0.bias", "mapper.layers.1.0.bias"]
    assert decay["lr"] == 1e-4 and decay["betas"] == (0.9, 0.98) and decay["eps"] == 1e-6
    f = lr_lambda(task.scheduler_cfg, 110_000)
    assert f(0) == pytest.approx(1 / 10_000) and f(9_999) == pytest.approx(1.0)
    assert f(60_000) == pytest.approx(0.5) and f(110_000) == pytest.approx(0.0, abs=1e-12)
    assert task.backbone_cfg.train_scale == [0.9, 1.0] and task.backbone_cfg.image_transform == "clip"


def test_prompts_keep_the_placeholder_its_own_token():
    task = _task()
    tok = task.backbone.tokenize(["a photo of * , make it red"])[0].tolist()
    assert tok[:6] == [49406, 320, 1125, 539, STAR_TOKEN_ID, 267] and tok.count(STAR_TOKEN_ID) == 1
    assert STAR_TOKEN_ID not in task.backbone.tokenize(["a photo of *, make it red"])[0].tolist()  # "*," merges
    assert format_prompt(PROMPTS["fashioniq"], ["is red ", "has long sleeves"], "fashioniq") == \
        "a photo of * , has long sleeves and is red "  # second caption first, nothing stripped
    assert format_prompt(PROMPTS["plain"], ["make it red"], "plain") == "a photo of * , make it red"
    assert format_prompt(PROMPTS["domain"], ["origami"], "domain") == "a origami of *"
    assert format_prompt(PROMPTS["relative_clause"], ["has two dogs"], "relative_clause") == \
        "a photo of $ that has two dogs"
    for form, template in PROMPTS.items():
        ids = task.backbone.tokenize([format_prompt(template, ["x", "y"], form)])[0].tolist()
        assert ids.count(placeholder_of(template)) == 1, form
    assert placeholder_of(PROMPTS["relative_clause"]) == DOLLAR_TOKEN_ID
    with pytest.raises(CirlabError, match="placeholder"):
        _task(prompts={"plain": "a photo of *, {}"})
    with pytest.raises(CirlabError, match="unknown text forms"):
        _task(prompts={"cirr": "a photo of * , {}"})


def test_query_features_use_the_protocols_text_form():
    task = _task()
    task.eval()
    ref = torch.randn(2, task.backbone.embed_dim)
    with torch.no_grad():
        pseudo = task.mapper(ref)
        for form, texts in (("plain", [["make it red"], ["add a dog"]]),
                            ("fashioniq", [["is red", "is short"], ["a", "b"]]),
                            ("domain", [["cartoon"], ["toy"]])):
            got = task.query_features(ref, texts, Protocol(name="x", text_format=form))
            prompts = [format_prompt(PROMPTS[form], t, form) for t in texts]
            want = task.backbone.encode_text_with_pseudo_tokens(task.backbone.tokenize(prompts), pseudo,
                                                                STAR_TOKEN_ID, first_only=True)
            torch.testing.assert_close(got, want)
    with pytest.raises(CirlabError, match="no prompt for text form 'unknown'"):
        task.query_features(ref, [["a"], ["b"]], Protocol(name="x", text_format="unknown"))


# ---------------------------------------------------------------------------- fits on real shards
def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(80, 72, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2w")
    write_shards(({"id": f"img.{i}", "image": _png(i)} for i in range(12)), root / "images", "image", maxcount=5)
    gallery = [{"id": f"img.{i}", "image": _png(i)} for i in range(12)]
    queries = [{"id": f"q{i}", "ref": _png(i), "ref_id": f"img.{i}", "texts": ["make it red"],
                "target_id": f"img.{(i + 1) % 12}", "gt_ids": []} for i in range(6)]
    write_eval_set(root / "eval", Protocol(name="toy", exclude_reference=True, recall_ks=[1, 5, 10]),
                   queries, gallery)
    return root


class _CountImageForwards(L.Callback):
    def on_fit_start(self, trainer, pl_module):
        self.calls, self.images = 0, 0

        def hook(module, args, out):
            self.calls += 1
            self.images += args[0].shape[0]
        # registered before the task's own fit start hook (the cache fill) runs
        self.handle = pl_module.backbone.model.visual.register_forward_hook(hook)

    def on_fit_end(self, trainer, pl_module):
        self.handle.remove()


def _fit(task, root, epochs=2, **dm_kw):
    dm = RetrievalDataModule(train=str(root / "images"), kind="image", batch_size=4, steps_per_epoch=3,
                             num_workers=0, **dm_kw)
    counter = _CountImageForwards()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[counter],
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    return counter


def test_cached_image_features_encode_each_image_once_with_the_eval_crop(image_shards, tmp_path):
    task = _task(cache_image_features=True, cache_dir=str(tmp_path / "cache"))
    mapper_before = {k: v.clone() for k, v in task.mapper.state_dict().items()}
    counter = _fit(task, image_shards)
    assert counter.images == 12  # the 12 training images, once; 6 steps read the cache only
    cache = task._image_cache
    assert sorted(cache.ids) == sorted(f"img.{i}" for i in range(12))
    tf = task.image_transform(train=False)
    with torch.no_grad():
        imgs = torch.stack([tf(Image.open(io.BytesIO(_png(i)))) for i in (0, 7)])
        fresh = task.backbone.encode_image(imgs)
    torch.testing.assert_close(cache.get(["img.0", "img.7"]), fresh, atol=1e-5, rtol=1e-5)
    assert any(not torch.equal(mapper_before[k], v) for k, v in task.mapper.state_dict().items())
    # a second run sharing the folder encodes nothing
    again = _task(cache_image_features=True, cache_dir=str(tmp_path / "cache"))
    assert _fit(again, image_shards, epochs=1).images == 0


def test_recomputed_features_run_the_tower_every_step_on_random_crops(image_shards):
    task = _task()
    counter = _fit(task, image_shards)
    assert counter.calls == 6 and counter.images == 24  # 2 epochs x 3 steps x batch 4
    crop = task.image_transform(train=True)  # RandomResizedCrop, bicubic (BatchedRandomResizedCrop's docs)
    assert type(crop).__name__ == "BatchedRandomResizedCrop" and crop.scale == (0.9, 1.0)


def test_zero_shot_evaluation_through_the_shared_evaluation(image_shards):
    from cirlab.train.commands import evaluate

    results = evaluate(_task(), [str(image_shards / "eval")], accelerator="cpu")
    assert set(results["toy"]) == {"R@1", "R@5", "R@10", "score"}
    assert 0 <= results["toy"]["R@1"] <= results["toy"]["R@10"] <= 100


# ---------------------------------------------------------------------------- export / import
def _released_by_hand(seed: int = 0) -> dict:
    """A checkpoint laid out as the reference saves it after DDP training ('module.' prefixes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.0.weight": (512, 768), "layers.0.0.bias": (512,), "layers.1.0.weight": (512, 512),
              "layers.1.0.bias": (512,), "fc_out.weight": (768, 512), "fc_out.bias": (768,)}
    return {"epoch": 30, "name": "pic2word",
            "state_dict": {"module.logit_scale": torch.tensor(4.6052)},
            "state_dict_img2text": {f"module.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}}


def test_import_then_export_round_trips_the_released_layout_bit_for_bit(tmp_path):
    src = tmp_path / "pic2word_model.pt"
    released = _released_by_hand()
    torch.save(released, src)
    mapper = import_reference_checkpoint(src, "pic2word")
    assert isinstance(mapper, Pic2WordMapper)
    out = write_released_checkpoint(tmp_path / "again.pt", mapper.state_dict(), released["state_dict"], epoch=30)
    back = torch.load(out, map_location="cpu", weights_only=True)
    assert set(back) >= {"epoch", "state_dict", "state_dict_img2text"} and back["epoch"] == 30
    want = released["state_dict_img2text"]
    assert list(back["state_dict_img2text"]) == list(want)
    for k, v in want.items():
        got = back["state_dict_img2text"][k]
        assert got.dtype == v.dtype and got.shape == v.shape
        assert torch.equal(got.view(torch.uint8), v.view(torch.uint8)), k  # the same bytes
    assert torch.equal(back["state_dict"]["module.logit_scale"], released["state_dict"]["module.logit_scale"])


def test_fit_exports_mapper_and_a_file_the_authors_loader_reads(image_shards, tmp_path):
    from safetensors.torch import load_file

    task = _task()
    dm = RetrievalDataModule(train=str(image_shards / "images"), kind="image", batch_size=4, steps_per_epoch=2,
                             num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=str(tmp_path),
                        logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="p2w", version=0),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    export = tmp_path / "p2w" / "version_0" / "export"
    mapper_sd = load_file(str(export / "mapper.safetensors"))
    assert set(mapper_sd) == set(task.mapper.state_dict())
    ckpt = torch.load(export / RELEASED_NAME, map_location="cpu", weights_only=True)
    # what the reference's eval script does: strip 'module.' (single process), load both strictly
    strip = {k[len("module."):]: v for k, v in ckpt["state_dict_img2text"].items()}
    ref_mapper = Pic2WordMapper(64, 512, 64)
    ref_mapper.load_state_dict(strip, strict=True)
    clip = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    fresh = _task().backbone.model
    fresh.load_state_dict(clip, strict=True)
    for k, v in task.mapper.state_dict().items():
        assert torch.equal(mapper_sd[k], v) and torch.equal(strip[k], v)
    # import of our own export gives the same mapper outputs
    ours = import_reference_checkpoint(export / RELEASED_NAME, "pic2word")
    task.mapper.eval()
    x = torch.randn(3, 64)
    torch.testing.assert_close(ours(x), task.mapper(x))
    # the released layout rebuilt from the export folder alone (backbone random: its weights file)
    again = torch.load(released_from_export(export, tmp_path / "rebuilt.pt", model_name="cirlab-tiny"), weights_only=True)
    assert all(torch.equal(again["state_dict_img2text"][k], v) for k, v in ckpt["state_dict_img2text"].items())


def test_zero_shot_on_the_converted_benchmarks(fiq_root, cirr_root, circo_root, tmp_path):
    from cirlab.data.benchmarks.circo import convert_circo
    from cirlab.data.benchmarks.cirr import convert_cirr
    from cirlab.data.benchmarks.fashioniq import convert_fashioniq
    from cirlab.train.commands import evaluate
    from cirlab.train.config import EvalConfig

    out = tmp_path / "out"
    convert_fashioniq(fiq_root, out / "fiq", categories=("dress", "shirt"), splits=("val",))
    convert_cirr(cirr_root, out / "cirr", splits=("val",))
    convert_circo(circo_root[0], out / "circo", splits=("val",))
    sets = [out / "fiq/eval/val/dress", out / "fiq/eval/val/shirt", out / "cirr/eval/val", out / "circo/eval/val"]
    task = _task(evaluation=EvalConfig(submission_dir=str(tmp_path / "subs")))
    results = evaluate(task, [str(s) for s in sets], accelerator="cpu")
    assert {"fashioniq", "cirr", "circo"} <= set(results)
    assert {"R@10", "R@50"} <= set(results["fashioniq"]) and "mAP@5" in results["circo"]
