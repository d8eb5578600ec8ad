"""Official test-server submission files for CIRR (recall, recall_subset) and CIRCO.

A protocol names its format (`Protocol.submission`); `SUBMISSION_FORMATS` maps that name to a writer,
so a new benchmark with a server adds one writer here and names it in its protocol.json.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["write_cirr_submission", "write_circo_submission", "SUBMISSION_FORMATS", "SubmissionFormat"]

CIRR_TOP = 50
CIRR_SUBSET_TOP = 3
CIRCO_TOP = 50


def _check_same_length(keys: Sequence, lists: Sequence, key_name: str, list_name: str) -> None:
    """Reject empty inputs, per-query length mismatches and repeated query ids."""
    if len(keys) == 0:
        raise ValueError(f"{key_name} is empty; a submission needs every test query")
    if len(lists) != len(keys):
        raise ValueError(f"{key_name} has {len(keys)} entries but {list_name} has {len(lists)}; "
                         "pass one ranked list per query")
    if len({str(k) for k in keys}) != len(keys):
        raise ValueError(f"{key_name} repeats a query id; each query must appear once")


def _top_names(names: Sequence[str], n: int, what: str, query: object) -> list[str]:
    """The first n names of a ranking; error if it holds fewer."""
    names = [str(x) for x in names]
    if len(names) < n:
        raise ValueError(f"{what} for query {query} has {len(names)} names but the CIRR server "
                         f"needs the top {n}; rank at least {n} images")
    return names[:n]


def write_cirr_submission(pair_ids: Sequence[int | str], ranked_names: Sequence[Sequence[str]],
                          subset_ranked_names: Sequence[Sequence[str]], out_dir: str | Path,
                          split: str = "test1") -> tuple[Path, Path]:
    """Write CIRR's two json files (top-50 recall and top-3 recall_subset), keyed by pairid.

    Files: recall_submission_{split}.json and recall_subset_submission_{split}.json in out_dir.
    """
    _check_same_length(pair_ids, ranked_names, "pair_ids", "ranked_names")
    _check_same_length(pair_ids, subset_ranked_names, "pair_ids", "subset_ranked_names")
    recall: dict[str, object] = {"version": "rc2", "metric": "recall"}
    subset: dict[str, object] = {"version": "rc2", "metric": "recall_subset"}
    for pid, names, sub in zip(pair_ids, ranked_names, subset_ranked_names):
        recall[str(pid)] = _top_names(names, CIRR_TOP, "ranked_names", pid)
        subset[str(pid)] = _top_names(sub, CIRR_SUBSET_TOP, "subset_ranked_names", pid)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path_recall = out / f"recall_submission_{split}.json"
    path_subset = out / f"recall_subset_submission_{split}.json"
    path_recall.write_text(json.dumps(recall))
    path_subset.write_text(json.dumps(subset))
    return path_recall, path_subset


def _circo_id(x: int | str) -> int | str:
    """CIRCO image ids are COCO integers: write digit strings as ints, anything else unchanged."""
    if isinstance(x, str) and x.isascii() and x.isdigit():
        return int(x)
    return int(x) if isinstance(x, int) else x


def write_circo_submission(query_ids: Sequence[int | str], ranked_ids: Sequence[Sequence[int | str]],
                           path: str | Path) -> Path:
    """Write CIRCO's {"<query id>": [50 distinct image ids]} json; errors on repeats or short rankings."""
    _check_same_length(query_ids, ranked_ids, "query_ids", "ranked_ids")
    sub: dict[str, list] = {}
    for qid, ranking in zip(query_ids, ranked_ids):
        top = list(ranking[:CIRCO_TOP])
        if len(top) < CIRCO_TOP:
            raise ValueError(f"ranked_ids for CIRCO query {qid} has {len(top)} ids but the server needs "
                             f"{CIRCO_TOP}; rank at least {CIRCO_TOP} images")
        if len({str(x) for x in top}) != CIRCO_TOP:
            raise ValueError(f"ranked_ids for CIRCO query {qid} repeats an image id in its top "
                             f"{CIRCO_TOP}; the server needs {CIRCO_TOP} distinct ids")
        sub[str(qid)] = [_circo_id(x) for x in top]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sub))
    return path


@dataclass(frozen=True)
class SubmissionFormat:
    """A test server's file format: how many results it takes per query and the writer.

    ``write(query_ids, ranked, subset_ranked, out_dir, split)`` returns the files written;
    ``subset_top`` > 0 when the writer also needs each query's subset ranking (CIRR).
    """

    top: int
    subset_top: int
    write: Callable[..., list[Path]]


def _write_cirr(query_ids, ranked, subset_ranked, out_dir, split) -> list[Path]:
    return list(write_cirr_submission(query_ids, [r[:CIRR_TOP] for r in ranked], subset_ranked, out_dir, split=split))


def _write_circo(query_ids, ranked, subset_ranked, out_dir, split) -> list[Path]:
    return [write_circo_submission(query_ids, ranked, Path(out_dir) / f"circo_submission_{split}.json")]


SUBMISSION_FORMATS: dict[str, SubmissionFormat] = {
    "cirr": SubmissionFormat(CIRR_TOP, CIRR_SUBSET_TOP, _write_cirr),
    "circo": SubmissionFormat(CIRCO_TOP, 0, _write_circo),
}
