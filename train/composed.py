"""The composed-retrieval task family: Combiner, Pic2Word, SEARLE, LinCIR (and the baselines).

A method in this family says how it trains (`training_step`) and how it turns a (reference
feature, query texts) pair into a query feature (`query_features`); the family owns evaluation
through the shared component (train/evaluation.py), made in `configure_metrics` from the data
module's evaluation sets.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from cirlab.data.evalset import Protocol
from cirlab.errors import CirlabError
from cirlab.train.base import BaseTask
from cirlab.train.evaluation import EvalContext, RetrievalEvaluator, save_results, sharing_galleries

log = logging.getLogger(__name__)


class ComposedRetrievalTask(BaseTask):
    """Base of every composed-retrieval method: gallery features, query features, shared evaluation."""

    # ----------------------------------------------------------------- what a method defines
    def gallery_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw features of gallery images (normalised later for ranking)."""
        return self.backbone.encode_image(images)

    def gallery_modules(self) -> list[nn.Module]:
        """The modules `gallery_features` depends on: while none of them trains, gallery features are
        encoded once and kept between evaluations. A method whose gallery uses more declares it."""
        visual = getattr(self.backbone.model, "visual", None)
        return [visual] if visual is not None else []

    def query_texts(self, texts: list[list[str]], protocol: Protocol) -> list[str]:
        """One text per query in the protocol's text form; methods with their own prompts override."""
        if protocol.text_format == "fashioniq":
            from cirlab.data.benchmarks.fashioniq import join_captions_eval
            return [join_captions_eval(t[0], t[1]) for t in texts]
        return [t[0] for t in texts]

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        """Raw query features from raw reference features and each query's texts."""
        raise NotImplementedError(f"{type(self).__name__} must define query_features")

    # ----------------------------------------------------------------- the image tower
    def ensure_image_tower(self) -> None:
        """Load the image tower a text-only run (LinCIR) left out, frozen, from `backbone.pretrained`."""
        if getattr(self.backbone.model, "visual", None) is not None:
            return
        from cirlab.models.backbone import Backbone
        from cirlab.models.loading import quiet_random_init

        embedded = getattr(self, "_embedded_image_tower", None)  # a checkpoint that carries it (checkpointing.py)
        if embedded is not None:
            with quiet_random_init():  # the checkpoint's weights replace the random ones at once
                fresh = Backbone(self.backbone_cfg.model_name, None)
            fresh.model.visual.load_state_dict(embedded)
        elif not self.backbone_cfg.pretrained:
            raise CirlabError(f"{type(self).__name__} was trained without its image tower and from random "
                              "weights, so no image tower can be rebuilt to rank images",
                              "train from a pretrained backbone (backbone.pretrained)")
        else:
            fresh = Backbone(self.backbone_cfg.model_name, self.backbone_cfg.pretrained)
        visual = fresh.model.visual.to(self.device)
        visual.requires_grad_(False)
        visual.eval()
        self.backbone.model.visual = visual
        # the transform sizes come from the image tower's preprocessing config
        for attr in ("preprocess_cfg", "image_size"):
            if hasattr(fresh, attr):
                setattr(self.backbone, attr, getattr(fresh, attr))

    def prepare_for_evaluation(self) -> None:
        self.ensure_image_tower()

    def before_transforms(self, stage: str, dm: Any) -> None:
        if self._stage_sets(stage, dm):
            self.ensure_image_tower()

    # ----------------------------------------------------------------- evaluation
    @staticmethod
    def _stage_sets(stage: str, dm: Any) -> list:
        if dm is None or not hasattr(dm, "eval_sets"):
            return []
        return dm.eval_sets("test" if stage == "test" else "val")

    def configure_metrics(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self.evaluators: dict[str, RetrievalEvaluator] = getattr(self, "evaluators", {})
        for key in (("test",) if stage == "test" else ("val",)):
            sets = self._stage_sets(key, dm)
            if sets and key not in self.evaluators:
                self.evaluators[key] = RetrievalEvaluator(sets, self.eval_cfg.top_k, self.eval_cfg.query_chunk,
                                                          self.eval_cfg.gallery_chunk, self.eval_cfg.batch_size)
            if key in self.evaluators:
                self._tell_datamodule(key, dm)

    def _tell_datamodule(self, key: str, dm: Any) -> None:
        """Which galleries the loaders must stream: a kept (frozen) gallery is not even opened again.
        Said before the loaders start, since Lightning fetches a batch ahead of the epoch hooks."""
        ev = self.evaluators[key]
        if sharing_galleries() and self.gallery_frozen() and any(ev.needs_gallery(i) for i in range(len(ev.sets))):
            encoder = self.gallery_key(dm)
            for i, es in enumerate(ev.sets):
                ev.adopt_shared(i, f"{Path(es.root).resolve()}|{encoder}")
        if hasattr(dm, "set_gallery_needed"):
            for i in range(len(ev.sets)):
                dm.set_gallery_needed(key, i, ev.needs_gallery(i))

    def gallery_key(self, dm: Any = None) -> str:
        """What this task's gallery features depend on, as a sha1: the method's `gallery_features`,
        the weights of `gallery_modules()`, the evaluation transform and the trainer's precision.
        Two tasks with the same key encode every gallery image to the same feature."""
        import hashlib

        from cirlab.models.backbone import hash_state
        from cirlab.train.feature_cache import transform_key

        fn = type(self).gallery_features
        h = hashlib.sha1(f"{fn.__module__}.{fn.__qualname__}".encode())
        h.update(transform_key(getattr(dm, "eval_transform", None)).encode())
        h.update(str(self.trainer.precision if self._trainer is not None else "").encode())
        for m in self.gallery_modules():
            hash_state(h, m.state_dict())
        return h.hexdigest()

    def gallery_frozen(self) -> bool:
        return not any(p.requires_grad for m in self.gallery_modules() for p in m.parameters())

    def _evaluator(self, stage: str) -> RetrievalEvaluator:
        ev = getattr(self, "evaluators", {}).get(stage)
        if ev is None:
            raise CirlabError(f"{type(self).__name__} has no {stage} evaluation sets to evaluate on",
                              f"set data.init_args.{stage}_sets to evaluation-set folders")
        return ev

    def _eval_start(self, stage: str) -> None:
        if getattr(self.backbone.model, "visual", None) is None:
            self.ensure_image_tower()
        self._evaluator(stage).reset()

    def _eval_step(self, batch: dict[str, Any], dataloader_idx: int, stage: str) -> None:
        ev = self._evaluator(stage)
        if not ev.needs_gallery(dataloader_idx):
            return
        with torch.no_grad():
            ev.add_gallery(dataloader_idx, [str(i) for i in batch["id"]], self.gallery_features(batch["image"]))

    def _eval_end(self, stage: str) -> dict[str, dict[str, float]]:
        ev = self._evaluator(stage)
        trainer = self.trainer
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask
        out_dir = Path(self.eval_cfg.submission_dir) if self.eval_cfg.submission_dir else \
            Path(log_dir or ".") / "submissions"
        ctx = EvalContext(rank=trainer.global_rank, world_size=trainer.world_size,
                          sanity=trainer.sanity_checking, out_dir=out_dir, stage=stage)
        was_training = self.training
        self.eval()
        try:
            results = ev.finish(ctx, self.query_features, self.gallery_frozen(), self.device)
        finally:
            self.train(was_training)
        self._tell_datamodule(stage, getattr(trainer, "datamodule", None))
        if ctx.sanity:
            return {}
        from cirlab.models.text_context import cut_text_summaries

        for line in cut_text_summaries():
            log.warning("%s", line)
        flat = {f"{stage}/{n}/{k}": v for n, m in results.items() for k, v in m.items()}
        if ev.selection_score is not None:
            flat[f"{stage}/score"] = ev.selection_score
        if flat:  # the same values on every rank: no reduction
            self.log_dict(flat, sync_dist=False, rank_zero_only=False)
        self.last_results = results
        # results go to the run's log folder; a Trainer without a logger has none (no stray files)
        if trainer.is_global_zero and log_dir and trainer.logger is not None:
            save_results(results, Path(log_dir) / f"{stage}_results.json")
        return results

    @property
    def last_rankings(self) -> dict[str, dict[str, Any]]:
        """The latest evaluation's queries with their top-10 results, per set (for reports)."""
        out: dict[str, dict[str, Any]] = {}
        for ev in getattr(self, "evaluators", {}).values():
            for name, r in ev.last_rankings.items():
                out[name] = {"query_ids": r.qids, "ref_ids": r.ref_ids, "texts": r.texts,
                             "gt_ids": [g or [t] for g, t in zip(r.gt_ids, r.target_ids)],
                             "ranked": [x[:10] for x in r.ranked]}
        return out

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    def encoded_gallery_images(self, stage: str = "val") -> int:
        """Gallery images this rank encoded so far (evaluation split across ranks is measured with it)."""
        ev: Optional[RetrievalEvaluator] = getattr(self, "evaluators", {}).get(stage)
        return ev.encoded_images if ev is not None else 0
