"""The conditional-embedding task family (FocalLens): image + instruction -> one embedding.

A method in this family says how it encodes an image under an instruction (`encode_instruction`
once per distinct instruction, then `conditional_features` for a batch of images) and how it encodes
answer texts (`text_features`); the family evaluates on conditional retrieval sets through the
conditional evaluation component (train/conditional_eval.py `ConditionalEvaluator`, made in
`configure_metrics`) at the end of every `eval_every_n_epochs`-th training epoch, logging
``val/<set>/<metric>``, and offers the unconditional CLIP baseline on the same sets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from cirlab.train.base import BaseTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.conditional_eval import ConditionalEvaluator, ConditionalSet


class ConditionalEmbeddingTask(BaseTask):
    """Base of conditional-embedding methods; `eval_sets` are conditional set folders (see above)."""

    def __init__(self, eval_sets: Optional[list[str]] = None, eval_every_n_epochs: int = 1,
                 backbone: Optional[BackboneConfig] = None, optimizer: Optional[OptimizerConfig] = None,
                 scheduler: Optional[SchedulerConfig] = None, evaluation: Optional[EvalConfig] = None) -> None:
        if eval_every_n_epochs < 1:
            raise ValueError(f"eval_every_n_epochs must be >= 1, got {eval_every_n_epochs}")
        self.eval_sets = list(eval_sets or [])
        self.eval_every_n_epochs = eval_every_n_epochs
        self._conditional_evaluator: Optional[ConditionalEvaluator] = None
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
    def configure_metrics(self, stage: str) -> None:
        """The conditional evaluation component over `eval_sets` (kept across stages: sets read once)."""
        self.conditional_evaluator()

    def conditional_evaluator(self) -> ConditionalEvaluator:
        """The component (made on first use outside a Trainer too: evaluation of a loaded model)."""
        if getattr(self, "_conditional_evaluator", None) is None:
            self._conditional_evaluator = ConditionalEvaluator(self.eval_sets, self.image_transform(train=False),
                                                               self.eval_cfg.batch_size)
        return self._conditional_evaluator

    def conditional_set(self, path: str) -> ConditionalSet:
        """The set at `path` in memory, with this model's evaluation transform (read once)."""
        return self.conditional_evaluator().conditional_set(path)

    def evaluate_conditional_sets(self, paths: Optional[list[str]] = None, baseline: bool = False
                                  ) -> dict[str, dict[str, float]]:
        """{set name: metrics} for this model (and with baseline=True, '<name>/baseline' for plain CLIP)."""
        was_training = self.training
        self.eval()
        try:
            return self.conditional_evaluator().evaluate(self, self.device, self.backbone if baseline else None,
                                                         paths)
        finally:
            self.train(was_training)

    def on_train_epoch_end(self) -> None:
        if not self.eval_sets or (self.current_epoch + 1) % self.eval_every_n_epochs:
            return
        results = self.evaluate_conditional_sets()
        self.last_results = results
        flat = {f"val/{n}/{k}": v for n, m in results.items() for k, v in m.items() if not k.startswith("chance")}
        if flat:
            self.log_dict(flat, sync_dist=False, rank_zero_only=False)
