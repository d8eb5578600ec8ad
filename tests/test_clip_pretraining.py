"""CLIP pre-training's parts: hard negatives and duplicate captions in CLIPTask's loss, and the
supervised image-tower warm-up (ImageClassificationTask) on the world's one-object pictures."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.errors import CirlabError
from cirlab.train.classify_task import ImageClassificationTask
from cirlab.train.clip_task import CLIPTask
from cirlab.train.config import BackboneConfig


def _ce(rows, labels):
    """Mean of -log softmax, one explicit list of logits per row."""
    return sum(-(r[y] - math.log(sum(math.exp(v) for v in r))) for r, y in zip(rows, labels)) / len(rows)


def _encode(task, texts):
    with torch.no_grad():
        return task.normalize(task.backbone.encode_text(task.backbone.tokenize(texts)))


def _by_hand(task, images, texts, negatives):
    """i2t over the batch's distinct-caption texts + every real negative; t2i over the images."""
    with torch.no_grad():
        img = task.normalize(task.backbone.encode_image(images))
    txt, neg = _encode(task, texts), _encode(task, negatives) if negatives else None
    s = float(task.logit_scale())
    i2t, t2i = [], []
    for i in range(len(texts)):
        keep = [j for j in range(len(texts)) if j == i or texts[j] != texts[i]]  # same caption: no negative
        row = [s * float(img[i] @ txt[j]) for j in keep]
        row += [] if neg is None else [s * float(img[i] @ n) for n in neg]
        i2t.append((row, keep.index(i)))
        row = [s * float(txt[i] @ img[j]) for j in keep]
        t2i.append((row, keep.index(i)))
    return (_ce(*zip(*i2t)) + _ce(*zip(*t2i))) / 2


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_clip_hard_negatives_join_the_image_side(images):
    torch.manual_seed(0)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), hard_negatives=2).eval()
    texts = ["a red circle", "a blue square at the top", "a green diamond", "a photo of a yellow triangle"]
    batch = {"image": images, "text": texts,
             "negatives": [["a red square", "a red diamond", "a red triangle"], None, ["a green circle"], []]}
    with torch.no_grad():
        got = task.training_step(batch, 0).item()
    # the first two of the first pair's three, the third pair's one; padding counts for nothing
    want = _by_hand(task, images, texts, ["a red square", "a red diamond", "a green circle"])
    assert got == pytest.approx(want, rel=1e-5)
    assert got > _by_hand(task, images, texts, []) + 1e-4  # the negatives are in the loss
    # hard_negatives=0 (the default): the field is ignored
    plain = CLIPTask(backbone=BackboneConfig("cirlab-tiny")).eval()
    plain.load_state_dict(task.state_dict())
    with torch.no_grad():
        assert plain.training_step(batch, 0).item() == pytest.approx(_by_hand(task, images, texts, []), rel=1e-5)
    with pytest.raises(ValueError, match="hard_negatives must be >= 0"):
        CLIPTask(backbone=BackboneConfig("cirlab-tiny"), hard_negatives=-1)


def test_clip_identical_captions_are_not_negatives(images):
    torch.manual_seed(1)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny")).eval()
    texts = ["a photo of a red circle", "a photo of a blue square", "a photo of a red circle", "a green diamond"]
    with torch.no_grad():
        got = task.training_step({"image": images, "text": texts}, 0).item()
    assert got == pytest.approx(_by_hand(task, images, texts, []), rel=1e-5)
    # and that differs from counting the repeat as a negative
    with torch.no_grad():
        img, txt = task.normalize(task.backbone.encode_image(images)), _encode(task, texts)
    s = task.logit_scale()
    naive = (F.cross_entropy(s * img @ txt.T, torch.arange(4)) + F.cross_entropy(s * txt @ img.T, torch.arange(4))) / 2
    assert abs(got - naive.item()) > 1e-4


def test_shape_warm_up_trains_the_image_tower_only(small_world, tmp_path):
    """shapes.yaml's task on the world's objects/: the label field reaches the loss, gradients reach
    the image tower and the head and never the text tower; the export is the CLIP with a new image tower."""
    torch.manual_seed(0)
    task = ImageClassificationTask(classes=["circle", "square", "triangle", "diamond"], label_field="shape",
                                   backbone=BackboneConfig("cirlab-tiny"))
    before = {k: v.clone() for k, v in task.backbone.model.state_dict().items()}
    dm = RetrievalDataModule(train=str(small_world.path("objects")), kind="pair", batch_size=16, num_workers=0,
                             steps_per_epoch=3)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, default_root_dir=str(tmp_path),
                        logger=L.pytorch.loggers.CSVLogger(str(tmp_path), name="shapes"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, datamodule=dm)
    state = load_file(str(tmp_path / "shapes" / "version_0" / "export" / "backbone.safetensors"))
    changed = {k for k, v in state.items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("visual.") for k in changed), sorted(changed)[:5]
    assert any(k.startswith("visual.transformer") for k in changed)
    # by hand: the gradient of one step reaches the head and the image tower, not the text side
    task = ImageClassificationTask(classes=["circle", "square", "triangle", "diamond"], label_field="shape",
                                   backbone=BackboneConfig("cirlab-tiny"))  # a fresh one: outside a Trainer
    batch = {"image": torch.randn(4, 3, 64, 64), "shape": ["circle", "diamond", "square", "circle"]}
    task.training_step(batch, 0).backward()
    assert task.head.weight.grad.abs().sum() > 0
    assert task.backbone.model.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in task.backbone.model.named_parameters() if not n.startswith("visual."))


def test_shape_warm_up_bad_labels_fail_clearly():
    task = ImageClassificationTask(classes=["circle", "square"], label_field="shape",
                                   backbone=BackboneConfig("cirlab-tiny"))
    with pytest.raises(CirlabError, match="must name one of"):
        task.training_step({"image": torch.randn(2, 3, 64, 64), "shape": ["circle", "hexagon"]}, 0)
    with pytest.raises(CirlabError, match="no such field"):
        task.training_step({"image": torch.randn(2, 3, 64, 64)}, 0)
    with pytest.raises(CirlabError, match="distinct names"):
        ImageClassificationTask(classes=["circle", "circle"], backbone=BackboneConfig("cirlab-tiny"))


def _dense_by_hand(task, text, token):
    """open_clip's own encode_text with the '*' row of the token table set to `token` (no cirlab path)."""
    from cirlab.models.backbone import STAR_TOKEN_ID

    table = task.backbone.model.token_embedding.weight
    with torch.no_grad():
        saved = table[STAR_TOKEN_ID].clone()
        table[STAR_TOKEN_ID] = token
        try:
            return task.normalize(task.backbone.model.encode_text(task.backbone.tokenize([text])))[0]
        finally:
            table[STAR_TOKEN_ID] = saved


def test_clip_dense_reference_is_one_token_from_the_reference_feature(images, tmp_path):
    torch.manual_seed(2)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), dense_references=1.0, dense_inversions=1.0).eval()
    texts = ["a photo of a red circle , make the circle blue", "a green diamond",
             "a blue square , but remove the square", "a photo of a red circle , make the circle blue"]
    batch = {"image": images, "text": texts,
             "reference": ["a red circle", None, "a blue square", "a large red circle at the top"],
             "dense_text": ["a photo of * , make the circle blue", None, "* , but remove the square",
                            "a photo of * , make the circle blue"]}
    with torch.no_grad():
        feats, ids = task._text_features(batch, texts)

        def token(text):  # the dense token: the learnt map of the text's raw feature
            return task.reference_token(task.backbone.encode_text(task.backbone.tokenize([text])))[0]

        want = [_dense_by_hand(task, "a photo of * , make the circle blue", token("a red circle")),
                _dense_by_hand(task, "a photo of *", token("a green diamond")),   # an inversion
                _dense_by_hand(task, "* , but remove the square", token("a blue square")),
                _dense_by_hand(task, "a photo of * , make the circle blue", token("a large red circle at the top"))]
    for got, w in zip(feats, want):
        torch.testing.assert_close(got, w, atol=2e-5, rtol=0)
    assert float(feats[0] @ _encode(task, texts[:1])[0]) < 0.9999  # not the written caption
    # rows 0 and 3 share a caption but not a reference: not each other's duplicates
    assert len(set(ids)) == 4 and ids[1] != "a green diamond"
    # no dense fractions: plain CLIP, no map
    plain = CLIPTask(backbone=BackboneConfig("cirlab-tiny")).eval()
    assert not hasattr(plain, "reference_token")
    plain.backbone.load_state_dict(task.backbone.state_dict())
    with torch.no_grad():
        feats, ids = plain._text_features(batch, texts)
    torch.testing.assert_close(feats, _encode(task, texts), atol=1e-6, rtol=0)
    assert ids == texts
    # the map trains (and the tower through the dense captions), and is not exported
    task.train()
    task.training_step(batch, 0).backward()
    assert task.reference_token.weight.grad.abs().sum() > 0
    assert set(task.export(tmp_path)) == {"backbone"}


def test_clip_dense_fractions_pick_that_share_of_the_pairs():
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), dense_references=0.5, dense_inversions=0.25)
    n = 2000
    batch = {"text": [f"caption {i}" for i in range(n)],
             "reference": ["a red circle" if i % 2 else None for i in range(n)],
             "dense_text": ["a photo of * , make it blue" if i % 2 else None for i in range(n)]}
    torch.manual_seed(0)
    chosen = task._dense_choice(batch, n)
    refs = sum(1 for i in chosen if i % 2)
    inversions = [i for i in chosen if i % 2 == 0]
    assert 430 < refs < 570 and 190 < len(inversions) < 310   # 500 and 250 expected
    assert all(chosen[i] == ("a photo of *", f"caption {i}") for i in inversions)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fraction of the pairs"):
            CLIPTask(backbone=BackboneConfig("cirlab-tiny"), dense_references=bad)


def test_clip_dense_references_without_references_warn_and_keep_every_parameter_in_the_graph(images, caplog):
    torch.manual_seed(3)
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), dense_references=0.5).eval()
    texts = ["a red circle", "a blue square at the top", "a green diamond", "a photo of a yellow triangle"]
    with caplog.at_level("WARNING", logger="cirlab.train.clip_task"):
        loss = task.training_step({"image": images, "text": texts}, 0)
        task.training_step({"image": images, "text": texts}, 1)
        assert not [r for r in caplog.records if "dense_references" in r.getMessage()]  # one batch without is normal
        task.on_train_epoch_end()
        task.on_train_epoch_end()
    said = [r.getMessage() for r in caplog.records if "dense_references" in r.getMessage()]
    assert len(said) == 1 and "reference" in said[0]   # once, naming the missing fields
    with torch.no_grad():
        assert loss.item() == pytest.approx(_by_hand(task, images, texts, []), rel=1e-5)  # plain CLIP
    loss.backward()
    # DDP (find_unused_parameters off) needs a gradient for every parameter, even an unused map's
    assert task.reference_token.weight.grad is not None and task.reference_token.weight.grad.abs().sum() == 0


def test_clip_dense_references_no_warning_when_some_batch_of_the_epoch_has_references(images, caplog):
    # the world's pair shards hold plain or difference pairs: the first batches may have none
    task = CLIPTask(backbone=BackboneConfig("cirlab-tiny"), dense_references=0.5).eval()
    plain = {"image": images, "text": ["a red circle", "a blue square", "a green diamond", "a yellow triangle"]}
    diff = dict(plain, reference=["a red circle", None, None, None],
                dense_text=["a photo of * that add a blue square", None, None, None])
    with caplog.at_level("WARNING", logger="cirlab.train.clip_task"):
        task.training_step(plain, 0)
        task.training_step(diff, 1)
        task.on_train_epoch_end()
    assert not [r for r in caplog.records if "dense_references" in r.getMessage()]
