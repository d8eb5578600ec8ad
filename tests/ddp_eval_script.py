"""Run by tests/test_evaluation_ddp.py: one evaluation of a test set under Lightning DDP (CPU, gloo).

argv: backbone file, evaluation set, output folder, number of processes. Each rank writes what it
encoded and the metrics it computed.
"""

import json
import sys
from pathlib import Path

import lightning as L

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.baselines import BaselineTask
from cirlab.train.config import BackboneConfig


class Record(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_test_end(self, trainer, pl_module):
        r = pl_module.last_rankings["synthetic"]
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "world": trainer.world_size, "encoded": pl_module.encoded_gallery_images("test"),
            "metrics": pl_module.last_results["synthetic"], "ranked": r["ranked"], "qids": r["query_ids"]}))


if __name__ == "__main__":
    backbone, eval_set, out, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    task = BaselineTask("sum", backbone=BackboneConfig("cirlab-tiny", backbone))
    dm = RetrievalDataModule(test_sets=[eval_set], eval_batch_size=16, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", devices=n, strategy="ddp" if n > 1 else "auto", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Record(out)])
    trainer.test(task, datamodule=dm, verbose=False)
