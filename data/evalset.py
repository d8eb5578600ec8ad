"""Evaluation sets on disk: query shards, gallery shards and the protocol that ranks them.

Layout::

    <dir>/protocol.json     Protocol fields (below)
    <dir>/queries/          query shards + index.json
    <dir>/gallery/          image shards + index.json (gallery order = write order)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from cirlab.errors import CirlabError
from cirlab.data.shards import ShardIndex, read_index, write_shards


@dataclass
class Protocol:
    """A benchmark's rules, stored as data in its protocol.json: which image is excluded from a
    ranking, which metrics, which of them form the selection score, how sets are averaged, the
    test-server format and the form of a query's texts. The shared evaluation reads these fields
    and nothing else: a new benchmark is a reader that writes a protocol, not new evaluation code.
    """

    name: str                       # e.g. "cirr", "fashioniq-dress", "circo", "synthetic"
    split: str = "val"
    exclude_reference: bool = False  # CIRR and the synthetic world remove the reference image
    recall_ks: list[int] = field(default_factory=lambda: [1, 5, 10, 50])
    subset_ks: list[int] = field(default_factory=list)   # CIRR: [1, 2, 3]
    map_ks: list[int] = field(default_factory=list)      # CIRCO: [5, 10, 25, 50]
    text_format: str = "plain"      # "plain" (one text) | "fashioniq" (two captions to join) |
    # "relative_clause" (one text written to follow "that": CIRCO) | "domain" (a domain word: ImageNet-R)
    group: str | None = None        # evaluation sets averaged together (FashionIQ categories)
    has_targets: bool = True        # test splits of CIRR/CIRCO have none: submission files only
    breakdown: list[str] = field(default_factory=list)  # query fields whose values get their own
    # recalls, e.g. the synthetic world's ["change", "composition"]: "change=colour/R@10"
    score_keys: list[str] | None = None  # metrics whose mean is the selection score (FashionIQ:
    # ["R@10", "R@50"]); None: every R@, Rs@ and mAP@ metric. A group's score uses the same keys.
    submission: str | None = None   # test-server format, a key of cirlab.data.submissions.SUBMISSION_FORMATS
    per_query_gallery: bool = False  # GeneCIS: each query ranks only its own `gallery` list of ids
    # (a query field; every id also lies in gallery/), never the whole gallery

    def selection_score(self, metrics: dict[str, float]) -> float:
        """The one number model selection maximises: the mean of `score_keys` (NaN if none present)."""
        if self.score_keys is not None:
            vals = [metrics[k] for k in self.score_keys if k in metrics]
        else:
            vals = [v for k, v in metrics.items() if k.startswith(("R@", "Rs@", "mAP@"))]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Protocol":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "score_keys" not in d and "submission" not in d:  # written before these fields existed
            known.update(_LEGACY_RULES.get(str(d.get("name", "")).split("-")[0], {}))
        return cls(**known)


# What protocol.json files written by cirlab 0.1 (before score_keys/submission) meant by their name;
# only read for such files: new ones carry the rules themselves.
_LEGACY_RULES: dict[str, dict[str, Any]] = {
    "fashioniq": {"score_keys": ["R@10", "R@50"]},
    "cirr": {"submission": "cirr"},
    "circo": {"submission": "circo", "text_format": "relative_clause"},
}


class EvalSetError(CirlabError, FileNotFoundError):
    """A folder that is not an evaluation set (a FileNotFoundError too)."""


@dataclass
class EvalSet:
    root: Path
    protocol: Protocol
    queries: ShardIndex
    gallery: ShardIndex


def write_eval_set(out_dir: str | os.PathLike, protocol: Protocol, queries: Iterable[dict[str, Any]],
                   gallery: Iterable[dict[str, Any]], maxcount: int = 1000) -> EvalSet:
    """Write query samples (kind "query") and gallery samples (kind "image") with the protocol."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = write_shards(gallery, out / "gallery", "image", maxcount=maxcount)
    q = write_shards(queries, out / "queries", "query", maxcount=maxcount)
    (out / "protocol.json").write_text(json.dumps(protocol.to_json(), indent=1))
    return EvalSet(out, protocol, q, g)


def load_eval_set(path: str | os.PathLike) -> EvalSet:
    """Open an evaluation set folder; fails with the path if it is not one."""
    root = Path(path)
    pfile = root / "protocol.json"
    if not pfile.is_file():
        raise EvalSetError(f"{root} is not an evaluation set (no protocol.json)",
                           "build one with `cirlab data convert --kind evalset`, a benchmark's `cirlab data` "
                           "command, or the synthetic world")
    protocol = Protocol.from_json(json.loads(pfile.read_text()))
    return EvalSet(root, protocol, read_index(root / "queries"), read_index(root / "gallery"))
