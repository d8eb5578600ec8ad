"""Domain conversion (Pic2Word): a real ImageNet image plus a domain word -> the same class drawn in
that domain, in ImageNet-R. The reference's (google-research/composed_image_retrieval) layout::

    ROOT/imgnet/imgnet_real_query.txt   10,000 lines "imgnet/real/<wnid>/<file>.JPEG <class> "
    ROOT/imgnet/imgnet_targets.txt      16,983 lines "imgnet/<folder>/<wnid>/<file> <label> "
    ROOT/imgnet/real/<wnid>/...         the ImageNet validation images the query list names
    ROOT/imgnet/imagenet-r/<wnid>/...   ImageNet-R (github.com/hendrycks/imagenet-r), e.g. cartoon_2.jpg

The two list files ship with the reference repository (data/imgnet/); copy them beside the images
or pass their paths. Paths in them are relative to ROOT (ROOT may also be the imgnet folder itself).

Labels: a query's is its ImageNet class c; a target's is c + 1000 * domain with domains 0..3 =
cartoon, origami, toy, sculpture (ImageNet-R), and 6 for the 10,000 real images, which sit in the
gallery too (16,983 = 6,983 + 10,000) and are never a positive. Each query is asked once per domain
("a {domain} of *"): its positives are the targets labelled c + 1000 * domain, possibly none
(origami covers few classes). The reference's R@K is the fraction of a query's positives in its
top K, averaged over all 10,000 queries, those without positives counting 0
(`positive_recall_at_k`); the paper reports R@10 and R@50 per domain and their average.

Written: ``out/gallery`` once (the target list, in its order, label kept) and one evaluation set
per domain, ``out/eval/<domain>`` (its gallery index points at ``out/gallery``), protocol text form
"domain" (the query's one text is the domain word), group "imagenet-r" (the domains averaged).
Every query carries its reference image (the `query` kind), so the query shards hold each real
image once per domain.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from cirlab.data.benchmarks import ConversionReport, exists, image_bytes, write_eval
from cirlab.data.evalset import Protocol
from cirlab.data.shards import write_shards
from cirlab.errors import CirlabError

#: ImageNet-R domains in the reference's label order (label // 1000)
DOMAINS = ("cartoon", "origami", "toy", "sculpture")
#: label // 1000 of the real images in the target list: gallery distractors, never positives
REAL_DOMAIN = 6
QUERY_LIST = "imgnet_real_query.txt"
TARGET_LIST = "imgnet_targets.txt"
RECALL_KS = [10, 50]
GROUP = "imagenet-r"


def read_list(path: Path) -> list[tuple[str, int]]:
    """(image path, label) per line of a reference list file; a bad line names its file and number."""
    if not path.is_file():
        raise CirlabError(f"list file not found: {path}",
                          f"copy data/imgnet/{path.name} from google-research/composed_image_retrieval "
                          "beside the images, or pass its path")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise CirlabError(f"{path}:{n}: expected '<image path> <integer label>', got {line.strip()[:120]!r}",
                              "the reference's list files have one image and one label per line")
        rows.append((parts[0], int(parts[1])))
    return rows


def _base(root: Path) -> Path:
    """The folder the lists' paths ("imgnet/...") are relative to: ROOT, or ROOT's parent when ROOT is imgnet/."""
    if (root / "imgnet").is_dir():
        return root
    if root.name == "imgnet":
        return root.parent
    raise CirlabError(f"{root} holds no imgnet/ folder",
                      "--root must be the folder holding imgnet/ (real/, imagenet-r/ and the two list files)")


def positive_recall_at_k(ranked_ids: Sequence[Sequence[str]], gt_ids: Sequence[Sequence[str]],
                         ks: Sequence[int] = RECALL_KS) -> dict[int, float]:
    """The reference's domain-conversion R@K in percent: mean over queries of |top K ∩ positives| /
    |positives|; a query without positives counts 0 (the reference divides by |positives| + 1e-5)."""
    if len(ranked_ids) != len(gt_ids) or not ranked_ids:
        raise ValueError(f"need one ranking per query: {len(ranked_ids)} rankings, {len(gt_ids)} positive lists")
    out = {}
    for k in ks:
        total = 0.0
        for ranking, gt in zip(ranked_ids, gt_ids):
            if gt:
                wanted = set(gt)
                total += sum(r in wanted for r in ranking[:k]) / len(wanted)
        out[k] = 100.0 * total / len(ranked_ids)
    return out


def domain_protocol(domain: str) -> Protocol:
    """One domain's protocol: nothing excluded (the query's own real image stays in the gallery, as
    the reference ranks it), R@10/R@50, text form "domain", averaged with the other domains."""
    return Protocol(name=f"{GROUP}-{domain}", split="val", exclude_reference=False, recall_ks=list(RECALL_KS),
                    text_format="domain", group=GROUP)


def convert_imagenet_r(root: str | os.PathLike, out_dir: str | os.PathLike, domains: Sequence[str] = DOMAINS,
                       query_list: Optional[str | os.PathLike] = None,
                       target_list: Optional[str | os.PathLike] = None, maxcount: int = 1000) -> ConversionReport:
    """Write the gallery and one evaluation set per domain (see the module docstring)."""
    root, out = Path(root), Path(out_dir)
    bad = [d for d in domains if d not in DOMAINS]
    if bad or not domains:
        raise CirlabError(f"unknown domains {bad or list(domains)}", f"choose some of {', '.join(DOMAINS)}")
    base = _base(root)
    queries = read_list(Path(query_list) if query_list else base / "imgnet" / QUERY_LIST)
    targets = read_list(Path(target_list) if target_list else base / "imgnet" / TARGET_LIST)
    report = ConversionReport("imagenet-r", out)

    present: dict[str, Path] = {}
    for rel, _ in {**dict(queries), **dict(targets)}.items():
        p = base / rel
        if exists(p):
            present[rel] = p
        else:
            report.missing.append(str(p))
    for rel, label in queries:
        if not 0 <= label < 1000:
            raise CirlabError(f"query {rel} has label {label}", "query labels are ImageNet classes 0..999")
    positives: dict[int, list[str]] = defaultdict(list)  # target label -> gallery ids, in list order
    gallery_rows = []
    for rel, label in targets:
        if label // 1000 not in (*range(len(DOMAINS)), REAL_DOMAIN):
            raise CirlabError(f"target {rel} has label {label}",
                              "target labels are class + 1000 * domain (0-3 ImageNet-R, 6 real images)")
        if rel in present:
            gallery_rows.append((rel, label))
            positives[label].append(rel)
        else:
            report.skip("gallery image missing")

    def gallery() -> Iterator[dict[str, Any]]:
        for rel, label in gallery_rows:
            yield {"id": rel, "image": image_bytes(present[rel], "jpeg"), "label": label}

    shared = write_shards(gallery(), out / "gallery", "image", maxcount=maxcount, total=len(gallery_rows))
    report.written["gallery"] = shared.total
    gallery_ids = {rel for rel, _ in gallery_rows}

    for domain in domains:
        d = DOMAINS.index(domain)

        def domain_queries() -> Iterator[dict[str, Any]]:
            for rel, label in queries:
                if rel not in present:
                    report.skip(f"{domain} query: image missing")
                    continue
                if rel not in gallery_ids:
                    # the evaluation takes the reference feature from the gallery (the target list holds every query)
                    report.skip(f"{domain} query: image not in the target list's gallery")
                    continue
                gt = positives.get(label + 1000 * d, [])
                if not gt:
                    report.note(f"{domain} queries without positives (count 0, as in the reference)")
                yield {"id": f"{domain}:{rel}", "ref": image_bytes(present[rel], "jpeg"), "ref_id": rel,
                       "texts": [domain], "domain": domain, "label": label, "target_id": gt[0] if gt else None,
                       "gt_ids": list(gt)}

        es = write_eval(out / "eval" / domain, domain_protocol(domain), domain_queries(), shared, maxcount)
        report.written[f"eval/{domain}/queries"] = es.queries.total
    report.save()
    return report
