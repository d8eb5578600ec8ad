"""GeneCIS reader on the real annotation layout with stand-in images; recall vs the benchmark's get_recall."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cirlab.data.benchmarks.genecis import convert_genecis, crop_dilate_pad, genecis_recall
from cirlab.data.evalset import load_eval_set

from shard_reading import samples


def _reference_get_recall(indices, targets):
    """utils/metric_utils.get_recall of facebookresearch/genecis (one-hot branch), re-expressed."""
    targets = targets.view(-1, 1).expand_as(indices)
    hits = (targets == indices).nonzero()
    if len(hits) == 0:
        return 0
    return float(hits[:, :-1].size(0)) / targets.size(0)


def test_recall_equals_benchmark_get_recall_on_random_rankings():
    g = torch.Generator().manual_seed(0)
    sims = torch.randn(50, 13, generator=g)
    order = sims.argsort(dim=1, descending=True)  # index 0 = the target, as GeneCIS builds its galleries
    ids = [[f"g{j}" for j in row] for row in order.tolist()]
    ours = genecis_recall(ids, ["g0"] * 50, ks=(1, 2, 3))
    for k in (1, 2, 3):
        ref = 100.0 * _reference_get_recall(order[:, :k], torch.zeros(50, dtype=torch.long))
        assert ours[k] == pytest.approx(ref, abs=1e-9) and 0 < ours[k] < 100


def test_crop_dilate_pad_follows_the_reference_arithmetic():
    arr = np.arange(100 * 80 * 3, dtype=np.uint32).reshape(80, 100, 3) % 251
    im = Image.fromarray(arr.astype(np.uint8))
    out = crop_dilate_pad(im, [40, 30, 20, 10])
    # left = 40 - 14 = 26, top = 30 - 7 = 23, right = 26 + 34 = 60, bottom = 23 + 17 = 40: 34 x 17, padded to 34
    assert out.size == (34, 34)
    got = np.asarray(out)
    np.testing.assert_array_equal(got[8:25], arr[23:40, 26:60].astype(np.uint8))  # pasted at (34-17)//2 = 8
    assert got[:8].max() == 0 and got[25:].max() == 0
    # clipped at the image border, as theirs (min with the image size)
    assert crop_dilate_pad(im, [95, 75, 10, 10]).size == (12, 12)  # 88..100 x 68..80


def _coco(tmp_path, ids):
    d = tmp_path / "val2017"
    d.mkdir()
    for i in ids:
        Image.new("RGB", (40, 30), (i % 255, 0, 0)).save(d / f"{i:012d}.jpg")
    return d


def test_object_task_layout(tmp_path):
    ann = [{"reference": {"val_image_id": 139}, "target": {"val_image_id": 285}, "condition": "dog",
            "gallery": [{"val_image_id": 632}, {"val_image_id": 724}]},
           {"reference": {"val_image_id": 285}, "target": {"val_image_id": 724}, "condition": "cup",
            "gallery": [{"val_image_id": 139}]}]
    (tmp_path / "focus_object.json").write_text(json.dumps(ann))
    coco = _coco(tmp_path, [139, 285, 632, 724])
    es = convert_genecis(tmp_path / "focus_object.json", "focus_object", tmp_path / "out", coco_root=coco)
    es = load_eval_set(tmp_path / "out")
    assert es.protocol.name == "genecis-focus-object" and es.protocol.recall_ks == [1, 2, 3]
    q = {s["id"]: s for s in samples(tmp_path / "out" / "queries")}
    assert q["focus_object-00000"]["gallery"] == ["coco-000000000285", "coco-000000000632", "coco-000000000724"]
    assert q["focus_object-00000"]["texts"] == ["dog"] and q["focus_object-00001"]["target_id"] == "coco-000000000724"
    assert sorted(s["id"] for s in samples(tmp_path / "out" / "gallery")) == [
        f"coco-{i:012d}" for i in (139, 285, 632, 724)]


def test_attribute_task_crops_and_missing_images(tmp_path):
    vg = tmp_path / "VG_100K"
    vg.mkdir()
    for i in (1, 2):
        Image.new("RGB", (100, 80), "white").save(vg / f"{i}.jpg")
    ann = [{"reference": {"image_id": 1, "instance_bbox": [40, 30, 20, 10]}, "condition": "red",
            "target": {"image_id": 2, "instance_bbox": [10, 10, 30, 30]},
            "gallery": [{"image_id": 1, "instance_bbox": [0, 0, 50, 20]}]}]
    (tmp_path / "change_attribute.json").write_text(json.dumps(ann))
    convert_genecis(tmp_path / "change_attribute.json", "change_attribute", tmp_path / "out", vg_root=vg)
    gal = {s["id"]: s for s in samples(tmp_path / "out" / "gallery")}
    assert gal["vg-1-40,30,20,10"]["jpg"].size == (34, 34)  # the reference crop, dilated and padded
    assert set(gal) == {"vg-1-40,30,20,10", "vg-2-10,10,30,30", "vg-1-0,0,50,20"}
    ann[0]["gallery"].append({"image_id": 9, "instance_bbox": [0, 0, 5, 5]})
    (tmp_path / "change_attribute.json").write_text(json.dumps(ann))
    with pytest.raises(Exception, match="9.jpg not found"):
        convert_genecis(tmp_path / "change_attribute.json", "change_attribute", tmp_path / "out2", vg_root=vg)
