"""SEARLETask: the query prompts against hand-written strings, the regulariser, SEARLE-OTI at query
time, and the quickstart pipeline (concepts -> phrases -> OTI -> phi) on a small synthetic world."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cirlab.data.evalset import Protocol
from cirlab.errors import CirlabError
from cirlab.losses import nt_xent
from cirlab.models import DOLLAR_TOKEN_ID
from cirlab.train.config import BackboneConfig
from cirlab.train.oti import OTIConfig
from cirlab.train.searle_task import SEARLETask


@pytest.fixture(scope="module")
def task():
    torch.manual_seed(0)
    t = SEARLETask(backbone=BackboneConfig("cirlab-tiny"))
    return t.eval()


def _hand(task, texts, pseudo):
    bb = task.backbone
    return bb.encode_text_with_pseudo_tokens(bb.tokenize(texts), pseudo, DOLLAR_TOKEN_ID, first_only=True)


def test_plain_queries_are_a_photo_of_dollar_that_caption(task):
    ref = torch.randn(2, task.backbone.embed_dim)
    texts = [["turn it blue"], ["make it cost $ 5"]]
    with torch.no_grad():
        got = task.query_features(ref, texts, Protocol("x", text_format="plain"))
        pseudo = task.phi(ref)
        hand = _hand(task, ["a photo of $ that turn it blue", "a photo of $ that make it cost $ 5"], pseudo)
    assert torch.allclose(got, hand, atol=1e-5)


def test_fashioniq_queries_average_both_orders_of_the_stripped_captions(task):
    ref = torch.randn(1, task.backbone.embed_dim)
    with torch.no_grad():
        got = task.query_features(ref, [["is red.", " has long sleeves?"]], Protocol("f", text_format="fashioniq"))
        pseudo = task.phi(ref)
        a = F.normalize(_hand(task, ["a photo of $ that is red and has long sleeves"], pseudo), dim=-1)
        b = F.normalize(_hand(task, ["a photo of $ that has long sleeves and is red"], pseudo), dim=-1)
    assert torch.allclose(got, F.normalize((a + b) / 2, dim=-1), atol=1e-5)


def test_bad_settings_are_one_clear_error(task):
    with pytest.raises(CirlabError, match="text_format"):
        task.query_features(torch.randn(1, task.backbone.embed_dim), [["x"]], Protocol("x", text_format="other"))
    with pytest.raises(CirlabError, match="inversion"):
        SEARLETask(inversion="pic2word", backbone=BackboneConfig("cirlab-tiny"))
    with pytest.raises(CirlabError, match="prompt"):
        SEARLETask(prompt="a photo of {} that $", backbone=BackboneConfig("cirlab-tiny"))


def test_the_regulariser_replaces_every_occurrence_and_tokenises_only_the_first(task):
    phrase = "a photo of a red circle that is next to a red circle"
    est = torch.randn(1, task.backbone.token_dim)
    with torch.no_grad():
        got = task.regulariser_loss(est, [(phrase, "red circle")])
        marked = _hand(task, ["a photo of a  $  that is next to a  $ "], est)
        orig = task.backbone.encode_text(task.backbone.tokenize([phrase]))
    assert got.item() == pytest.approx(float(1 - F.cosine_similarity(marked, orig)[0]), abs=1e-5)


def test_distillation_is_nt_xent_at_tau_025(task):
    a, b = torch.randn(6, task.backbone.token_dim), torch.randn(6, task.backbone.token_dim)
    assert task.temperature == 0.25 and task.lambda_reg == 0.75 and task.top_k_concepts == 150
    assert task.distillation_loss(a, b).item() == pytest.approx(nt_xent(a, b, 0.25).item(), rel=1e-6)
    opt = task.default_optimizer()
    assert (opt.name, opt.lr, opt.weight_decay) == ("adamw", 1e-4, 0.01)
    assert task.default_backbone().image_transform == "targetpad"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from cirlab.data.synthetic import build_world
    from cirlab.train.searle_task import searle_quickstart

    root = tmp_path_factory.mktemp("searle-q")
    world = build_world(root / "world", seed=0, n_train_scenes=48, n_eval_queries=8, renders_per_scene=1,
                        shard_size=24)
    torch.manual_seed(0)
    export = searle_quickstart(str(root / "world"), str(root / "out"), None, oti=OTIConfig(steps=6, batch_size=24),
                               epochs=6, batch_size=16, lr=1e-3)
    return {"root": root, "world": world, "export": export, "out": root / "out"}


def test_the_quickstart_pipeline_distils_phi_towards_the_oti_tokens(pipeline):
    from safetensors.torch import load_file

    from cirlab.models import Backbone, Phi
    from cirlab.train.oti import load_oti_tokens

    export = pipeline["export"]
    assert sorted(p.name for p in export.iterdir()) == ["backbone.safetensors", "phi.safetensors"]
    ids, tokens = load_oti_tokens(pipeline["out"] / "oti")
    assert len(ids) == 48
    bb = Backbone("cirlab-tiny", str(export / "backbone.safetensors")).eval()
    with torch.no_grad():
        from cirlab.data.concepts import my_shards, shard_batches

        feats, order = [], []
        for url in my_shards(str(pipeline["world"].path("images")), 0, 1)[0]:
            for batch in shard_batches(url, bb.transform("targetpad"), 24):
                feats.append(bb.encode_image(batch["image"]))
                order += batch["id"]
        feats = torch.cat(feats)
        pos = {i: n for n, i in enumerate(ids)}
        targets = tokens[[pos[i] for i in order]]
        trained = Phi(bb.embed_dim, 4 * bb.embed_dim, bb.token_dim).eval()
        trained.load_state_dict(load_file(str(export / "phi.safetensors")))
        torch.manual_seed(0)
        fresh = Phi(bb.embed_dim, 4 * bb.embed_dim, bb.token_dim).eval()
        assert nt_xent(targets, trained(feats), 0.25) < nt_xent(targets, fresh(feats), 0.25)


def test_searle_oti_inverts_each_reference_at_query_time_under_inference_mode(pipeline):
    out = pipeline["out"]
    torch.manual_seed(0)
    t = SEARLETask(inversion="oti", concepts=str(out / "concepts"), phrases=str(out / "phrases.jsonl"),
                   oti=OTIConfig(steps=3, batch_size=4), backbone=BackboneConfig("cirlab-tiny")).eval()
    ref = torch.randn(3, t.backbone.embed_dim)
    ref = torch.cat([ref, ref[:1]])  # the first reference twice: inverted once
    with torch.inference_mode():  # as Lightning's evaluation loops run
        got = t.query_features(ref, [["turn it blue"]] * 4, Protocol("x"))
    assert torch.isfinite(got).all() and torch.allclose(got[0], got[3])
    assert len(t._oti_state["done"]) == 3
    with torch.no_grad():
        by_phi = SEARLETask.query_features.__get__(t)  # the same task evaluated by phi instead
        t.inversion = "phi"
        assert not torch.allclose(by_phi(ref, [["turn it blue"]] * 4, Protocol("x")), got, atol=1e-4)


# ----------------------------------------------------------------------------- the distillation under DDP
def _ddp_worker(rank, port, out_dir):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        t = SEARLETask(lambda_reg=0.0, backbone=BackboneConfig("cirlab-tiny")).eval()  # no dropout draws
        phi = torch.nn.parallel.DistributedDataParallel(t.phi)
        feats, targets = _ddp_data(t)
        sl = slice(rank * 4, rank * 4 + 4)
        loss = t.distillation_loss(targets[sl], phi(feats[sl]))
        loss.backward()
        torch.save({"loss": loss.item(), "grads": [p.grad.clone() for p in t.phi.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)  # gloo's at-exit teardown aborts now and then


def _ddp_data(t):
    g = torch.Generator().manual_seed(3)
    return torch.randn(8, t.backbone.embed_dim, generator=g), torch.randn(8, t.backbone.token_dim, generator=g)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_distillation_over_two_ranks_equals_the_global_batch(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    t = SEARLETask(lambda_reg=0.0, backbone=BackboneConfig("cirlab-tiny")).eval()
    feats, targets = _ddp_data(t)
    loss = nt_xent(targets, t.phi(feats), 0.25)
    loss.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
        for g, ref in zip(got["grads"], [p.grad for p in t.phi.parameters()]):
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4)


def _test_run(task, eval_set):
    import lightning as L

    from cirlab.data.retrieval import RetrievalDataModule

    dm = RetrievalDataModule(test_sets=[str(eval_set)], eval_batch_size=64, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.test(task, datamodule=dm, verbose=False)
    return task.last_results["synthetic"]


def test_searle_and_searle_oti_evaluate_through_lightning(pipeline):
    from safetensors.torch import load_file

    from cirlab.train.base import exported_backbone

    export, out = pipeline["export"], pipeline["out"]
    eval_set = pipeline["world"].path("eval/test")
    cfg = BackboneConfig("cirlab-tiny", exported_backbone(export), image_transform="targetpad")
    searle = SEARLETask(backbone=cfg)
    searle.phi.load_state_dict(load_file(str(export / "phi.safetensors")))
    by_phi = _test_run(searle, eval_set)
    oti = SEARLETask(inversion="oti", concepts=str(out / "concepts"), phrases=str(out / "phrases.jsonl"),
                     oti=OTIConfig(steps=3, batch_size=16), backbone=cfg)
    by_oti = _test_run(oti, eval_set)
    for m in (by_phi, by_oti):
        assert {"R@1", "R@5", "R@10"} <= set(m) and all(0.0 <= m[k] <= 100.0 for k in ("R@1", "R@5", "R@10"))
    assert oti._oti_state is not None and len(oti._oti_state["done"]) > 0  # inverted at query time


def test_first_images_copies_the_first_samples_unchanged(pipeline, tmp_path):
    from cirlab.data.shards import read_index
    from cirlab.data.streaming import ShardStream
    from cirlab.train.searle_task import first_images

    src = pipeline["world"].path("images")
    out = first_images(src, tmp_path / "sub", 30, shard_size=8)
    assert read_index(out).total == 30 and len(read_index(out).shards) == 4

    def samples(folder):
        return [(s["id"], s["image"].tobytes()) for s in ShardStream(str(folder), "image", resampled=False,
                                                                     shuffle=False, shuffle_buffer=0)]
    assert samples(out) == samples(src)[:30]
