"""`make demo` end to end at smoke scale: every recipe runs through the CLI, the table and report appear."""

import json

from cirlab.train.demo import COLUMNS, run_demo


def test_demo_fast_runs_every_step(tmp_path):
    rows = run_demo(tmp_path / "demo", scale="fast")
    assert len(rows) == 6
    for name, m in rows.items():
        assert all(0.0 <= m[c] <= 100.0 for c in COLUMNS), name
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved.keys() == rows.keys()
    page = (tmp_path / "demo" / "report.html").read_text()
    assert page.count("<img") >= 8 and "Combiner" in page
    for run in ("clip", "combiner-stage1", "combiner", "lincir"):
        assert (tmp_path / "demo" / "runs" / run / "export" / "backbone.safetensors").is_file()
