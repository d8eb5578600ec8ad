"""SEARLE's concepts, OTI and losses against hand computations (issue 13, "How it is checked")."""

from __future__ import annotations

import json
import math
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cirlab.data.concepts import (CONCEPT_TEMPLATES, compute_concepts, concept_text_features, load_image_concepts,
                                  load_vocabulary, top_k_concepts)
from cirlab.data.phrases import generate_phrases, oti_phrase, phi_phrase, usable_phrases
from cirlab.errors import CirlabError
from cirlab.losses import nt_xent
from cirlab.models import DOLLAR_TOKEN_ID, Backbone
from cirlab.train.oti import OTIConfig, PhraseBank, load_oti_tokens, oti_batch, run_oti

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Backbone("cirlab-tiny").eval()


@pytest.fixture(scope="module")
def oti_world(tmp_path_factory):
    """48 images in 3 shards of 16, their concepts and templated phrases."""
    from cirlab.data.synthetic import build_world

    root = tmp_path_factory.mktemp("searle")
    m = build_world(root / "world", seed=0, n_train_scenes=48, n_eval_queries=4, renders_per_scene=1,
                    shard_size=16)
    torch.manual_seed(0)
    bb = Backbone("cirlab-tiny").eval()
    compute_concepts(str(m.path("images")), "synthetic", str(root / "concepts"), k=8, backbone=bb, progress=False)
    generate_phrases("synthetic", "synthetic", str(root / "phrases.jsonl"), n=6, progress=False)
    return {"root": root, "images": str(m.path("images")), "concepts": str(root / "concepts"),
            "phrases": str(root / "phrases.jsonl"), "backbone": bb}


# ----------------------------------------------------------------------------- placeholders (hand-written)
def test_oti_replaces_the_first_occurrence_and_phi_every_one():
    phrase = "a photo of dog that chases another dog"
    assert oti_phrase(phrase, "dog") == "a photo of  $  that chases another dog"
    assert phi_phrase(phrase, "dog") == "a photo of  $  that chases another  $ "
    # a substring inside a word is an occurrence too (the reference's str.replace)
    assert oti_phrase("a hotdog and a dog", "dog") == "a hot $  and a dog"


def test_phi_phrase_tokenises_every_dollar_but_only_the_first_gets_the_token(tiny):
    text = phi_phrase("a photo of cat that sits on a cat bed", "cat")
    assert text == "a photo of  $  that sits on a  $  bed"
    tokens = tiny.tokenize([text])
    assert int((tokens == DOLLAR_TOKEN_ID).sum()) == 2
    pseudo = torch.randn(1, tiny.token_dim)
    first = tiny.encode_text_with_pseudo_tokens(tokens, pseudo, DOLLAR_TOKEN_ID, first_only=True)
    # by hand: the token at the first `$`, the second `$` keeps its own embedding
    emb = tiny.model.token_embedding(tokens).clone()
    pos = (tokens[0] == DOLLAR_TOKEN_ID).nonzero().flatten().tolist()
    emb[0, pos[0]] = pseudo[0]
    x = emb + tiny.model.positional_embedding
    x = tiny.model.ln_final(tiny.model.transformer(x, attn_mask=tiny.model.attn_mask))
    hand = x[0, tokens[0].argmax()] @ tiny.model.text_projection
    assert torch.allclose(first[0], hand, atol=1e-5)
    every = tiny.encode_text_with_pseudo_tokens(tokens, pseudo, DOLLAR_TOKEN_ID, first_only=False)
    assert not torch.allclose(first, every, atol=1e-4)


def test_a_concept_with_a_phrase_lacking_it_is_dropped():
    kept, dropped = usable_phrases({"dog": ["a photo of dog that runs", "a photo of dog that sleeps"],
                                    "Cat": ["a photo of Cat that sits", "a photo of cat that eats"],
                                    "owl": []})
    assert list(kept) == ["dog"] and dropped == ["Cat", "owl"]


def test_phrase_bank_takes_the_top_k_then_drops_unusable_concepts():
    bank = PhraseBank({"a": ["x a"], "b": ["y b"], "c": ["b c"], "d": ["d"], "e": ["no"]}, top_k=4)
    # top 4 after removing repeats (stripped): a, e, b, c -> e has a phrase without "e": dropped
    assert bank.concepts_for(["a", " a", "e", "b", "c", "d"]) == ["a", "b", "c"]
    rng = random.Random(0)
    picks = [bank.sample(["a", "b"], rng) for _ in range(200)]
    assert {p for p in picks} == {("x a", "a"), ("y b", "b")}
    assert bank.sample([], rng) is None


# ----------------------------------------------------------------------------- NT-Xent (hand computation)
def test_nt_xent_has_2n_minus_1_negatives_only_self_excluded():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    tau = 0.25
    z = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in (a.tolist() + b.tolist())]
    n = 4
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {j: sum(p * q for p, q in zip(z[i], z[j])) / tau for j in range(2 * n) if j != i}
        assert len(sims) == 2 * n - 1  # the positive and 2N-2 negatives: every other vector
        total += -(sims[pos] - math.log(sum(math.exp(s) for s in sims.values())))
    assert nt_xent(a, b, tau).item() == pytest.approx(total / (2 * n), rel=1e-5)


def test_nt_xent_equals_the_reference_formula():
    # SEARLE's utils.contrastive_loss (PALAVRA's): numerator exp(diag/tau) twice, denominator the
    # column sums of exp(joint @ joint.T / tau) minus the diagonal
    g = torch.Generator().manual_seed(1)
    v1, v2 = F.normalize(torch.randn(5, 8, generator=g), dim=1), F.normalize(torch.randn(5, 8, generator=g), dim=1)
    num = torch.exp((v1 * v2).sum(1) / 0.25).repeat(2)
    joint = torch.cat([v1, v2])
    pairs = torch.exp(joint @ joint.T / 0.25)
    den = (pairs - pairs * torch.eye(10)).sum(0)
    ref = -torch.log(num / den).mean()
    assert nt_xent(v1, v2, 0.25).item() == pytest.approx(ref.item(), rel=1e-5)


# ----------------------------------------------------------------------------- concepts
def test_concept_feature_is_the_normalised_mean_of_24_normalised_templates(tiny):
    assert len(CONCEPT_TEMPLATES) == 24
    assert CONCEPT_TEMPLATES[2].format(" red circle ") == "A photo of a  red circle "

    def enc(texts):
        return tiny.encode_text(tiny.tokenize(texts))

    names = ["blue square", "red circle", "circle"]
    with torch.no_grad():
        got = concept_text_features(enc, names, concepts_per_pass=2)  # across a pass boundary
        for i, name in enumerate(names):
            rows = [F.normalize(enc([t.replace("{}", f" {name} ")]), dim=-1)[0] for t in CONCEPT_TEMPLATES]
            hand = sum(rows) / 24
            assert torch.allclose(got[i], hand / hand.norm(), atol=1e-5), name


def test_top_k_equals_a_brute_force_cosine_ranking():
    g = torch.Generator().manual_seed(2)
    images, concepts = torch.randn(6, 16, generator=g) * 3, F.normalize(torch.randn(40, 16, generator=g), dim=-1)
    got = top_k_concepts(images, concepts, 7).tolist()
    for i, img in enumerate(images.tolist()):
        norm = math.sqrt(sum(x * x for x in img))
        cos = [sum(x * y for x, y in zip(img, c)) / norm for c in concepts.tolist()]
        assert got[i] == sorted(range(40), key=lambda j: -cos[j])[:7]


def test_compute_concepts_stores_each_images_ranking_beside_the_shards(oti_world, tiny):
    stored = load_image_concepts(oti_world["concepts"])
    assert len(stored) == 48
    names = load_vocabulary("synthetic")
    bb = oti_world["backbone"]
    with torch.no_grad():
        feats = concept_text_features(lambda t: bb.encode_text(bb.tokenize(t)), names)
        from cirlab.data.concepts import shard_batches, my_shards

        url = my_shards(oti_world["images"], 0, 1)[0][0]
        batch = next(shard_batches(url, bb.transform("targetpad"), 16))
        img = F.normalize(bb.encode_image(batch["image"]), dim=-1)
    for i, img_id in enumerate(batch["id"]):
        ranked = sorted(range(len(names)), key=lambda j: -float(img[i] @ feats[j]))[:8]
        assert stored[img_id] == [names[j] for j in ranked]
    # a rerun skips every finished shard
    again = compute_concepts(oti_world["images"], "synthetic", oti_world["concepts"], k=8, backbone=bb, progress=False)
    assert again["written"] == [] and len(again["skipped"]) == 3
    with pytest.raises(CirlabError, match="another vocabulary"):
        (Path(oti_world["concepts"]) / "shard-000000.jsonl").rename(Path(oti_world["concepts"]) / "x.bak")
        try:
            compute_concepts(oti_world["images"], "synthetic", oti_world["concepts"], k=5, backbone=bb, progress=False)
        finally:
            (Path(oti_world["concepts"]) / "x.bak").rename(Path(oti_world["concepts"]) / "shard-000000.jsonl")


# ----------------------------------------------------------------------------- OTI itself
def _content_losses(bb, tokens, image_feats):
    """Per image: mean over the 24 templates of 1 - cos(text(template with the token), image)."""
    texts = [t.format(" $ ") for t in CONCEPT_TEMPLATES]
    out = []
    with torch.no_grad():
        for tok, img in zip(tokens, image_feats):
            f = bb.encode_text_with_pseudo_tokens(bb.tokenize(texts), tok.expand(24, -1), DOLLAR_TOKEN_ID,
                                                  first_only=True)
            out.append(float((1 - F.cosine_similarity(f, img.expand(24, -1), dim=-1)).mean()))
    return out


def test_oti_ema_decay_is_the_reference_at_350_steps_and_scaled_to_fewer(caplog):
    assert OTIConfig().decay == 0.99  # the reference: 0.99 over 350 steps
    assert abs(OTIConfig(steps=40).decay - 0.9158) < 1e-4
    assert abs(OTIConfig(steps=700).decay - 0.99499) < 1e-4
    assert OTIConfig(steps=40, ema_decay=0.5).decay == 0.5
    with caplog.at_level("WARNING", logger="cirlab.train.oti"):
        OTIConfig(steps=350).check()
        OTIConfig(steps=40).check()
        assert not caplog.records
        OTIConfig(steps=40, ema_decay=0.99).check()  # 0.99 ** 40: the output is 67 % the random init
    assert len(caplog.records) == 1 and "67 %" in caplog.text and "0.916" in caplog.text
    with pytest.raises(CirlabError, match="ema_decay"):
        OTIConfig(ema_decay=1.0).check()


def test_oti_lowers_the_content_loss_of_every_image_and_outputs_the_ema(oti_world):
    bb = oti_world["backbone"]
    from cirlab.data.concepts import my_shards, shard_batches
    from cirlab.data.phrases import load_phrases

    url = my_shards(oti_world["images"], 0, 1)[0][0]
    batch = next(shard_batches(url, bb.transform("targetpad"), 8))
    with torch.no_grad():
        feats = bb.encode_image(batch["image"])
    bank = PhraseBank(load_phrases(oti_world["phrases"]), top_k=15)
    stored = load_image_concepts(oti_world["concepts"])
    concepts = [bank.concepts_for(stored[i]) for i in batch["id"]]
    assert all(concepts)
    recorded = []
    cfg = OTIConfig(steps=40)
    res = oti_batch(bb, feats, concepts, bank, cfg, random.Random(0), torch.Generator().manual_seed(0),
                    on_step=lambda step, tok: recorded.append(tok))
    assert len(recorded) == 40
    # the initial token: N(0, 0.02^2)
    assert 0.015 < float(res["init"].std()) < 0.025
    # unset ema_decay: the reference's 0.99 at 350 steps scaled to 40 (0.99 ** 8.75, by hand 0.9158),
    # so that the init keeps ~3 % of the output as in the reference, not 0.99 ** 40 = 67 %
    d = 0.9158
    ema = res["init"].clone()
    for tok in recorded:
        ema = d * ema + (1 - d) * tok
    assert torch.allclose(res["ema"], ema, atol=2e-5)
    assert torch.allclose(res["last"], recorded[-1])
    before = _content_losses(bb, res["init"], feats)
    after = _content_losses(bb, res["last"], feats)
    assert all(a < b for a, b in zip(after, before)), (before, after)


def test_oti_job_writes_every_image_once_and_skips_finished_shards(oti_world, tmp_path):
    out = tmp_path / "oti"
    kw = dict(concepts=oti_world["concepts"], phrases=oti_world["phrases"], oti=OTIConfig(steps=3),
              backbone=oti_world["backbone"], progress=False)
    first = run_oti(oti_world["images"], str(out), **kw)
    assert first["written"] == ["shard-000000", "shard-000001", "shard-000002"]
    ids, tokens = load_oti_tokens(out)
    assert len(ids) == len(set(ids)) == 48 and tokens.shape == (48, oti_world["backbone"].token_dim)
    again = run_oti(oti_world["images"], str(out), **kw)
    assert again["written"] == [] and len(again["skipped"]) == 3
    with pytest.raises(CirlabError, match="other settings"):
        (out / "shard-000002.safetensors").unlink()
        run_oti(oti_world["images"], str(out), **{**kw, "oti": OTIConfig(steps=4)})
    with pytest.raises(CirlabError, match="needs phrases"):
        run_oti(oti_world["images"], str(tmp_path / "o2"), backbone=oti_world["backbone"], progress=False)


# ----------------------------------------------------------------------------- 2 processes, and a killed job
_JOB = """
import sys, json, os, torch
torch.set_num_threads(1)
from cirlab.models import Backbone
from cirlab.train.oti import OTIConfig, run_oti
images, concepts, phrases, out, steps, rank, world, port = sys.argv[1:9]
if int(world) > 1:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
torch.manual_seed(0)
bb = Backbone("cirlab-tiny").eval()
r = run_oti(images, out, concepts=concepts, phrases=phrases, oti=OTIConfig(steps=int(steps)), backbone=bb,
            progress=False)
print(json.dumps({"written": r["written"], "skipped": r["skipped"]}))
if int(world) > 1:
    dist.barrier()
    os._exit(0)  # gloo's at-exit teardown aborts now and then
"""


def _job(world_fx, out, steps, rank=0, world=1, port=0):
    return [sys.executable, "-c", _JOB, world_fx["images"], world_fx["concepts"], world_fx["phrases"], str(out),
            str(steps), str(rank), str(world), str(port)]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_oti_under_two_processes_writes_each_image_once_and_equals_one_process(oti_world, tmp_path):
    one = tmp_path / "one"
    r = subprocess.run(_job(oti_world, one, 4), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    port = _port()
    procs = [subprocess.Popen(_job(oti_world, tmp_path / "two", 4, rank, 2, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for rank in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    written = [json.loads(o[0].strip().splitlines()[-1])["written"] for o in outs]
    assert written == [["shard-000000", "shard-000002"], ["shard-000001"]]  # shard i -> rank i % 2
    ids1, tok1 = load_oti_tokens(one)
    ids2, tok2 = load_oti_tokens(tmp_path / "two")
    assert sorted(ids2) == sorted(ids1) and len(set(ids2)) == 48
    order = {i: n for n, i in enumerate(ids2)}
    assert torch.allclose(tok1, tok2[[order[i] for i in ids1]], atol=1e-6)


@pytest.mark.slow
def test_a_killed_oti_job_resumes_without_redoing_finished_shards(oti_world, tmp_path):
    out = tmp_path / "killed"
    p = subprocess.Popen(_job(oti_world, out, 60), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    try:
        deadline = time.time() + 240
        while not (out / "shard-000000.safetensors").exists():
            assert p.poll() is None and time.time() < deadline, p.stderr.read().decode()[-2000:] if p.stderr else ""
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    finished = sorted(f.name for f in out.glob("*.safetensors"))
    assert "shard-000002.safetensors" not in finished, "the job finished before it could be killed"
    stamps = {f: (out / f).stat().st_mtime_ns for f in finished}
    r = subprocess.run(_job(oti_world, out, 60), capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert sorted(f + ".safetensors" for f in res["skipped"]) == finished
    assert all((out / f).stat().st_mtime_ns == t for f, t in stamps.items())
    assert not list(out.glob("*.tmp"))
    ids, _ = load_oti_tokens(out)
    assert len(ids) == len(set(ids)) == 48


def test_the_searle_commands_run_the_jobs_from_a_command_line(oti_world, tmp_path, capsys):
    from cirlab.train.searle_commands import searle_cli

    phrases = tmp_path / "p.jsonl"
    assert searle_cli(["phrases", "--source", "synthetic", "--concepts", "synthetic", "--out", str(phrases),
                       "--n", "3"]) == 0
    assert all(len(v) == 3 for v in __import__("cirlab.data.phrases", fromlist=["x"]).load_phrases(phrases).values())
    args = ["oti", "--images", oti_world["images"], "--out", str(tmp_path / "oti"), "--concepts", oti_world["concepts"],
            "--phrases", str(phrases), "--model-name", "cirlab-tiny", "--pretrained", "null", "--oti.steps", "2",
            "--oti.batch_size", "16"]
    assert searle_cli(args) == 0
    assert "3 shard(s) written" in capsys.readouterr().out
    meta = json.loads((tmp_path / "oti" / "oti.json").read_text())
    assert meta["config"]["steps"] == 2 and meta["config"]["batch_size"] == 16 and meta["config"]["lr"] == 0.02
    assert len(load_oti_tokens(tmp_path / "oti")[0]) == 48
    with pytest.raises(CirlabError, match="unknown searle command"):
        searle_cli(["otti"])
