"""The conditional-embedding task family (FocalLens): image + instruction -> one embedding.

A method in this family says how it encodes an image under an instruction (`encode_instruction`
once per distinct instruction, then `conditional_features` for a batch of images) and how it encodes
answer texts (`text_features`); the family evaluates on conditional retrieval sets
(train/conditional_eval.py) at the end of every `eval_every_n_epochs`-th training epoch, logging
``val/<set>/<metric>``, and offers the unconditional CLIP baseline on the same sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from cirlab.train.base import BaseTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.conditional_eval import ConditionalSet, UnconditionalBaseline, evaluate_conditional, load_conditional_set


class ConditionalEmbeddingTask(BaseTask):
    """Base of conditional-embedding methods; `eval_sets` are conditional set folders (see above)."""

    def __init__(self, eval_sets: Optional[list[str]] = None, eval_every_n_epochs: int = 1,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        if eval_every_n_epochs < 1:
            raise ValueError(f"eval_every_n_epochs must be >= 1, got {eval_every_n_epochs}")
        self.eval_sets = list(eval_sets or [])
        self.eval_every_n_epochs = eval_every_n_epochs
        self._loaded_sets: dict[str, ConditionalSet] = {}
        super().__init__(backbone, optimizer, scheduler, evaluation)

    # ----------------------------------------------------------------- the method's encoders
    def encode_instruction(self, instruction: str) -> Any:
        """Whatever `conditional_features` needs of one instruction, computed once per instruction."""
        raise NotImplementedError

    def conditional_features(self, images: torch.Tensor, instruction: Any) -> torch.Tensor:
        """Raw conditional features (B, D) of images under one encoded instruction."""
        raise NotImplementedError

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """Raw text features (B, D) of answers."""
        return self.backbone.encode_text(self.backbone.tokenize(texts).to(self.device))

    # ----------------------------------------------------------------- evaluation
    def conditional_set(self, path: str) -> ConditionalSet:
        """The set at `path` in memory, with this model's evaluation transform (read once)."""
        key = str(Path(path).resolve())
        if key not in self._loaded_sets:
            self._loaded_sets[key] = load_conditional_set(path, self.image_transform(train=False),
                                                          self.eval_cfg.batch_size)
        return self._loaded_sets[key]

    def evaluate_conditional_sets(self, paths: Optional[list[str]] = None, baseline: bool = False
                                  ) -> dict[str, dict[str, float]]:
        """{set name: metrics} for this model (and with baseline=True, '<name>/baseline' for plain CLIP)."""
        was_training = self.training
        self.eval()
        results: dict[str, dict[str, float]] = {}
        try:
            for i, path in enumerate(paths if paths is not None else self.eval_sets):
                cset = self.conditional_set(path)
                name = cset.name if cset.name not in results else f"{cset.name}-{i}"
                results[name] = evaluate_conditional(self, cset, self.eval_cfg.batch_size, self.device)
                if baseline:
                    results[f"{name}/baseline"] = evaluate_conditional(
                        UnconditionalBaseline(self.backbone), cset, self.eval_cfg.batch_size, self.device)
        finally:
            self.train(was_training)
        return results

    def on_train_epoch_end(self) -> None:
        if not self.eval_sets or (self.current_epoch + 1) % self.eval_every_n_epochs:
            return
        results = self.evaluate_conditional_sets()
        self.last_results = results
        flat = {f"val/{n}/{k}": v for n, m in results.items() for k, v in m.items() if not k.startswith("chance")}
        if flat:
            self.log_dict(flat, sync_dist=False, rank_zero_only=False)
