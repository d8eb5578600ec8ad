"""The one base task every method derives from (TorchGeo's BaseTask pattern).

It owns what the methods share: building the backbone from the recipe, the optimizer and
schedule, keeping a frozen backbone in eval mode, exporting weights, and evaluation (gallery and
query features -> ranking -> the benchmark's metrics). A method defines how it trains
(`training_step`) and how it turns (reference feature, text) into a query feature
(`query_features`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from cirlab.data.evalset import Protocol
from cirlab.models.backbone import Backbone
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.evaluation import (GalleryIndex, QueryLog, group_average, protocol_score, save_results,
                                     score_queries, write_submission)
from cirlab.train.optim import build_optimizer, lr_lambda

log = logging.getLogger(__name__)


def build_backbone(cfg: BackboneConfig, load_image_tower: bool = True) -> Backbone:
    """A Backbone from its recipe section."""
    lora = asdict(cfg.lora) if cfg.lora is not None else None
    return Backbone(cfg.model_name, cfg.pretrained, load_image_tower=load_image_tower,
                    freeze_image=cfg.freeze_image, freeze_text=cfg.freeze_text,
                    grad_checkpointing=cfg.grad_checkpointing, lora=lora)


def exported_backbone(export_dir: str | Path) -> str:
    """The `pretrained` value for a run's exported backbone: its weights file, or the source that
    `backbone.json` names when the backbone was frozen."""
    out = Path(export_dir)
    if (out / "backbone.safetensors").is_file():
        return str(out / "backbone.safetensors")
    if (out / "backbone.json").is_file():
        return json.loads((out / "backbone.json").read_text())["pretrained"]
    raise FileNotFoundError(f"no backbone.safetensors or backbone.json in {out}: is it a run's export folder?")


class BaseTask(L.LightningModule):
    """Shared parts of every cirlab task; subclasses override the configure_* hooks and training_step.

    Recipe sections left out (None) take the method's reference defaults (`default_*` below).
    """

    #: keep the backbone in eval mode while training (frozen BatchNorm statistics, no dropout)
    backbone_eval_mode: bool = False
    #: whether evaluation needs the image tower (False lets text-only training skip loading it)
    needs_image_tower: bool = True
    #: constructor arguments a checkpoint is reloaded with for evaluation and retrieval
    #: (LinCIR trains without an image tower but ranks images with one)
    evaluation_overrides: ClassVar[dict[str, Any]] = {}

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig()

    def default_scheduler(self) -> SchedulerConfig:
        return SchedulerConfig()

    def default_backbone(self) -> BackboneConfig:
        return BackboneConfig()

    def __init__(self, backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        super().__init__()
        self.backbone_cfg = backbone or self.default_backbone()
        self.optimizer_cfg = optimizer or self.default_optimizer()
        self.scheduler_cfg = scheduler or self.default_scheduler()
        self.eval_cfg = evaluation or EvalConfig()
        self.save_hyperparameters()
        self.configure_models()
        self.last_results: dict[str, dict[str, float]] = {}
        self.last_rankings: dict[str, dict[str, Any]] = {}
        self._gallery_cache: dict[str, GalleryIndex] = {}

    # ----------------------------------------------------------------- hooks for the methods
    def configure_models(self) -> None:
        """Build the networks. The default builds the backbone only."""
        self.backbone = build_backbone(self.backbone_cfg, load_image_tower=self.needs_image_tower)

    def image_transform(self, train: bool):
        """The transform images go through; the recipe picks clip / targetpad / squarepad."""
        kw = {}
        if train and self.backbone_cfg.train_scale is not None:
            kw["train_scale"] = tuple(self.backbone_cfg.train_scale)
        return self.backbone.transform(self.backbone_cfg.image_transform, train=train, **kw)

    def gallery_features(self, images: torch.Tensor) -> torch.Tensor:
        """Raw features of gallery images (normalised later for ranking)."""
        return self.backbone.encode_image(images)

    def query_texts(self, texts: list[list[str]], protocol: Protocol) -> list[str]:
        """One text per query from the benchmark's caption list; methods with other joins override."""
        if protocol.text_format == "fashioniq":
            from cirlab.data.benchmarks.fashioniq import join_captions_eval
            return [join_captions_eval(t[0], t[1]) for t in texts]
        return [t[0] for t in texts]

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        """Raw query features from raw reference features and each query's texts."""
        raise NotImplementedError

    def export_modules(self) -> dict[str, nn.Module]:
        """Modules written as safetensors at the end of fit (besides the backbone)."""
        return {}

    def _image_parameters(self) -> list[nn.Parameter]:
        return self.backbone.image_parameters()

    def trainable_backbone(self) -> bool:
        return any(p.requires_grad for p in self.backbone.parameters())

    def setup(self, stage: str) -> None:
        """Hand the data module this model's image transforms, then let the method adjust it."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            if hasattr(dm, "set_transforms"):
                dm.set_transforms(self.image_transform(train=True), self.image_transform(train=False))
            self.configure_datamodule(dm)

    def configure_datamodule(self, dm: Any) -> None:
        """Method hook: e.g. stage 2 turns off image decoding for training batches."""

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self) -> Any:
        opt = build_optimizer(self.named_parameters(), self.optimizer_cfg)
        total = self.scheduler_cfg.total_steps
        if total is None:
            try:
                total = int(self.trainer.estimated_stepping_batches)
            except Exception:  # no trainer (unit use) or an infinite loader
                total = 1
            if total <= 0 or total > 10**12:
                total = 1
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.scheduler_cfg, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.backbone_eval_mode:
            self.backbone.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Lightning restores saved per-module modes after validation (bypassing train()): re-assert
        if self.backbone_eval_mode and self.backbone.training:
            self.backbone.eval()

    # ----------------------------------------------------------------- evaluation
    def _eval_sets(self, stage: str):
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "eval_sets"):
            raise RuntimeError("evaluation needs a data module with evaluation sets (cirlab.data.retrieval.RetrievalDataModule with val_sets/test_sets)")
        return dm.eval_sets(stage)

    def _eval_start(self) -> None:
        if getattr(self.backbone.model, "visual", None) is None:
            fix = ", ".join(f"--model.init_args.{k}={str(v).lower()}" for k, v in self.evaluation_overrides.items())
            raise ValueError(f"{type(self).__name__} was built without its image tower, which evaluation needs to "
                             f"encode the gallery: add {fix or 'the image tower'} to the command "
                             "(`cirlab test --ckpt_path`, `cirlab evaluate` and `cirlab retrieve` do this themselves)")
        self._galleries: dict[int, GalleryIndex] = {}
        self._queries: dict[int, QueryLog] = {}

    def _eval_step(self, batch: dict[str, Any], dataloader_idx: int, stage: str) -> None:
        sets = self._eval_sets(stage)
        set_i, part = divmod(dataloader_idx, 2)
        es = sets[set_i]
        if part == 0:  # gallery batches come first (loaders run in order)
            cached = self._gallery_cache.get(str(es.root))
            if cached is not None:
                self._galleries[set_i] = cached
                return
            gal = self._galleries.setdefault(set_i, GalleryIndex())
            with torch.no_grad():
                gal.add(list(batch["id"]), self.gallery_features(batch["image"]))
            return
        gal = self._galleries.get(set_i)
        if gal is None:
            raise RuntimeError(f"queries of {es.root} arrived before its gallery")
        ref = gal.lookup(list(batch["ref_id"])).to(self.device)
        with torch.no_grad():
            feats = self.query_features(ref, list(batch["texts"]), es.protocol)
        self._queries.setdefault(set_i, QueryLog.for_protocol(es.protocol)).add(batch, feats)

    def _eval_end(self, stage: str) -> dict[str, dict[str, float]]:
        if self.trainer.sanity_checking:
            return {}
        sets = self._eval_sets(stage)
        results: dict[str, dict[str, float]] = {}
        protocols: dict[str, Protocol] = {}
        image_frozen = not any(p.requires_grad for p in self._image_parameters())
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        for i, es in enumerate(sets):
            name = es.protocol.name if es.protocol.name not in results else f"{es.protocol.name}-{i}"
            gal, qs = self._galleries.get(i), self._queries.get(i)
            if gal is None or qs is None:
                continue
            if image_frozen:  # a frozen image tower gives the same gallery every time: encode once
                self._gallery_cache[str(es.root)] = gal
                dm = self.trainer.datamodule
                if hasattr(dm, "skip_gallery_pixels"):
                    dm.skip_gallery_pixels(str(es.root))  # later passes need the ids only
            metrics, ranked = score_queries(es.protocol, gal, qs, self.eval_cfg.top_k,
                                            self.eval_cfg.query_chunk, self.eval_cfg.gallery_chunk)
            if not es.protocol.has_targets or stage == "test":
                out_dir = self.eval_cfg.submission_dir or Path(log_dir or ".") / "submissions"
                for p in write_submission(es.protocol, gal, qs, ranked, out_dir):
                    log.info("wrote test-server file %s", p)
            self.last_rankings[name] = {"query_ids": qs.qids, "ref_ids": qs.ref_ids, "texts": qs.texts,
                                        "gt_ids": [g_ or [t] for g_, t in zip(qs.gt_ids, qs.target_ids)],
                                        "ranked": [r[:10] for r in ranked]}
            if metrics:
                metrics["score"] = protocol_score(es.protocol, metrics)
                results[name] = metrics
                protocols[name] = es.protocol
        for group, avg in group_average(results, protocols).items():
            results[group] = avg
        # the selection score: mean over benchmarks (a group such as FashionIQ counts once)
        top = [m["score"] for n, m in results.items()
               if "score" in m and (n not in protocols or protocols[n].group is None)]
        flat = {f"{stage}/{n}/{k}": v for n, m in results.items() for k, v in m.items()}
        if top:
            flat[f"{stage}/score"] = sum(top) / len(top)
        if flat:
            self.log_dict(flat, sync_dist=False, rank_zero_only=False)
        self.last_results = results
        # results go to the run's log folder; a Trainer without a logger has none (no stray files)
        if self.trainer.is_global_zero and log_dir and self.trainer.logger is not None:
            save_results(results, Path(log_dir) / f"{stage}_results.json")
        return results

    def on_validation_epoch_start(self) -> None:
        self._eval_start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen backbone is rebuilt from `backbone.pretrained`: keep it out of checkpoints
        (a LinCIR bigG checkpoint is then phi's few MB, not the tower's 10 GB). A randomly initialised
        one cannot be rebuilt, so it stays in."""
        checkpoint["cirlab_task"] = f"{type(self).__module__}.{type(self).__qualname__}"
        # what LightningCLI writes itself; `cirlab test --ckpt_path` then reads checkpoints of Python-made runs too
        checkpoint.setdefault("hyper_parameters", {}).setdefault("_class_path", checkpoint["cirlab_task"])
        if not self.trainable_backbone() and self.backbone_cfg.pretrained:
            sd = checkpoint["state_dict"]
            for k in [k for k in sd if k.startswith("backbone.")]:
                del sd[k]
            checkpoint["cirlab_backbone_omitted"] = True
        checkpoint["cirlab_image_tower_absent"] = getattr(self.backbone.model, "visual", None) is None

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        sd = checkpoint["state_dict"]
        if checkpoint.get("cirlab_backbone_omitted"):
            for k, v in self.backbone.state_dict(prefix="backbone.").items():
                sd.setdefault(k, v)
        elif checkpoint.get("cirlab_image_tower_absent"):
            # trained without an image tower (LinCIR), reloaded with one: the tower comes from `pretrained`
            for k, v in self.backbone.model.state_dict(prefix="backbone.model.").items():
                if k.startswith("backbone.model.visual."):
                    sd.setdefault(k, v)

    # ----------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        ckpt_cb = getattr(self.trainer, "checkpoint_callback", None)
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
        if best and Path(best).is_file():
            # Export the selected model (the benchmark's best score), not the last epoch.
            ckpt = torch.load(best, map_location="cpu", weights_only=True)
            self.on_load_checkpoint(ckpt)  # puts back an omitted frozen backbone
            self.load_state_dict(ckpt["state_dict"])
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank must ask
        # exports live in the run's log folder; with no logger there is no run folder: call export()
        if self.trainer.is_global_zero and log_dir and self.trainer.logger is not None:
            self.export(Path(log_dir) / "export")

    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """Write the method's modules as safetensors, and the backbone: its weights (open_clip state
        dict) when training changed them, else `backbone.json` naming the unchanged source."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = {}
        states = {n: m.state_dict() for n, m in self.export_modules().items()}
        source = self.backbone_cfg.pretrained
        if self.trainable_backbone() or not source:
            # open_clip's own key names (LoRA folded in), so pretrained=<file> loads it
            states["backbone"] = self.backbone.merged_state_dict()
        else:
            # frozen: a copy would only repeat `pretrained` (GBs for ViT-bigG; text-only for LinCIR)
            if Path(source).is_file():
                source = str(Path(source).resolve())
            path = out / "backbone.json"
            path.write_text(json.dumps({"model_name": self.backbone_cfg.model_name, "pretrained": source,
                                        "frozen": True}, indent=2) + "\n")
            written["backbone"] = path
        for name, sd in states.items():
            state = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
            path = out / f"{name}.safetensors"
            save_file(state, str(path))
            written[name] = path
        return written

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)
