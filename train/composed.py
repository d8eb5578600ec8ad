"""The composed-retrieval task family: Combiner, Pic2Word, SEARLE, LinCIR.

A method in this family says how it trains (`training_step`) and how it turns a (reference
feature, query texts) pair into a query feature (`query_features`); the family owns evaluation
(gallery and query features -> one ranking -> the protocol's metrics).
"""

from __future__ import annotations

from cirlab.train.base import BaseTask


class ComposedRetrievalTask(BaseTask):
    """Base of every composed-retrieval method (the evaluation is shared, see train/evaluation.py)."""
