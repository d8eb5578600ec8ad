"""`cirlab retrieve`: a trained checkpoint, a gallery (a folder of image files, or of image shards), a
query image and text -> the top-k images.

Unreadable gallery files (0 bytes, corrupt) are skipped, counted and listed, as training and conversion
skip them; an empty text warns (an image-only query), a text longer than the text tower's context
warns that it is cut. The page and the PNG strip come from cirlab.train.report.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cirlab.data.images import IMAGE_EXTS, ImageDecodeError, decode_rgb, list_image_files
from cirlab.errors import CirlabError
from cirlab.models.text_context import ContextMonitor

SHOW_SKIPPED = 10  # skipped files named in the warning; the rest are counted


class RetrieveError(CirlabError, FileNotFoundError):
    """A gallery or query image that is missing or unreadable (a FileNotFoundError too)."""


def list_images(folder: str | Path) -> list[Path]:
    """Every image file under ``folder`` (recursively), sorted; a missing or image-less folder is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise RetrieveError(f"gallery folder {root} does not exist", "pass the folder of images to search with --gallery")
    files = list_image_files(root)
    if not files:
        raise RetrieveError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}",
                            "pass the folder of images to search with --gallery, or a folder of image shards "
                            "(cirlab data convert --kind image)")
    return files


@dataclass
class ShardGallery:
    """A folder of image shards (`cirlab data convert --kind image`, an evaluation set's gallery/) searched
    as a gallery: images are known by their sample id."""

    root: Path

    def stream(self, transform: Any = None) -> Any:
        from cirlab.data.streaming import ShardStream

        return ShardStream(self.root, "image", transform=transform, resampled=False, shuffle=False,
                           shuffle_buffer=0, batch_size=None, rank=0, world_size=1, equal_steps=False)

    def __len__(self) -> int:
        from cirlab.data.shards import read_index

        return sum(read_index(self.root).counts)

    def encoded(self, ids: Optional[Sequence[str]] = None) -> dict[str, bytes]:
        """PNG bytes of the images with these ids, or of all (a second pass: nothing of the gallery is kept)."""
        import io

        want, out = (None if ids is None else set(ids)), {}
        for sample in self.stream():
            if want is None or sample["id"] in want:
                buf = io.BytesIO()
                sample["image"].save(buf, format="PNG")
                out[sample["id"]] = buf.getvalue()
                if want is not None and len(out) == len(want):
                    break
        return out


def open_gallery(folder: str | Path) -> list[Path] | ShardGallery:
    """--gallery: a folder of image files, or a shard folder (index.json) of kind image."""
    root = Path(folder)
    if (root / "index.json").is_file():
        from cirlab.data.shards import read_index

        kind = read_index(root).kind
        if kind != "image":
            raise RetrieveError(f"{root} holds {kind} shards, not images",
                                "--gallery takes image shards (cirlab data convert --kind image, or an evaluation "
                                "set's gallery/ folder) or a folder of image files")
        return ShardGallery(root)
    return list_images(root)


@dataclass
class Retrieval:
    """The top-k (path, score) best first, and the gallery files skipped as unreadable (path, reason)."""

    results: list[tuple[Path, float]]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ranked: int = 0  # gallery images ranked

    def skipped_message(self, limit: int = SHOW_SKIPPED) -> str | None:
        """One line counting and naming the skipped files, or None."""
        if not self.skipped:
            return None
        names = ", ".join(f"{p} ({why})" for p, why in self.skipped[:limit])
        more = f", … and {len(self.skipped) - limit} more" if len(self.skipped) > limit else ""
        return (f"skipped {len(self.skipped)} unreadable gallery image(s) of {len(self.skipped) + self.ranked}: "
                f"{names}{more}")


def query_text_warnings(task: Any, text: str) -> list[str]:
    """Warnings about the query text: empty (an image-only query) or longer than the context (cut)."""
    out = []
    if not text.strip():
        out.append("the query text is empty: ranking by the reference image alone (an image-only query); "
                   "pass --text to describe the change")
    tokenizer = getattr(getattr(task, "backbone", None), "tokenizer", None)
    context = getattr(tokenizer, "context_length", None)
    if context and hasattr(tokenizer, "encode"):
        tokens = ContextMonitor(context, tokenizer.encode).tokens(text)
        if tokens > context:
            out.append(f"the query text ({len(text.split())} words, {tokens} tokens) is longer than the text "
                       f"tower's {context}-token context and is cut: only its first {context - 2} tokens count")
    return out


def _gallery_batches(gallery: Sequence[Path] | ShardGallery, tf: Any, batch_size: int,
                     skipped: list[tuple[Path, str]]) -> Iterator[tuple[list[Path | str], torch.Tensor]]:
    """(names, transformed images) batches of the gallery; unreadable files go to ``skipped`` (a shard
    stream skips and reports its bad samples itself)."""
    if isinstance(gallery, ShardGallery):
        names: list[Path | str] = []
        images = []
        for sample in tqdm(gallery.stream(tf), total=len(gallery), desc="encoding the gallery", unit="image",
                           disable=None):
            names.append(sample["id"])
            images.append(sample["image"])
            if len(images) == batch_size:
                yield names, torch.stack(images)
                names, images = [], []
        if images:
            yield names, torch.stack(images)
        return
    for s in tqdm(range(0, len(gallery), batch_size), desc="encoding the gallery", unit="batch", disable=None):
        names, images = [], []
        for p in gallery[s:s + batch_size]:
            try:
                images.append(tf(decode_rgb(p)))
                names.append(p)
            except (OSError, ImageDecodeError) as exn:
                skipped.append((p, str(exn)))
        if images:
            yield names, torch.stack(images)


@torch.no_grad()
def retrieve(task: Any, gallery: Sequence[Path] | ShardGallery, image: Path, text: str, k: int = 10,
             batch_size: int = 64) -> Retrieval:
    """Rank the gallery images for (image, text) with the task's own query; best first. Unreadable
    gallery files are skipped and returned in ``skipped``; an unreadable query image is an error.
    A shard gallery's results are named by sample id."""
    from cirlab.data.evalset import Protocol
    from cirlab.train.ranking import rank

    task.prepare_for_evaluation()  # e.g. the image tower a text-only run (LinCIR) left out
    task.eval()
    tf = task.image_transform(train=False)
    try:
        query = decode_rgb(image)
    except (OSError, ImageDecodeError) as exn:
        raise RetrieveError(f"query image {image} is not readable ({exn})", "pass an image file with --image") from exn
    kept: list[Path | str] = []
    skipped: list[tuple[Path, str]] = []
    feats = []
    for names, batch in _gallery_batches(gallery, tf, batch_size, skipped):
        kept += names
        feats.append(task.gallery_features(batch.to(task.device)).float().cpu())
    if not kept:
        first = f"{skipped[0][0]} ({skipped[0][1]})" if skipped else "none"
        raise RetrieveError(f"none of the {len(gallery)} gallery images is readable (the first: {first})",
                            "check the files under --gallery")
    g = torch.cat(feats)
    ref = task.gallery_features(tf(query)[None].to(task.device))
    q = task.query_features(ref, [[text]], Protocol("custom", text_format="plain")).float().cpu()
    scores, idx = rank(F.normalize(q, dim=-1), F.normalize(g, dim=-1), min(k, len(kept)))
    results = [(kept[i], float(v)) for v, i in zip(scores[0].tolist(), idx[0].tolist())]
    return Retrieval(results, skipped, len(kept))


def _ranked_images(results: list[tuple[Path | str, float]], gallery: Path | ShardGallery
                   ) -> tuple[list[tuple[str, float]], dict[str, bytes]]:
    """The results as (image id, score) and each result's encoded image, for the page and the strip."""
    if isinstance(gallery, ShardGallery):
        ranked = [(str(name), score) for name, score in results]
        return ranked, gallery.encoded([name for name, _ in ranked])
    ranked = [(_image_id(Path(p), gallery), score) for p, score in results]
    return ranked, {_image_id(Path(p), gallery): Path(p).read_bytes() for p, _ in results}


def _image_id(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def retrieve_command(ckpt: str, gallery: str, image: str, text: str, top_k: int = 10,
                     html: str = "retrieval.html", grid: Optional[str] = None) -> int:
    """Top-k gallery images for a query image + text with a trained checkpoint; writes an HTML page.

    Args:
        ckpt: a .ckpt written by `cirlab fit` (Combiner, LinCIR, any cirlab task)
        gallery: folder of images to search (image files, or image shards: cirlab data convert --kind image)
        image: the reference (query) image
        text: what to change
        top_k: how many results
        html: page to write
        grid: also save the results as one PNG strip
    """
    from cirlab.train.commands import load_task

    a = SimpleNamespace(ckpt=ckpt, gallery=gallery, image=image, text=text, top_k=top_k, html=html, grid=grid)
    if a.top_k < 1:
        raise CirlabError(f"--top-k must be at least 1, got {a.top_k}", "ask for one result or more")
    image = Path(a.image)
    if not image.is_file():
        raise RetrieveError(f"query image {image} does not exist", "pass the reference image with --image")
    gallery = open_gallery(a.gallery)
    task = load_task(a.ckpt)
    notes = query_text_warnings(task, a.text)
    found = retrieve(task, gallery, image, a.text, a.top_k)
    skipped = found.skipped_message()
    notes += [skipped] if skipped else []
    for note in notes:  # one line each, on stderr
        print(f"cirlab retrieve: warning: {note}", file=sys.stderr)
    for i, (path, score) in enumerate(found.results, 1):
        print(f"{i:3d}  {score:.4f}  {path}")
    method = type(task).__name__.removesuffix("Task")
    from cirlab.train.report import write_retrieval_grid, write_retrieval_page

    # the results' images once, for the page and the strip (a shard gallery reads them in a second pass)
    ranked, images = _ranked_images(found.results, gallery if isinstance(gallery, ShardGallery) else Path(a.gallery))
    query = image.read_bytes()
    print(f"page: {write_retrieval_page(Path(a.html), query, a.text, ranked, images, method, notes)}")
    if a.grid:
        print(f"grid: {write_retrieval_grid(Path(a.grid), query, a.text, ranked, images, method)}")
    return 0


def retrieve_cli(argv: Sequence[str]) -> int:
    """``cirlab retrieve``: print the top-k, write the page (and the strip); user mistakes raise CirlabError."""
    from cirlab.typed_commands import run_function_command

    return run_function_command(retrieve_command, argv, "cirlab retrieve")
