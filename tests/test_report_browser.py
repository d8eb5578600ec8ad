"""The report page in a real browser: headless Debian chromium loads it, every image decodes, the
tables show, and the screenshot holds the hit marks. Skipped only where chromium is not installed
(`.ci/run` installs it with apt-get)."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cirlab.train.report import HIT, write_report, write_retrieval_page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")

COLOURS = [(215, 40, 40), (40, 165, 60), (45, 85, 215), (230, 200, 30), (135, 55, 185), (240, 135, 25)]
HIT_RGB = tuple(int(HIT[i:i + 2], 16) for i in (1, 3, 5))


def _shape_png(i: int, size: int = 64) -> bytes:
    """A coloured circle or square on white: gallery image number i."""
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    box = [10 + i % 3 * 4, 10, 50 + i % 3 * 4, 50]
    (d.ellipse if i % 2 else d.rectangle)(box, fill=COLOURS[i % len(COLOURS)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


GALLERY = {f"g{i:02d}": _shape_png(i) for i in range(12)}
# three queries; hits in the top 5 written out by hand: A finds q0's target at 1 and q1's at 3; B finds q1's at 1
RANKINGS = {
    "Combiner": {"query_ids": ["q0", "q1", "q2"], "ref_ids": ["g00", "g01", "g02"],
                 "texts": [["make it green"], ["a circle instead"], ["bigger"]],
                 "gt_ids": [["g03"], ["g05", "g07"], ["g11"]],
                 "ranked": [["g03", "g04", "g06", "g08", "g09", "g10"], ["g04", "g06", "g07", "g05", "g08", "g09"],
                            ["g04", "g06", "g08", "g09", "g10", "g03"]]},
    "LinCIR": {"query_ids": ["q0", "q1", "q2"], "ref_ids": ["g00", "g01", "g02"],
               "texts": [["make it green"], ["a circle instead"], ["bigger"]],
               "gt_ids": [["g03"], ["g05", "g07"], ["g11"]],
               "ranked": [["g08", "g09", "g10", "g04", "g06", "g03"], ["g05", "g04", "g06", "g08", "g09", "g10"],
                          ["g06", "g04", "g08", "g09", "g10", "g03"]]},
}
ROWS = {"image only (no training)": {"R@1": 4.0, "R@5": 20.5, "R@10": 33.0},
        "Combiner": {"R@1": 33.3, "R@5": 66.7, "R@10": 66.7, "mAP@5": 40.1},
        "LinCIR": {"R@1": 33.3, "R@5": 33.3, "R@10": 66.7, "mAP@5": 22.0}}
HITS_IN_TOP5 = 2 + 1 + 0 + 0 + 1 + 0  # Combiner: q0 g03, q1 g07+g05; LinCIR: q1 g05
# the script that reports, inside the DOM, what the browser made of the page
CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const tables = [...document.querySelectorAll('table')];
  const out = {images: imgs.length,
               loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
               broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 40)),
               shown: imgs.filter(i => i.getBoundingClientRect().width > 0).length,
               tables: tables.length,
               visible_tables: tables.filter(t => t.getBoundingClientRect().height > 0).length,
               metric_rows: document.querySelectorAll('#metrics tr').length,
               hits: document.querySelectorAll('figure.hit').length,
               queries: document.querySelectorAll('section.query').length};
  const pre = document.createElement('pre');
  pre.id = 'cirlab-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(page: Path, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'profile'}", "--window-size=1200,1600", *mode,
            page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)


def _browser_check(page: Path, tmp: Path) -> dict:
    """Open a copy of ``page`` with the check script and return what it found."""
    probe = page.with_name(page.stem + "-probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    r = _chromium(probe, tmp, "--virtual-time-budget=10000", "--dump-dom")
    m = re.search(r'<pre id="cirlab-check">(.*?)</pre>', r.stdout, re.S)
    assert m, f"chromium printed no check result (rc {r.returncode}): {r.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _screenshot(page: Path, tmp: Path, name: str) -> np.ndarray:
    shot = tmp / name
    r = _chromium(page, tmp, f"--screenshot={shot}", "--hide-scrollbars")
    assert shot.is_file(), f"no screenshot (rc {r.returncode}): {r.stderr[-2000:]}"
    return np.asarray(Image.open(shot).convert("RGB")).astype(int)


def _near(pixels: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).sum())


@pytest.fixture()
def report(tmp_path) -> Path:
    return write_report(tmp_path / "report.html", ROWS, RANKINGS, GALLERY, ("R@1", "R@5", "R@10", "mAP@5"),
                        title="cirlab test report", subtitle="three queries, two methods", n_queries=3, top=5)


def test_report_page_structure(report):
    # what the file holds, without a browser: 3 queries x 2 methods x 5 results, the hits marked
    text = report.read_text(encoding="utf-8")
    assert text.count('class="result') == 3 * 2 * 5
    assert len(re.findall(r'<figure class="result hit">', text)) == HITS_IN_TOP5
    assert "target at rank 1" in text and "target at rank 3" in text and "target not in top 6" in text
    assert text.count('<section class="query"') == 3 and "make it green" in text
    assert '<td class="best">66.7</td>' in text  # R@5's best
    grid = Image.open(report.with_suffix(".png")).convert("RGB")
    assert grid.width > 5 * 112 and grid.height > 3 * 2 * 112  # every query x method row
    assert _near(np.asarray(grid).astype(int), HIT_RGB, 0) > 100  # green frames on the hits


@needs_chromium
def test_report_page_in_chromium(report, tmp_path):
    check = _browser_check(report, tmp_path)
    # reference + targets (q0: 1, q1: 2, q2: 1) + 30 results + the grid image
    expected_images = 3 + 4 + 30 + 1
    assert check["images"] == expected_images and check["loaded"] == expected_images, check["broken"]
    assert check["shown"] == expected_images
    assert check["tables"] == 1 + 3 and check["visible_tables"] == 4   # metrics + one per query
    assert check["metric_rows"] == 1 + len(ROWS)
    assert check["hits"] == HITS_IN_TOP5 and check["queries"] == 3
    pixels = _screenshot(report, tmp_path, "screenshot.png")
    assert pixels.shape == (1600, 1200, 3)
    assert _near(pixels, HIT_RGB) > 200                    # hit frames and the best metrics drawn in green
    for colour in COLOURS[:3]:                              # the gallery shapes themselves
        assert _near(pixels, colour, 20) > 200, colour
    assert (pixels.std(axis=-1) > 0).mean() > 0.02         # not a blank page


@needs_chromium
def test_retrieval_page_in_chromium(tmp_path):
    results = [(f"shoes/g{i:02d}.png", score) for i, score in ((4, 0.9), (7, 0.8), (2, 0.7))]
    images = {f"shoes/g{i:02d}.png": GALLERY[f"g{i:02d}"] for i in (4, 7, 2)}
    page = write_retrieval_page(tmp_path / "retrieval.html", GALLERY["g00"], "make it green", results, images,
                                method="Combiner", notes=["skipped 1 unreadable gallery image(s) of 4: x.png"])
    text = page.read_text(encoding="utf-8")
    assert text.count('class="result') == 3 and "0.900" in text and "skipped 1 unreadable" in text
    check = _browser_check(page, tmp_path)
    assert check["images"] == 4 and check["loaded"] == 4, check["broken"]
    assert check["visible_tables"] == 1 and check["hits"] == 0
