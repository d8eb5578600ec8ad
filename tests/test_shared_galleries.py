"""shared_galleries(): a frozen gallery encoded by one task is reused by the next task with the same
encoder (same weights, method, transform), gives the same metrics, and is never shared otherwise."""

import lightning as L
import pytest

from cli_runs import save_tiny_backbone
from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.baselines import BaselineTask
from cirlab.train.config import BackboneConfig
from cirlab.train.evaluation import shared_galleries


def _test(task, world):
    dm = RetrievalDataModule(test_sets=[str(world.path("eval/test"))], eval_batch_size=64, num_workers=0)
    opened = []

    class Watch(L.Callback):
        def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            opened.append(batch_idx)

    L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[Watch()]).test(task, datamodule=dm, verbose=False)
    return task.last_results["synthetic"], task.evaluators["test"].encoded_images, len(opened)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    d = tmp_path_factory.mktemp("w")
    save_tiny_backbone(d / "a.safetensors", seed=0)
    save_tiny_backbone(d / "b.safetensors", seed=1)
    return d / "a.safetensors", d / "b.safetensors"


def test_a_second_task_with_the_same_encoder_reuses_the_gallery(small_world, weights):
    a, b = weights
    n_gallery = small_world.counts["eval/test/gallery"]
    alone, encoded, _ = _test(BaselineTask("sum", backbone=BackboneConfig("cirlab-tiny", str(a))), small_world)
    assert encoded == n_gallery  # outside the block: encoded, nothing kept for others
    with shared_galleries():
        _, first, _ = _test(BaselineTask("image", backbone=BackboneConfig("cirlab-tiny", str(a))), small_world)
        shared, second, batches = _test(BaselineTask("sum", backbone=BackboneConfig("cirlab-tiny", str(a))), small_world)
        other, third, _ = _test(BaselineTask("sum", backbone=BackboneConfig("cirlab-tiny", str(b))), small_world)
    assert first == n_gallery
    assert second == 0 and batches == 0  # the gallery's shards were not even opened
    assert shared == alone  # the same metrics as encoding it itself
    assert third == n_gallery  # other weights: encoded again
    assert other != alone
    # after the block nothing is shared any more
    _, again, _ = _test(BaselineTask("sum", backbone=BackboneConfig("cirlab-tiny", str(a))), small_world)
    assert again == n_gallery


def test_another_transform_or_a_trainable_gallery_is_not_shared(small_world, weights):
    a, _ = weights
    n_gallery = small_world.counts["eval/test/gallery"]
    with shared_galleries():
        _test(BaselineTask("image", backbone=BackboneConfig("cirlab-tiny", str(a))), small_world)
        _, padded, _ = _test(BaselineTask("image", backbone=BackboneConfig("cirlab-tiny", str(a),
                                                                          image_transform="targetpad")), small_world)
        trainable = BaselineTask("image", backbone=BackboneConfig("cirlab-tiny", str(a)))
        trainable.backbone.requires_grad_(True)  # a gallery that may change is never kept
        _, unfrozen, _ = _test(trainable, small_world)
    assert padded == n_gallery
    assert unfrozen == n_gallery
