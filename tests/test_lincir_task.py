"""LinCIR task: no image tower in training, noise statistics, gradients only into phi, the prompt."""

from __future__ import annotations

import json
import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from cirlab.data.evalset import Protocol
from cirlab.data.retrieval import RetrievalDataModule
from cirlab.models import DOLLAR_TOKEN_ID
from cirlab.train.config import BackboneConfig, OptimizerConfig
from cirlab.train.lincir_task import LinCIRTask, MaskingConfig

CAPS = ["a large red circle at the top left", "a small blue square at the center and a large green diamond at the top right"]


def _task(**kw):
    return LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"),
                      cache_text_features=False, **kw)


def test_image_tower_is_not_loaded_for_training():
    t = _task()
    assert t.backbone.image_parameters() == []
    with pytest.raises(Exception):
        t.backbone.encode_image(torch.zeros(1, 3, 64, 64))


def test_noise_statistics():
    t = _task()
    torch.manual_seed(0)
    z = torch.randn(20000, 64)
    x = t.add_noise(z)
    # per sample: x - z = s * eps, eps ~ N(0, I): the per-sample std estimates s ~ U(0, 1)
    s = (x - z).std(dim=1)
    assert 0.48 < s.mean().item() < 0.52
    assert abs(s.var().item() - 1 / 12) < 0.01
    assert s.min().item() >= 0 and s.max().item() < 1.25
    # a quarter of the samples below 0.25, half below 0.5 (uniform, not fixed)
    assert abs((s < 0.25).float().mean().item() - 0.25) < 0.02
    assert abs((s < 0.5).float().mean().item() - 0.5) < 0.02
    assert torch.equal(_task(noise=False).add_noise(z), z)


def test_step_changes_only_phi_and_loss_is_mse_to_caption_features():
    t = _task(optimizer=OptimizerConfig("adamw", lr=1e-3, weight_decay=0.01))
    t.train()
    before = {k: v.clone() for k, v in t.backbone.state_dict().items()}
    masked = [s["masked"] for s in t.mask_missing()([{"text": c} for c in CAPS])]
    assert all("$" in m for m in masked)
    loss = t.smp_loss(CAPS, masked)
    loss.backward()
    grads = [p.grad for p in t.phi.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in t.backbone.parameters())
    opt = t.configure_optimizers()["optimizer"]
    opt.step()
    after = t.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the loss equals MSE(z_hat, z) computed independently (no noise, eval-mode phi)
    t2 = _task(noise=False)
    t2.eval()
    with torch.no_grad():
        z = t2.backbone.encode_text(t2.backbone.tokenize(CAPS))
        p = t2.phi(z)
        z_hat = t2.backbone.encode_text_with_pseudo_tokens(t2.backbone.tokenize(masked), p, DOLLAR_TOKEN_ID)
        assert torch.allclose(t2.smp_loss(CAPS, masked), F.mse_loss(z_hat, z), atol=1e-6)


def test_every_placeholder_gets_the_pseudo_token():
    t = _task(noise=False)
    t.eval()
    with torch.no_grad():
        tok = t.backbone.tokenize(["$ at the $"])
        assert (tok == DOLLAR_TOKEN_ID).sum() == 2
        p = torch.randn(1, t.backbone.token_dim)
        every = t.backbone.encode_text_with_pseudo_tokens(tok, p, DOLLAR_TOKEN_ID, first_only=False)
        first = t.backbone.encode_text_with_pseudo_tokens(tok, p, DOLLAR_TOKEN_ID, first_only=True)
    assert not torch.allclose(every, first)


def test_prompt_keeps_dollar_a_separate_token():
    t = _task()
    prompt = t.prompt.format("make the circle green.")
    tok = t.backbone.tokenize([prompt])[0]
    assert (tok == DOLLAR_TOKEN_ID).sum() == 1
    with pytest.raises(ValueError, match="placeholder"):
        _task(prompt="a photo of {}")


def test_reference_optimizer_defaults():
    o = _task().configure_optimizers()["optimizer"]
    g = o.param_groups[0]
    assert isinstance(o, torch.optim.AdamW) and g["lr"] == 1e-4 and g["weight_decay"] == 0.01


def test_training_on_text_shards_never_runs_an_image_tower(small_world, tmp_path):
    torch.manual_seed(0)
    t = LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"),
                   cache_dir=str(tmp_path), optimizer=OptimizerConfig("adamw", lr=1e-3))
    losses = []

    class Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=64,
                             steps_per_epoch=15, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Log()], limit_val_batches=0)
    trainer.fit(t, datamodule=dm)
    assert t.backbone.image_parameters() == []
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert len(t._text_cache) > 0  # caption features cached (frozen tower)
    assert t._text_cache.dir.name.endswith("-text")


def test_zero_shot_query_fashioniq_averages_both_orders():
    # FashionIQ-style caption pairs with the stray punctuation and spaces the annotations carry; the
    # reference strips each caption with strip('.?, ') and does not capitalise (unlike CLIP4Cir)
    t = _task(image_tower=True)
    t.eval()
    fiq = Protocol("fashioniq-dress", text_format="fashioniq")
    texts = [["is solid black with no sleeves", "is black with straps"],
             ["is darker blue.", " has short sleeves ,"],
             ["Is more revealing?", "is shorter and tighter. "]]
    prompts = t.query_prompts(texts, fiq)
    assert prompts == [
        ["a photo of $ that is solid black with no sleeves and is black with straps",
         "a photo of $ that is black with straps and is solid black with no sleeves"],
        ["a photo of $ that is darker blue and has short sleeves",
         "a photo of $ that has short sleeves and is darker blue"],
        ["a photo of $ that Is more revealing and is shorter and tighter",
         "a photo of $ that is shorter and tighter and Is more revealing"]]
    ref = torch.randn(3, 64)
    with torch.no_grad():
        q = t.query_features(ref, texts, fiq)
        p = t.phi(ref)

        def feats(strings):  # the hand-written prompt strings, encoded directly
            tok = t.backbone.tokenize(strings)
            return F.normalize(t.backbone.encode_text_with_pseudo_tokens(tok, p, DOLLAR_TOKEN_ID), dim=-1)

        a = feats([pair[0] for pair in prompts])
        b = feats([pair[1] for pair in prompts])
    assert torch.allclose(q, F.normalize(a + b, dim=-1), atol=1e-6)


def test_bf16_mixed_trains_phi_only_and_caches_float_features(small_world, tmp_path):
    # the published recipes run the frozen tower under bf16-mixed; CPU autocast runs the same path
    torch.manual_seed(0)
    t = LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"),
                   cache_dir=str(tmp_path), optimizer=OptimizerConfig("adamw", lr=1e-3))
    tower = {k: v.clone() for k, v in t.backbone.state_dict().items()}
    phi = {k: v.clone() for k, v in t.phi.state_dict().items()}
    losses, dtypes = [], []
    encode = t.backbone.encode_text_with_pseudo_tokens

    def recording_encode(*args, **kw):  # the real encoder; records the dtype it computed in
        out = encode(*args, **kw)
        dtypes.append(out.dtype)
        return out

    t.backbone.encode_text_with_pseudo_tokens = recording_encode

    class Log(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=32,
                             steps_per_epoch=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, precision="bf16-mixed", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Log()], limit_val_batches=0)
    trainer.fit(t, datamodule=dm)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert dtypes == [torch.bfloat16] * 4  # the tower ran under autocast
    assert all(v.dtype == torch.float32 for v in t.phi.state_dict().values())
    assert any(not torch.equal(phi[k], v) for k, v in t.phi.state_dict().items())
    assert all(torch.equal(tower[k], v) for k, v in t.backbone.state_dict().items())
    cached = t._text_cache.get(t._text_cache.ids[:4])
    assert cached.shape == (4, t.backbone.embed_dim) and cached.dtype == torch.float32
    assert t._text_cache.dir.name.endswith("-text-bfloat16")  # apart from full-precision features


def test_unmasked_shards_are_masked_in_the_loader_workers(small_world, tmp_path, monkeypatch):
    # the world's text shards carry no `masked` field: LinCIR has the data module's workers fill it,
    # so the training step receives masked captions and never tags in the training process
    from cirlab.data.masking import KeywordMasker, MaskMissingCaptions
    from cirlab.data.synthetic import LEXICON

    main_pid, call = os.getpid(), MaskMissingCaptions.__call__

    def in_a_worker_only(self, samples):  # forked workers inherit this patch
        assert os.getpid() != main_pid, "masking ran in the training process"
        return call(self, samples)

    monkeypatch.setattr(MaskMissingCaptions, "__call__", in_a_worker_only)
    t = LinCIRTask(backbone=BackboneConfig("cirlab-tiny"), masking=MaskingConfig("lexicon", "synthetic"),
                   cache_dir=str(tmp_path), optimizer=OptimizerConfig("adamw", lr=1e-3))
    seen = []

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((list(batch["text"]), list(batch["masked"])))

    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=16,
                             steps_per_epoch=4, num_workers=2)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Look()], limit_val_batches=0)
    trainer.fit(t, datamodule=dm)
    reference = KeywordMasker("lexicon", lexicon=LEXICON)
    assert len(seen) == 4
    for texts, masked in seen:
        assert masked == reference.mask_batch(texts)  # the world's captions need no random fallback


def test_lincir_installs_worker_masking_on_the_data_module(small_world):
    from cirlab.data.masking import MaskMissingCaptions

    t = _task()
    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=4, num_workers=0)
    t.configure_datamodule(dm)
    assert isinstance(dm.train_prepare, MaskMissingCaptions)
    batch = next(iter(dm.train_dataloader()))
    assert all(m and "$" in m for m in batch["masked"])



def test_ddp_ranks_each_save_their_caption_features(small_world, tmp_path):
    # 2 real processes (gloo) through the CLI: each rank writes the captions it encoded to its own
    # cache part, and the parts hold the frozen tower's true features of those captions
    from cli_runs import fit_on_two_ranks, open_cache, save_tiny_backbone

    tower = save_tiny_backbone(tmp_path / "clip.safetensors")
    fit_on_two_ranks("recipes/quickstart/lincir.yaml", tmp_path / "runs",
                     f"--model.init_args.backbone.pretrained={tmp_path / 'clip.safetensors'}",
                     f"--model.init_args.cache_dir={tmp_path / 'cache'}", f"--data.init_args.train={small_world.path('texts')}",
                     "--data.init_args.steps_per_epoch=3", "--data.init_args.batch_size=32",
                     "--data.init_args.num_workers=0")
    (folder,) = (tmp_path / "cache").iterdir()
    parts = sorted(folder.glob("*.json"))
    writers = {p.name.split("-")[1] for p in parts}
    assert len(writers) == 2  # one per rank
    per_rank = [set(json.loads(p.read_text())) for p in parts]
    cache = open_cache(folder)
    assert len(cache) == len(per_rank[0] | per_rank[1]) > max(len(x) for x in per_rank)  # ranks saw different captions
    some = cache.ids[:3] + cache.ids[-3:]
    with torch.no_grad():
        fresh = tower.encode_text(tower.tokenize(some))
    assert torch.allclose(cache.get(some), fresh, atol=1e-5)
    assert (tmp_path / "runs" / "lincir" / "version_0" / "export" / "phi.safetensors").is_file()


def test_gradient_checkpointing_gives_the_same_phi_gradients(monkeypatch):
    # the recipes' memory saver for large towers (ViT-bigG at batch 512): same loss, same gradients
    import open_clip.transformer as oct

    calls = []
    real = oct.checkpoint
    monkeypatch.setattr(oct, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = []
    for gc in (False, True):
        torch.manual_seed(0)
        t = LinCIRTask(backbone=BackboneConfig("cirlab-tiny", grad_checkpointing=gc), noise=False,
                       masking=MaskingConfig("lexicon", "synthetic"), cache_text_features=False)
        t.train()
        masked = [s["masked"] for s in t.mask_missing()([{"text": c} for c in CAPS])]
        loss = t.smp_loss(CAPS, masked)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in t.phi.parameters()]))
        assert bool(calls) == gc  # the text tower really ran checkpointed blocks
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][1], results[1][1]))


def test_a_checkpoint_from_a_run_export_carries_the_image_tower_its_evaluation_needs(small_world, tmp_path):
    """LinCIR trains without the image tower. From a run's export (the quickstart's CLIP), the checkpoint
    embeds the frozen backbone, since a rerun may replace that file; it must embed the image tower too,
    or `cirlab evaluate --ckpt` cannot rank images ("trained without its image tower and from random
    weights", the quickstart's LinCIR checkpoint until 2026-12-07)."""
    from safetensors.torch import save_file

    from cirlab.models.backbone import Backbone
    from cirlab.train.checkpointing import load_task

    torch.manual_seed(0)
    export = tmp_path / "runs" / "clip" / "version_0" / "export"
    export.mkdir(parents=True)
    clip = Backbone("cirlab-tiny").eval()
    save_file({k: v.contiguous() for k, v in clip.merged_state_dict().items()}, str(export / "backbone.safetensors"))
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = clip.encode_image(images)  # the export's image tower, before the file goes away
    task = LinCIRTask(backbone=BackboneConfig("cirlab-tiny", str(export / "backbone.safetensors")),
                      masking=MaskingConfig("lexicon", "synthetic"), cache_dir=str(tmp_path / "cache"))
    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=16,
                             steps_per_epoch=2, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    assert task.backbone.image_parameters() == []  # trained without it
    ckpt = tmp_path / "lincir.ckpt"
    trainer.save_checkpoint(ckpt)
    (export / "backbone.safetensors").unlink()  # a rerun replaces it; the checkpoint must not need it

    loaded = load_task(ckpt)
    assert loaded.backbone_cfg.pretrained is None  # embedded, not pointed at
    loaded.prepare_for_evaluation()
    with torch.no_grad():
        assert torch.allclose(loaded.backbone.encode_image(images), expected, atol=1e-6)
    assert all(not p.requires_grad for p in loaded.backbone.model.visual.parameters())
    trained = task.phi.state_dict()
    assert trained and all(torch.equal(v, trained[k]) for k, v in loaded.phi.state_dict().items())


def test_a_flag_typed_with_ckpt_path_wins_over_the_checkpoints_setting(small_world, tmp_path, caplog):
    """`cirlab test -c RECIPE --ckpt_path C --model.init_args.X=...`: Lightning parses the checkpoint's
    settings over the command line's, so the typed flag was silently dropped (SEARLE-OTI evaluated as
    SEARLE). The typed flag wins, with a warning naming the change; the rest stays the checkpoint's."""
    from safetensors.torch import save_file

    from cirlab.models.backbone import Backbone
    from cirlab.train.cli import run_lightning

    torch.manual_seed(0)
    clip = tmp_path / "clip.safetensors"  # the image tower the test ranks with comes from here
    save_file({k: v.contiguous() for k, v in Backbone("cirlab-tiny").merged_state_dict().items()}, str(clip))
    task = LinCIRTask(backbone=BackboneConfig("cirlab-tiny", str(clip)), masking=MaskingConfig("lexicon", "synthetic"),
                      cache_dir=str(tmp_path / "cache"), phi_dropout=0.25, dollar_in_text="literal")
    dm = RetrievalDataModule(train=str(small_world.path("texts")), kind="text", batch_size=16,
                             steps_per_epoch=1, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(task, datamodule=dm)
    ckpt = tmp_path / "lincir.ckpt"
    trainer.save_checkpoint(ckpt)
    args = ["test", "-c", "quickstart/lincir", "--ckpt_path", str(ckpt), f"--data.init_args.train={small_world.path('texts')}",
            f"--data.init_args.test_sets=[{small_world.root / 'eval' / 'test'}]",
            f"--model.init_args.cache_dir={tmp_path / 'cache'}", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}"]
    with caplog.at_level("WARNING", logger="cirlab"):
        cli = run_lightning(args + ["--model.init_args.prompt=a picture of $ that {}"])
    assert cli.model.prompt == "a picture of $ that {}"  # typed
    assert cli.model.phi_dropout == 0.25  # the checkpoint's (the default is 0.5)
    assert cli.model.backbone_cfg.pretrained == str(clip)  # the checkpoint's, not the recipe's demo_out path
    assert "prompt: 'a photo of $ that {}' -> 'a picture of $ that {}'" in caplog.text
    cli = run_lightning(args)
    assert cli.model.prompt == "a photo of $ that {}" and cli.model.phi_dropout == 0.25


def test_a_null_pretrained_flag_means_random_init():
    # LightningCLI hands `--model.init_args.backbone.pretrained=null` over as the string "None"
    assert BackboneConfig("cirlab-tiny", "None").pretrained is None
    assert BackboneConfig("cirlab-tiny", "null").pretrained is None
    assert BackboneConfig("cirlab-tiny", "runs/x/export/backbone.safetensors").pretrained.endswith(".safetensors")
