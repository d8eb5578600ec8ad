"""The domain-conversion benchmark (ImageNet -> ImageNet-R) on stand-in images laid out as the real
folders, with list files in the reference's format; its R@K; Pic2Word's queries on it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from cirlab.data.benchmarks.imagenet_r import DOMAINS, convert_imagenet_r, positive_recall_at_k
from cirlab.data.evalset import load_eval_set
from cirlab.errors import CirlabError
from shard_reading import samples
from test_benchmarks_data import assert_image, save_image

# class label -> wnid (three of ImageNet-R's 200 classes)
WNIDS = {1: "n01443537", 2: "n01484850", 994: "n13052670"}
# ImageNet-R files per class: cartoon for all, origami for class 1, toy for class 2, no sculpture
RENDITIONS = {1: ["cartoon_0", "cartoon_3", "origami_1"], 2: ["cartoon_1", "toy_0", "toy_7"], 994: ["cartoon_2"]}
MISSING = "imgnet/imagenet-r/n01484850/toy_7.jpg"  # listed but never downloaded


def _real(label: int, i: int) -> str:
    return f"imgnet/real/{WNIDS[label]}/ILSVRC2012_val_{label:05d}{i:03d}.JPEG"


@pytest.fixture()
def imgnet_root(tmp_path):
    root = tmp_path / "data"
    queries, targets = [], []
    for label in WNIDS:
        for i in range(2):
            queries.append((_real(label, i), label))
    for label, files in RENDITIONS.items():
        for f in files:
            domain = DOMAINS.index(f.split("_")[0])
            targets.append((f"imgnet/imagenet-r/{WNIDS[label]}/{f}.jpg", label + 1000 * domain))
    targets += [(rel, label + 6000) for rel, label in queries]  # the real images are in the gallery too
    for rel, _ in queries + targets:
        if rel != MISSING:
            save_image(root / rel, rel)
    # the reference's files end every line with a space
    (root / "imgnet" / "imgnet_real_query.txt").write_text("".join(f"{r} {lab} \n" for r, lab in queries))
    (root / "imgnet" / "imgnet_targets.txt").write_text("".join(f"{r} {lab} \n" for r, lab in targets))
    return root, queries, targets


def test_conversion_gallery_sets_positives_and_protocol(imgnet_root, tmp_path):
    root, queries, targets = imgnet_root
    report = convert_imagenet_r(root, tmp_path / "out")
    gal = samples(tmp_path / "out" / "gallery")
    want = [(r, lab) for r, lab in targets if r != MISSING]
    assert [(s["id"], s["label"]) for s in gal] == want  # the target list's order, the missing file left out
    assert_image(gal[0]["jpg"], want[0][0])
    assert report.written["gallery"] == len(want) and report.skipped == {"gallery image missing": 1}
    assert (tmp_path / "out" / "missing.txt").read_text().strip().endswith(MISSING)
    assert sorted(json.loads((tmp_path / "out" / "report.json").read_text())["written"]) == \
        ["eval/cartoon/queries", "eval/origami/queries", "eval/sculpture/queries", "eval/toy/queries", "gallery"]
    expected_gt = {  # written out by hand from RENDITIONS
        "cartoon": {1: ["n01443537/cartoon_0", "n01443537/cartoon_3"], 2: ["n01484850/cartoon_1"],
                    994: ["n13052670/cartoon_2"]},
        "origami": {1: ["n01443537/origami_1"], 2: [], 994: []},
        "toy": {1: [], 2: ["n01484850/toy_0"], 994: []},  # toy_7 is missing
        "sculpture": {1: [], 2: [], 994: []},
    }
    for domain in DOMAINS:
        es = load_eval_set(tmp_path / "out" / "eval" / domain)
        p = es.protocol
        assert (p.name, p.text_format, p.group, p.recall_ks, p.exclude_reference) == \
            (f"imagenet-r-{domain}", "domain", "imagenet-r", [10, 50], False)
        assert es.gallery.total == len(want)  # every set ranks the one shared gallery
        qs = samples(es.queries.root)
        assert [q["ref_id"] for q in qs] == [r for r, _ in queries]
        for q in qs:
            gt = [f"imgnet/imagenet-r/{g}.jpg" for g in expected_gt[domain][q["label"]]]
            assert q["texts"] == [domain] and q["domain"] == domain
            assert q["gt_ids"] == gt and q["target_id"] == (gt[0] if gt else None)
            assert_image(q["ref.jpg"], q["ref_id"])
    assert report.notes["sculpture queries without positives (count 0, as in the reference)"] == 6


def test_recall_is_the_fraction_of_positives_and_empty_queries_count_zero():
    ranked = [["a", "x", "b", "y"], ["y", "c", "x", "z"], ["x", "y", "z", "w"]]
    gt = [["a", "b", "c"], ["c"], []]
    got = positive_recall_at_k(ranked, gt, [1, 3])
    # K=1: 1/3, 0, 0 -> 11.11 %; K=3: 2/3, 1, 0 -> 55.56 %
    assert got[1] == pytest.approx(100 * (1 / 3) / 3)
    assert got[3] == pytest.approx(100 * (2 / 3 + 1) / 3)


def test_pic2word_queries_rank_the_domain_sets(imgnet_root, tmp_path):
    from cirlab.data.streaming import ShardStream
    from cirlab.train.config import BackboneConfig
    from cirlab.train.pic2word_task import Pic2WordTask

    root, _, _ = imgnet_root
    convert_imagenet_r(root, tmp_path / "out", domains=("cartoon", "toy"))
    assert sorted(p.name for p in (tmp_path / "out" / "eval").iterdir()) == ["cartoon", "toy"]
    torch.manual_seed(0)
    task = Pic2WordTask(backbone=BackboneConfig("cirlab-tiny")).eval()
    tf = task.image_transform(train=False)
    es = load_eval_set(tmp_path / "out" / "eval" / "cartoon")
    gal = list(ShardStream(es.gallery.root, "image", transform=tf, resampled=False, shuffle=False,
                           shuffle_buffer=0, batch_size=None, equal_steps=False))
    ids = [s["id"] for s in gal]
    with torch.no_grad():
        g = task.gallery_features(torch.stack([s["image"] for s in gal]))
        qs = samples(es.queries.root)
        ref = g[[ids.index(q["ref_id"]) for q in qs]]
        q = task.query_features(ref, [q["texts"] for q in qs], es.protocol)
    ranked = (F.normalize(q, dim=1) @ F.normalize(g, dim=1).T).argsort(dim=1, descending=True)
    ranked_ids = [[ids[j] for j in row] for row in ranked.tolist()]
    r = positive_recall_at_k(ranked_ids, [q["gt_ids"] for q in qs], [10, 50])
    assert r[50] == pytest.approx(100.0)  # a gallery of 14 images: every positive is in the top 50
    assert 0 <= r[10] <= 100
    # the evaluator ranks every domain set the same way, and averages the domains
    from cirlab.train.domain_eval import evaluate_domain_conversion

    res = evaluate_domain_conversion(task, [tmp_path / "out" / "eval" / d for d in ("cartoon", "toy")], batch_size=4)
    assert set(res) == {"imagenet-r-cartoon", "imagenet-r-toy", "imagenet-r"}
    assert res["imagenet-r-cartoon"]["R@10"] == pytest.approx(r[10], abs=1e-6)
    # toy: only class 2's two queries have a positive (toy_0); the other four count 0
    assert res["imagenet-r-toy"]["R@50"] == pytest.approx(100 * 2 / 6)
    assert res["imagenet-r"]["R@50"] == pytest.approx((100 + 100 * 2 / 6) / 2)


def test_bad_inputs_are_named(imgnet_root, tmp_path):
    root, _, _ = imgnet_root
    with pytest.raises(CirlabError, match="holds no imgnet/ folder"):
        convert_imagenet_r(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(CirlabError, match="unknown domains"):
        convert_imagenet_r(root, tmp_path / "out", domains=("sketch",))
    lst = root / "imgnet" / "imgnet_targets.txt"
    lst.write_text(lst.read_text() + "imgnet/imagenet-r/x/cartoon_9.jpg\n")
    with pytest.raises(CirlabError, match=r"imgnet_targets.txt:\d+: expected"):
        convert_imagenet_r(root, tmp_path / "out")
    (root / "imgnet" / "imgnet_real_query.txt").unlink()
    with pytest.raises(CirlabError, match="list file not found"):
        convert_imagenet_r(root / "imgnet", tmp_path / "out")  # ROOT may be the imgnet folder itself
