"""The report page and the PNG grid: queries, their reference and target images, each method's top-k
with the hits marked, and the metrics table. Shared by `cirlab demo` (``write_report``) and
`cirlab retrieve --html/--grid` (``write_retrieval_page`` / ``write_retrieval_grid``).

The page is one self-contained HTML file (images inlined as data URIs, no scripts, no network), so it
can be mailed or opened from any folder; the grid is a PNG for papers and slides.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

from cirlab.data.images import ImageDecodeError, decode_rgb

DEFAULT_COLUMNS = ("R@1", "R@5", "R@10", "mAP@5", "mAP@10")
HIT, MISS, NEUTRAL = "#1f9d55", "#d0d4da", "#d0d4da"  # frame colours: a correct result, a wrong one, unknown


# --------------------------------------------------------------------------- the data shown


@dataclass
class Result:
    """One ranked gallery image: its id, whether it answers the query (None: unknown), its score."""

    id: str
    hit: Optional[bool] = None
    score: Optional[float] = None


@dataclass
class MethodRow:
    """One method's top-k for one query, and the rank of its first hit (None: no hit in its ranking)."""

    method: str
    results: list[Result]
    first_hit: Optional[int] = None
    ranked_len: int = 0


@dataclass
class QueryCard:
    """One query: its text, reference, target(s) and every method's top-k."""

    query_id: str
    text: str
    ref_id: str
    target_ids: list[str]
    methods: list[MethodRow] = field(default_factory=list)


def query_cards(rankings: Mapping[str, Mapping[str, Any]], n_queries: int = 8, top: int = 5) -> list[QueryCard]:
    """The first ``n_queries`` queries of the first method, with every method's top ``top`` (matched by query id).

    ``rankings[method]`` holds lists ``query_ids``, ``ref_ids``, ``texts`` (each a list of strings),
    ``gt_ids`` (each query's correct gallery ids; or ``target_ids``) and ``ranked`` (gallery ids, best first).
    """
    if not rankings:
        return []
    first = next(iter(rankings.values()))
    positions = {m: {q: i for i, q in enumerate(r["query_ids"])} for m, r in rankings.items()}
    cards = []
    for i, qid in enumerate(list(first["query_ids"])[:n_queries]):
        texts = first["texts"][i]
        text = " / ".join(texts) if isinstance(texts, (list, tuple)) else str(texts)
        gts = _targets(first, i)
        card = QueryCard(str(qid), text, str(first["ref_ids"][i]), gts)
        for method, r in rankings.items():
            j = positions[method].get(qid)
            if j is None:
                continue
            ranked = [str(x) for x in r["ranked"][j]]
            truth = set(_targets(r, j))
            first_hit = next((k + 1 for k, x in enumerate(ranked) if x in truth), None) if truth else None
            scores = r.get("scores")
            results = [Result(x, (x in truth) if truth else None,
                              float(scores[j][k]) if scores is not None else None) for k, x in enumerate(ranked[:top])]
            card.methods.append(MethodRow(method, results, first_hit, len(ranked)))
        cards.append(card)
    return cards


def _targets(r: Mapping[str, Any], i: int) -> list[str]:
    gts = list(r.get("gt_ids", [[]] * (i + 1))[i] or [])
    if not gts and r.get("target_ids") is not None and r["target_ids"][i] is not None:
        gts = [r["target_ids"][i]]
    return [str(g) for g in gts]


# --------------------------------------------------------------------------- images


class Thumbnails:
    """Gallery image bytes by id -> small PNG data URIs and PIL images, each made once."""

    def __init__(self, images: Mapping[str, bytes], size: int = 160) -> None:
        self.images, self.size = images, size
        self._uri: dict[str, Optional[str]] = {}
        self._pil: dict[str, Optional[Image.Image]] = {}
        self.missing: list[str] = []

    def pil(self, image_id: str) -> Optional[Image.Image]:
        """The image as RGB, at most ``size`` pixels a side; None if absent or unreadable."""
        if image_id not in self._pil:
            data = self.images.get(image_id)
            img = None
            if data is not None:
                try:
                    img = decode_rgb(data)
                    img.thumbnail((self.size, self.size))
                except ImageDecodeError:
                    img = None
            if img is None:
                self.missing.append(image_id)
            self._pil[image_id] = img
        return self._pil[image_id]

    def uri(self, image_id: str) -> Optional[str]:
        if image_id not in self._uri:
            img = self.pil(image_id)
            if img is None:
                self._uri[image_id] = None
            else:
                buf = io.BytesIO()
                img.save(buf, format="PNG", optimize=True)
                self._uri[image_id] = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return self._uri[image_id]


# --------------------------------------------------------------------------- HTML

_CSS = """
:root { --hit: %s; --miss: %s; --ink: #1d2430; --muted: #667085; --line: #e4e7ec; }
* { box-sizing: border-box; }
body { margin: 0; padding: 28px 36px 48px; background: #f4f5f7; color: var(--ink);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 30px 0 10px; }
.sub { color: var(--muted); margin: 0 0 18px; }
table.metrics { border-collapse: collapse; background: #fff; border-radius: 8px; overflow: hidden;
                box-shadow: 0 1px 3px rgba(16,24,40,.08); }
table.metrics th, table.metrics td { padding: 7px 14px; border-bottom: 1px solid var(--line); }
table.metrics th { background: #eef1f5; text-align: right; font-weight: 600; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics tr:last-child td { border-bottom: 0; }
table.metrics td.best { font-weight: 700; color: var(--hit); }
.legend { color: var(--muted); font-size: 13px; margin: 8px 0 0; }
.legend b.h { color: var(--hit); }
.query { background: #fff; border-radius: 10px; box-shadow: 0 1px 3px rgba(16,24,40,.08);
         padding: 14px 18px 10px; margin: 0 0 16px; }
.qhead { display: flex; gap: 10px; align-items: baseline; margin-bottom: 10px; }
.qno { color: var(--muted); font-size: 12px; white-space: nowrap; }
.qtext { font-size: 16px; font-weight: 600; }
.qbody { display: flex; gap: 22px; align-items: flex-start; }
.inputs { display: flex; gap: 10px; flex: none; padding-right: 20px; border-right: 1px solid var(--line); }
table.ranks { border-collapse: collapse; }
table.ranks td { padding: 3px 6px; vertical-align: middle; }
td.method { width: 190px; font-weight: 600; }
td.method .rank { display: block; font-weight: 400; color: var(--muted); font-size: 12px; }
td.method .rank.found { color: var(--hit); }
figure { margin: 0; text-align: center; position: relative; }
figure img, figure .none { width: 84px; height: 84px; object-fit: contain; background: #f0f2f5;
             border: 3px solid var(--miss); border-radius: 6px; display: block; }
figure.input img { width: 104px; height: 104px; border-color: #98a2b3; }
figure.target img { border-color: var(--hit); border-style: dashed; }
figure.hit img { border-color: var(--hit); }
figure.hit::after { content: "\\2713"; position: absolute; top: 2px; right: 4px; background: var(--hit); color: #fff;
                    font-size: 11px; font-weight: 700; width: 17px; height: 17px; border-radius: 50%%; line-height: 17px; }
figure .none { display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: 11px; }
figcaption { font-size: 11px; color: var(--muted); margin-top: 2px; max-width: 104px;
             overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.note { color: #b54708; }
img.grid { max-width: 100%%; border-radius: 8px; box-shadow: 0 1px 3px rgba(16,24,40,.08); background: #fff; }
""" % (HIT, MISS)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _figure(thumbs: Thumbnails, image_id: str, cls: str, caption: str) -> str:
    uri = thumbs.uri(image_id)
    inner = (f'<img src="{uri}" alt="{_e(image_id)}" title="{_e(image_id)}" data-id="{_e(image_id)}">' if uri else
             f'<div class="none" title="{_e(image_id)}">no image</div>')
    return f'<figure class="{cls}">{inner}<figcaption title="{_e(image_id)}">{_e(caption)}</figcaption></figure>'


def metrics_table(rows: Mapping[str, Mapping[str, float]], columns: Mapping[str, str]) -> str:
    """The methods x metrics table; the best value of each column is marked."""
    best = {}
    for c in columns:
        vals = [m[c] for m in rows.values() if c in m and not math.isnan(m[c])]
        best[c] = max(vals) if vals else None
    head = "<tr><th>method</th>" + "".join(f"<th>{_e(h)}</th>" for h in columns.values()) + "</tr>"
    body = []
    for name, m in rows.items():
        cells = []
        for c in columns:
            v = m.get(c, float("nan"))
            cls = ' class="best"' if best[c] is not None and v == best[c] and len(rows) > 1 else ""
            cells.append(f"<td{cls}>{'–' if math.isnan(v) else f'{v:.1f}'}</td>")
        body.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}</tr>")
    return f'<table class="metrics" id="metrics">{head}{"".join(body)}</table>'


def query_card_html(card: QueryCard, thumbs: Thumbnails, number: int, max_targets: int = 3) -> str:
    """One query: text, reference and target(s) on the left, one row of top-k per method on the right."""
    inputs = [_figure(thumbs, card.ref_id, "input", "reference")]
    for t in card.target_ids[:max_targets]:
        inputs.append(_figure(thumbs, t, "input target", "target"))
    if len(card.target_ids) > max_targets:
        inputs.append(f'<div class="qno">+{len(card.target_ids) - max_targets} more targets</div>')
    rows = []
    for m in card.methods:
        if m.first_hit is not None:
            found = " found" if m.first_hit <= len(m.results) else ""
            where = f'<span class="rank{found}">target at rank {m.first_hit}</span>'
        elif card.target_ids:
            where = f'<span class="rank">target not in top {m.ranked_len}</span>'
        else:
            where = ""
        cells = []
        for k, r in enumerate(m.results, 1):
            cls = "result" + (" hit" if r.hit else " miss" if r.hit is False else "")
            caption = f"{k}. {r.id}" if r.score is None else f"{k}. {r.score:.3f}"
            cells.append(f"<td>{_figure(thumbs, r.id, cls, caption)}</td>")
        rows.append(f'<tr><td class="method">{_e(m.method)}{where}</td>{"".join(cells)}</tr>')
    return (f'<section class="query" id="q{number}"><div class="qhead"><span class="qno">query {number} · '
            f'{_e(card.query_id)}</span><span class="qtext">“{_e(shorten(card.text))}”</span></div>'
            f'<div class="qbody"><div class="inputs">{"".join(inputs)}</div>'
            f'<table class="ranks">{"".join(rows)}</table></div></section>')


def render_page(title: str, subtitle: str, rows: Mapping[str, Mapping[str, float]], columns: Mapping[str, str],
                cards: Sequence[QueryCard], thumbs: Thumbnails, grid_name: Optional[str] = None,
                notes: Sequence[str] = ()) -> str:
    """The whole page as a string."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"]
    if subtitle:
        parts.append(f'<p class="sub">{_e(subtitle)}</p>')
    for note in notes:
        parts.append(f'<p class="note">{_e(note)}</p>')
    if rows:
        parts.append(metrics_table(rows, columns))
    if cards:
        marked = any(r.hit is not None for c in cards for m in c.methods for r in m.results)
        parts.append(f"<h2>Queries: reference + text → top {max(len(m.results) for c in cards for m in c.methods)}"
                     f"{' per method' if len(cards[0].methods) > 1 else ''}</h2>")
        if marked:
            parts.append('<p class="legend"><b class="h">green ✓</b> = a correct target; dashed = the query\'s '
                         'target(s); grey = a wrong result.</p>')
        parts.extend(query_card_html(c, thumbs, i) for i, c in enumerate(cards, 1))
    if grid_name:
        parts.append(f'<h2>The same as one PNG</h2><p class="legend">{_e(grid_name)} (for papers and slides)</p>'
                     f'<img class="grid" src="{_e(grid_name)}" alt="result grid">')
    if thumbs.missing:
        parts.append(f'<p class="note">{len(set(thumbs.missing))} image(s) not available: '
                     f'{_e(", ".join(sorted(set(thumbs.missing))[:10]))}</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _columns(columns: Optional[Sequence[str] | Mapping[str, str]]) -> dict[str, str]:
    if columns is None:
        return {c: c for c in DEFAULT_COLUMNS}
    return dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}


def write_report(path: str | Path, rows: Mapping[str, Mapping[str, float]],
                 rankings: Mapping[str, Mapping[str, Any]], gallery_images: Mapping[str, bytes],
                 columns: Optional[Sequence[str] | Mapping[str, str]] = None, *, title: str = "cirlab report",
                 subtitle: str = "", n_queries: int = 8, top: int = 5,
                 grid: Optional[str | Path] = "auto") -> Path:
    """The report page: the metrics table (``rows``: method -> metrics), then ``n_queries`` queries with
    every method's top ``top`` (``rankings``: method -> query_ids, ref_ids, texts, gt_ids, ranked; hits
    marked), images from ``gallery_images`` (id -> encoded bytes). Also writes the PNG grid (``grid``:
    a path, "auto" for ``<page>.png`` beside it, or None) and links it from the page."""
    path = Path(path)
    cols = _columns(columns)
    cards = query_cards(rankings, n_queries, top)
    thumbs = Thumbnails(gallery_images)
    grid_path = path.with_suffix(".png") if grid == "auto" else (Path(grid) if grid else None)
    if grid_path is not None and cards:
        render_grid(cards, thumbs).save(grid_path)
    rel = _relative(grid_path, path.parent) if grid_path is not None and cards else None
    path.write_text(render_page(title, subtitle, rows, cols, cards, thumbs, rel), encoding="utf-8")
    return path


def _relative(target: Path, folder: Path) -> str:
    try:
        return target.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return target.resolve().as_uri()


# --------------------------------------------------------------------------- `cirlab retrieve`


def retrieval_card(query_image_id: str, text: str, results: Sequence[tuple[str, float]], method: str) -> QueryCard:
    """One query card for `cirlab retrieve`: no targets known, so results carry their scores instead."""
    return QueryCard("your query", text if text.strip() else "(no text: image only)", query_image_id, [],
                     [MethodRow(method, [Result(i, None, s) for i, s in results], None, len(results))])


def write_retrieval_page(path: str | Path, query_image: bytes, text: str, results: Sequence[tuple[str, float]],
                         images: Mapping[str, bytes], method: str = "checkpoint", notes: Sequence[str] = ()) -> Path:
    """The page `cirlab retrieve --html` writes: the query (image + text) and the top-k with their scores."""
    path = Path(path)
    all_images = {**images, "__query__": query_image}
    card = retrieval_card("__query__", text, results, method)
    thumbs = Thumbnails(all_images)
    body = render_page(f"cirlab retrieve: top {len(results)}", f"gallery ranked by {method}", {}, {}, [card],
                       thumbs, notes=notes)
    path.write_text(body, encoding="utf-8")
    return path


def write_retrieval_grid(path: str | Path, query_image: bytes, text: str, results: Sequence[tuple[str, float]],
                         images: Mapping[str, bytes], method: str = "checkpoint") -> Path:
    """The query and its top-k as one PNG strip."""
    card = retrieval_card("__query__", text, results, method)
    render_grid([card], Thumbnails({**images, "__query__": query_image})).save(path)
    return Path(path)


# --------------------------------------------------------------------------- the PNG grid


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """``text`` cut with an ellipsis to fit ``width`` pixels (a binary search: texts may be 10,000 words)."""
    text = text[: max(1, width // 3)]  # no glyph is narrower than 3 px at these sizes
    if draw.textlength(text, font=font) <= width:
        return text
    lo, hi = 0, len(text)  # the longest prefix that fits with the ellipsis
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if draw.textlength(text[:mid] + "…", font=font) <= width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo] + "…"


def shorten(text: str, limit: int = 400) -> str:
    """At most ``limit`` characters of a query text for display, saying how long the whole was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit].rstrip()}… ({len(text.split())} words in all)"


def render_grid(cards: Sequence[QueryCard], thumbs: Thumbnails, cell: int = 112, label_width: int = 170) -> Image.Image:
    """Per query: its text, then one row per method: reference | target | gap | top-k (green frame = hit)."""
    pad, frame, head = 8, 4, 26
    top = max((len(m.results) for c in cards for m in c.methods), default=0)
    width = label_width + 2 * (cell + pad) + 3 * pad + top * (cell + pad) + pad
    height = pad + sum(head + len(c.methods) * (cell + pad) + pad for c in cards)
    grid = Image.new("RGB", (width, max(height, cell + 2 * pad)), "white")
    draw = ImageDraw.Draw(grid)
    font, small = _font(15), _font(12)
    y = pad
    for n, card in enumerate(cards, 1):
        draw.text((pad, y + 4), _fit(draw, f"{n}. “{card.text}”", font, width - 2 * pad), fill="#1d2430", font=font)
        y += head
        for row, m in enumerate(card.methods):
            draw.text((pad, y + cell // 2 - 16), _fit(draw, m.method, font, label_width - pad), fill="#1d2430", font=font)
            if m.first_hit is not None:
                shown = m.first_hit <= len(m.results)
                draw.text((pad, y + cell // 2 + 4), f"target at rank {m.first_hit}", fill=HIT if shown else "#667085",
                          font=small)
            x = label_width
            inputs = [(card.ref_id, "#98a2b3", "reference")]
            inputs += [(card.target_ids[0], HIT, "target")] if card.target_ids else []
            for image_id, colour, label in inputs if row == 0 else ():  # the query's inputs once, on its first row
                _paste(grid, draw, thumbs.pil(image_id), x, y, cell, colour, frame)
                draw.text((x + 4, y + cell - 16), label, fill="white", font=small, stroke_width=2, stroke_fill="black")
                x += cell + pad
            x = label_width + 2 * (cell + pad) + 3 * pad
            for k, r in enumerate(m.results, 1):
                colour = HIT if r.hit else ("#e5484d" if r.hit is False else "#d0d4da")
                _paste(grid, draw, thumbs.pil(r.id), x, y, cell, colour, frame)
                draw.text((x + 5, y + 3), str(k), fill="white", font=small, stroke_width=2, stroke_fill="black")
                x += cell + pad
            y += cell + pad
        y += pad
    return grid


def _paste(grid: Image.Image, draw: ImageDraw.ImageDraw, img: Optional[Image.Image], x: int, y: int, cell: int,
           colour: str, frame: int) -> None:
    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill="#f0f2f5", outline=colour, width=frame)
    if img is None:
        draw.text((x + cell // 2 - 24, y + cell // 2 - 6), "no image", fill="#667085", font=_font(12))
        return
    inner = cell - 2 * frame
    scale = min(inner / img.width, inner / img.height)
    fitted = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    grid.paste(fitted, (x + frame + (inner - fitted.width) // 2, y + frame + (inner - fitted.height) // 2))
