"""SEARLE's concept vocabulary and each image's most similar concepts (METHODS.md "SEARLE").

A concept's text feature is the normalised mean of the normalised features of 24 "a photo of a {}"
-style templates with the concept spaced (" {concept} "); an image's concepts are the top-k by cosine
to its normalised image feature (target-pad preprocessing, as the reference). The per-image lists are
stored beside the image shards, one JSONL file per image shard (``<shard stem>.jsonl``: {"id",
"concepts"}), so the job shards over ranks by image shard and a rerun skips finished shards.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

#: The 24 templates the reference ensembles over (PALAVRA's); "{}" receives " {concept} ".
CONCEPT_TEMPLATES: tuple[str, ...] = (
    "This is a photo of a {}", "This photo contains a {}", "A photo of a {}",
    "This is an illustration of a {}", "This illustration contains a {}", "An illustrations of a {}",
    "This is a sketch of a {}", "This sketch contains a {}", "A sketch of a {}",
    "This is a diagram of a {}", "This diagram contains a {}", "A diagram of a {}",
    "A {}", "We see a {}", "{}", "We see a {} in this photo", "We see a {} in this image",
    "We see a {} in this illustration", "We see a {} photo", "We see a {} image",
    "We see a {} illustration", "{} photo", "{} image", "{} illustration",
)
META_NAME = "concepts.json"
DEFAULT_K = 250


# ----------------------------------------------------------------------------- vocabulary
def synthetic_vocabulary(held_out: Optional[Iterable[Sequence[str]]] = None) -> list[str]:
    """The synthetic world's concepts: its shapes, colours and (colour, shape) pairs, minus held-out pairs."""
    from cirlab.data.synthetic import COLOURS, HELD_OUT, SHAPES

    held = {tuple(c) for c in (HELD_OUT if held_out is None else held_out)}
    combos = [f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in held]
    return list(SHAPES) + list(COLOURS) + combos


def load_vocabulary(source: str | os.PathLike | Sequence[str]) -> list[str]:
    """Concept names from "synthetic", a list, a .csv (column DisplayName, e.g. Open Images'
    oidv7-class-descriptions.csv, else the only column), a .txt (one per line) or a .json list.
    Names are stripped; repeats keep their first place."""
    if not isinstance(source, (str, os.PathLike)):
        names = [str(n) for n in source]
    elif str(source) == "synthetic":
        names = synthetic_vocabulary()
    else:
        path = Path(source)
        if not path.is_file():
            raise CirlabError(f"concept vocabulary {path} does not exist",
                              "give a .csv/.txt/.json file of concept names, or 'synthetic'")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            with path.open(encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
            if not rows:
                raise CirlabError(f"concept vocabulary {path} is empty")
            header = [h.strip() for h in rows[0]]
            if "DisplayName" in header:
                col = header.index("DisplayName")
            elif len(header) == 1:
                col = 0
            else:
                raise CirlabError(f"concept vocabulary {path} has columns {header} but no 'DisplayName'",
                                  "name the column of concept names DisplayName, or give one column")
            names = [r[col] for r in rows[1:] if len(r) > col]
        elif suffix == ".json":
            names = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(names, list):
                raise CirlabError(f"concept vocabulary {path} holds a JSON {type(names).__name__}",
                                  "write a JSON list of concept names")
        else:
            names = path.read_text(encoding="utf-8").splitlines()
    out = list(dict.fromkeys(str(n).strip() for n in names if str(n).strip()))
    if not out:
        raise CirlabError(f"concept vocabulary {source!r} holds no concept names")
    return out


# ----------------------------------------------------------------------------- features and ranking
@torch.no_grad()
def concept_text_features(encode_text: Callable[[list[str]], torch.Tensor], concepts: Sequence[str],
                          templates: Sequence[str] = CONCEPT_TEMPLATES, progress: bool = False,
                          concepts_per_pass: int = 16) -> torch.Tensor:
    """(C, D) normalised concept features: normalise(mean_t normalise(text(template_t(" c "))))."""
    from tqdm.auto import tqdm

    feats = []
    nt = len(templates)
    bar = tqdm(total=len(concepts), desc="concept features", unit="concept", disable=not progress, mininterval=2.0)
    for s in range(0, len(concepts), concepts_per_pass):  # several concepts' templates per forward pass
        chunk = concepts[s:s + concepts_per_pass]
        f = F.normalize(encode_text([t.format(f" {c} ") for c in chunk for t in templates]).float(), dim=-1)
        feats.append(F.normalize(f.view(len(chunk), nt, -1).mean(dim=1), dim=-1))
        bar.update(len(chunk))
    bar.close()
    return torch.cat(feats)


def top_k_concepts(image_features: torch.Tensor, concept_features: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) indices of each image's k most similar concepts, best first (cosine to the normalised image)."""
    sims = F.normalize(image_features.float(), dim=-1) @ concept_features.float().T
    return sims.topk(min(k, concept_features.shape[0]), dim=1).indices


# ----------------------------------------------------------------------------- sharding helpers
def rank_world(rank: Optional[int] = None, world_size: Optional[int] = None) -> tuple[int, int]:
    """(rank, world size): the given ones, else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        rank = 0 if rank is None else rank
        world_size = 1 if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise CirlabError(f"rank {rank} is outside world_size {world_size}", "give 0 <= rank < world_size")
    return int(rank), int(world_size)


def my_shards(images: str | os.PathLike, rank: int, world_size: int) -> tuple[list[str], list[int], list[str]]:
    """(urls, counts, stems) of the image shards this rank owns: shard i goes to rank i % world_size."""
    from cirlab.data.shards import read_index

    try:
        index = read_index(images)
    except FileNotFoundError as e:
        raise CirlabError(str(e), "point at an image shard folder written by cirlab") from None
    if index.kind != "image":
        raise CirlabError(f"{images} holds {index.kind!r} shards, not image shards",
                          "give a folder of kind 'image' (e.g. the synthetic world's images/)")
    picked = [i for i in range(len(index.shards)) if i % world_size == rank]
    return ([index.urls[i] for i in picked], [index.counts[i] for i in picked],
            [Path(index.shards[i]).name.split(".")[0] for i in picked])


def shard_batches(url: str, transform: Callable, batch_size: int) -> Iterator[dict[str, Any]]:
    """One shard's images in order, batched (ids and transformed images); undecodable samples are
    logged and skipped by the stream."""
    from cirlab.data.streaming import ShardStream

    stream = ShardStream(url, "image", transform=transform, resampled=False, shuffle=False, shuffle_buffer=0,
                         batch_size=batch_size, rank=0, world_size=1, equal_steps=False)
    for batch in stream:
        batch.pop("__stream__", None)
        yield batch


def write_atomic(path: Path, text: str) -> None:
    """Write a text file so that a killed job leaves either the old file or the whole new one."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # ranks writing the same file never share a tmp
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the batch job
def _build_backbone(model_name: str, pretrained: Optional[str], device: str):
    from cirlab.models import Backbone

    return Backbone(model_name, pretrained).to(device).eval()


def compute_concepts(images: str, vocabulary: str = "synthetic", out: Optional[str] = None,
                     model_name: str = "ViT-B-32-quickgelu", pretrained: Optional[str] = "openai", k: int = DEFAULT_K,
                     batch_size: int = 32, image_transform: str = "targetpad", device: str = "cpu",
                     rank: Optional[int] = None, world_size: Optional[int] = None, backbone: Any = None,
                     progress: bool = True) -> dict[str, Any]:
    """Each image's top-k concepts (cosine of the image to the concept features), written as
    ``out/<shard stem>.jsonl`` for the image shards this rank owns (default out: ``<images>/concepts``).
    Shards already written are skipped. Returns {"written": [...], "skipped": [...], "out": folder}."""
    from tqdm.auto import tqdm

    rank, world_size = rank_world(rank, world_size)
    if k < 1:
        raise CirlabError(f"k={k}: the number of concepts per image must be >= 1")
    names = load_vocabulary(vocabulary)
    out_dir = Path(out) if out else Path(images) / "concepts"
    out_dir.mkdir(parents=True, exist_ok=True)
    urls, counts, stems = my_shards(images, rank, world_size)
    todo = [i for i, s in enumerate(stems) if not (out_dir / f"{s}.jsonl").is_file()]
    result = {"written": [stems[i] for i in todo], "skipped": [s for i, s in enumerate(stems) if i not in todo],
              "out": out_dir}
    if k > len(names):
        log.warning("concepts: k=%d but the vocabulary has %d concepts: every image gets all %d, ranked",
                    k, len(names), len(names))
    if not todo:
        return result
    model = backbone if backbone is not None else _build_backbone(model_name, pretrained, device)
    dev = next(model.parameters()).device

    def encode_text(texts: list[str]) -> torch.Tensor:
        return model.encode_text(model.tokenize(texts).to(dev))

    meta = {"vocabulary": names, "k": min(k, len(names)), "templates": list(CONCEPT_TEMPLATES),
            "fingerprint": model.fingerprint(), "image_transform": image_transform}
    old = out_dir / META_NAME
    if old.is_file():
        prev = json.loads(old.read_text())
        if {n: prev.get(n) for n in ("vocabulary", "k", "fingerprint")} != \
                {n: meta[n] for n in ("vocabulary", "k", "fingerprint")}:
            raise CirlabError(f"{out_dir} holds concepts of another vocabulary, k or backbone",
                              "write to a new --out folder, or delete the old one")
    concept_feats = concept_text_features(encode_text, names, progress=progress and rank == 0)
    tf = model.transform(image_transform, train=False)
    bar = tqdm(total=sum(counts[i] for i in todo), desc=f"concepts (rank {rank})", unit="image",
               disable=not progress, mininterval=2.0)
    with torch.no_grad():
        for i in todo:
            lines = []
            for batch in shard_batches(urls[i], tf, batch_size):
                idx = top_k_concepts(model.encode_image(batch["image"].to(dev)), concept_feats.to(dev), k).cpu()
                for img_id, row in zip(batch["id"], idx.tolist()):
                    lines.append(json.dumps({"id": img_id, "concepts": [names[j] for j in row]}))
                bar.update(len(batch["id"]))
            write_atomic(out_dir / f"{stems[i]}.jsonl", "\n".join(lines) + ("\n" if lines else ""))
    bar.close()
    if rank == 0 or not old.is_file():
        write_atomic(old, json.dumps(meta, indent=1))
    return result


def load_image_concepts(folder: str | os.PathLike) -> dict[str, list[str]]:
    """image id -> its concepts, best first, from every ``*.jsonl`` written by compute_concepts."""
    root = Path(folder)
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise CirlabError(f"no image concepts in {root}", "run compute_concepts (cirlab searle concepts) first")
    out: dict[str, list[str]] = {}
    for path in files:
        with path.open(encoding="utf-8") as f:
            for no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                        out[str(row["id"])] = list(row["concepts"])
                    except (ValueError, KeyError, TypeError) as e:
                        raise CirlabError(f"{path}, line {no}: not a concepts row ({e})",
                                          "delete the file and rerun compute_concepts") from None
    return out
