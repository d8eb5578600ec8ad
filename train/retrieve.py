"""`cirlab retrieve`: a trained checkpoint, a gallery folder, a query image and text -> the top-k images."""

from __future__ import annotations

import argparse
import base64
import html
import io
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: str | Path) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"gallery folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
    return files


@torch.no_grad()
def retrieve(task: Any, gallery: Sequence[Path], image: Path, text: str, k: int = 10,
             batch_size: int = 64) -> list[tuple[Path, float]]:
    """Rank the gallery images for (image, text) with the task's own query; best first."""
    from cirlab.data.evalset import Protocol
    from cirlab.train.ranking import rank

    task.eval()
    tf = task.image_transform(train=False)
    feats = []
    for s in range(0, len(gallery), batch_size):
        batch = torch.stack([tf(Image.open(p).convert("RGB")) for p in gallery[s:s + batch_size]])
        feats.append(task.gallery_features(batch.to(task.device)).float().cpu())
    g = torch.cat(feats)
    ref = task.gallery_features(tf(Image.open(image).convert("RGB"))[None].to(task.device))
    q = task.query_features(ref, [[text]], Protocol("custom", text_format="plain")).float().cpu()
    scores, idx = rank(F.normalize(q, dim=-1), F.normalize(g, dim=-1), min(k, len(gallery)))
    return [(gallery[i], float(s)) for s, i in zip(scores[0].tolist(), idx[0].tolist())]


def _thumb(path: Path, size: int = 160) -> str:
    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_html(out: Path, image: Path, text: str, results: list[tuple[Path, float]]) -> Path:
    cells = "".join(f"<figure style='display:inline-block;margin:4px'><img src='data:image/png;base64,{_thumb(p)}'>"
                    f"<figcaption>{i + 1}. {html.escape(p.name)}<br>{s:.3f}</figcaption></figure>"
                    for i, (p, s) in enumerate(results))
    out.write_text("<html><head><meta charset='utf-8'><title>cirlab retrieve</title></head>"
                   "<body style='font-family:sans-serif'>"
                   f"<h2>query: {html.escape(text)}</h2><img src='data:image/png;base64,{_thumb(image)}'>"
                   f"<h2>top {len(results)}</h2>{cells}</body></html>")
    return out


def write_grid(out: Path, image: Path, results: list[tuple[Path, float]], size: int = 128) -> Path:
    """The query, then the results, in one row of thumbnails."""
    grid = Image.new("RGB", (size * (len(results) + 1) + 8, size), "white")
    for i, p in enumerate([image] + [r[0] for r in results]):
        img = Image.open(p).convert("RGB")
        img.thumbnail((size, size))
        grid.paste(img, (i * size + (8 if i else 0), 0))
    grid.save(out)
    return out


def retrieve_cli(argv: Sequence[str]) -> int:
    from cirlab.train.commands import load_task

    p = argparse.ArgumentParser(prog="cirlab retrieve", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a .ckpt written by `cirlab fit` (Combiner, LinCIR, …)")
    p.add_argument("--gallery", required=True, help="folder of images to search")
    p.add_argument("--image", required=True, help="the reference (query) image")
    p.add_argument("--text", required=True, help="what to change")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--html", default="retrieval.html", help="page to write (default retrieval.html)")
    p.add_argument("--grid", default=None, help="also save the results as one PNG strip")
    a = p.parse_args(list(argv))
    if not Path(a.image).is_file():
        p.error(f"query image not found: {a.image}")
    task = load_task(a.ckpt)
    results = retrieve(task, list_images(a.gallery), Path(a.image), a.text, a.top_k)
    for i, (path, score) in enumerate(results, 1):
        print(f"{i:3d}  {score:.4f}  {path}")
    print(f"page: {write_html(Path(a.html), Path(a.image), a.text, results)}")
    if a.grid:
        print(f"grid: {write_grid(Path(a.grid), Path(a.image), results)}")
    return 0
