"""The domain-conversion benchmark (cirlab.data.benchmarks.imagenet_r) scored the reference's way,
for any composed-retrieval task: R@K = the fraction of a query's positives in its top K.

The shared evaluation scores hit-recall on one target (and cannot score a query without any
positive), so it cannot give this benchmark's published numbers; until its protocol can say
"recall over all positives", this module ranks the sets itself with the shared ranking.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from cirlab.data.benchmarks.imagenet_r import positive_recall_at_k
from cirlab.data.evalset import load_eval_set
from cirlab.data.streaming import ShardStream
from cirlab.errors import CirlabError
from cirlab.train.ranking import rank, ranked_ids


def _stream(root: Path, kind: str, batch_size: int, transform: Any = None, decode: bool = True) -> ShardStream:
    return ShardStream(root, kind, transform=transform, resampled=False, shuffle=False, shuffle_buffer=0,
                       batch_size=batch_size, rank=0, world_size=1, equal_steps=False, decode_images=decode)


@torch.no_grad()
def evaluate_domain_conversion(task: Any, set_dirs: Sequence[str | Path], batch_size: int = 128,
                               device: str = "cpu") -> dict[str, dict[str, float]]:
    """R@K per domain set and their mean (key = the protocols' group), in percent."""
    from tqdm.auto import tqdm

    task = task.to(device).eval()
    sets = [load_eval_set(d) for d in set_dirs]
    bad = [str(es.root) for es in sets if es.protocol.text_format != "domain"]
    if bad:
        raise CirlabError(f"not domain-conversion sets: {bad}", "pass the eval/<domain> folders that "
                          "cirlab.data.benchmarks.imagenet_r.convert_imagenet_r writes")
    tf = task.image_transform(train=False)
    galleries: dict[str, tuple[list[str], torch.Tensor]] = {}
    results: dict[str, dict[str, float]] = {}
    for es in sets:
        key = str(es.gallery.root.resolve())
        if key not in galleries:  # the domains share one gallery: encode it once
            ids, feats = [], []
            for b in tqdm(_stream(es.gallery.root, "image", batch_size, tf), desc=f"gallery {es.protocol.name}",
                          unit="batch"):
                ids.extend(str(i) for i in b["id"])
                feats.append(task.gallery_features(b["image"].to(device)).float().cpu())
            galleries[key] = (ids, torch.cat(feats))
        ids, gal = galleries[key]
        pos = {i: n for n, i in enumerate(ids)}
        q_feats, gts = [], []
        for b in tqdm(_stream(es.queries.root, "query", batch_size, decode=False), desc=es.protocol.name,
                      unit="batch"):
            missing = [r for r in b["ref_id"] if str(r) not in pos]
            if missing:
                raise CirlabError(f"reference image(s) {missing[:3]} are not in the gallery of {es.root}",
                                  "convert the benchmark again: its target list holds every query image")
            ref = gal[[pos[str(r)] for r in b["ref_id"]]].to(device)
            q_feats.append(task.query_features(ref, [list(t) for t in b["texts"]], es.protocol).float().cpu())
            gts.extend([list(g) for g in b["gt_ids"]])
        ks = es.protocol.recall_ks
        _, idx = rank(F.normalize(torch.cat(q_feats), dim=-1), F.normalize(gal, dim=-1), max(ks))
        results[es.protocol.name] = {f"R@{k}": v for k, v in
                                     positive_recall_at_k(ranked_ids(idx, ids), gts, ks).items()}
    groups: dict[str, list[dict[str, float]]] = {}
    for es in sets:
        if es.protocol.group:
            groups.setdefault(es.protocol.group, []).append(results[es.protocol.name])
    for group, members in groups.items():
        results[group] = {k: sum(m[k] for m in members) / len(members) for k in members[0]}
    return results
