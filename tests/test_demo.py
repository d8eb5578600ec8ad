"""`make demo` end to end at smoke scale: every recipe runs through the CLI, the table and report appear."""

import json

from cirlab.train.demo import COLUMNS, run_demo


def test_demo_fast_runs_every_step(tmp_path):
    rows = run_demo(tmp_path / "demo", scale="fast")
    # the baselines and every method, each trained through its own recipe or job
    assert list(rows) == ["image only (no training)", "text only (no training)", "image + text (no training)",
                          "CLIP4Cir stage 1 (fine-tuned sum)", "CLIP4Cir Combiner (stage 2)",
                          "LinCIR (text-only training)", "Pic2Word (image-only training)",
                          "SEARLE (phi distilled from OTI)", "SEARLE-OTI (OTI at query time)"]
    for name, m in rows.items():
        assert all(0.0 <= m[c] <= 100.0 for c in COLUMNS), name
    saved = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert saved.keys() == rows.keys()
    # the breakdown table: every method has R@10 per edit type present in the test split, and the
    # per-type recalls average back to the overall R@10 when weighted by the number of queries
    md = (tmp_path / "demo" / "results.md").read_text()
    assert "R@10 by edit type" in md and "held_out" in md
    from collections import Counter

    from cirlab.data.streaming import ShardStream

    queries = ShardStream(tmp_path / "demo" / "world" / "eval" / "test" / "queries", "query", resampled=False,
                          shuffle=False, shuffle_buffer=0, batch_size=None, rank=0, world_size=1,
                          equal_steps=False, decode_images=False)
    counts = Counter(q["change"] for q in queries)
    for name, m in rows.items():
        weighted = sum(m[f"change={c}/R@10"] * n for c, n in counts.items()) / sum(counts.values())
        assert abs(weighted - m["R@10"]) < 1e-6, name
    # the second table: conditional retrieval, plain CLIP vs FocalLens fine-tuned from the demo's CLIP
    conditional = json.loads((tmp_path / "demo" / "results_conditional.json").read_text())
    assert list(conditional) == ["unconditional CLIP (no training)", "FocalLens (instruction-tuned)"]
    assert all(0.0 <= m["mAP@10"] <= 100.0 for m in conditional.values())
    assert "Conditional retrieval" in md and "FocalLens" in (tmp_path / "demo" / "results.md").read_text()
    page = (tmp_path / "demo" / "report.html").read_text()
    assert page.count("<img") >= 8 and "Combiner" in page
    logs = sorted((tmp_path / "demo" / "logs").glob("*.log"))  # each branch's output, whole and clean
    assert [p.stem for p in logs] == ["combiner", "focallens", "lincir", "pic2word", "searle"]
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text and "`Trainer.fit` stopped" in text, (log.name, text[-2000:])
    runs = tmp_path / "demo" / "runs"
    assert (tmp_path / "demo" / "report.png").is_file()  # the grid for papers and slides
    export = lambda run: runs / run / "version_0" / "export"  # noqa: E731  (each run its own version)
    assert (export("pic2word") / "mapper.safetensors").is_file()
    # the CLIP starts from the shape warm-up's weights and trains with dense reference tokens (clip.yaml)
    assert (export("shapes") / "backbone.safetensors").is_file()
    hparams = (runs / "clip" / "version_0" / "hparams.yaml").read_text()
    assert str(export("shapes") / "backbone.safetensors") in hparams, hparams
    assert "dense_references: 0.5" in hparams and "dense_inversions: 0.25" in hparams, hparams
    for run in ("clip", "combiner-stage1"):  # trained backbones: their weights
        assert (export(run) / "backbone.safetensors").is_file()
    for run, source in (("combiner", "combiner-stage1"), ("lincir", "clip")):  # frozen: a pointer, no copy
        assert not (export(run) / "backbone.safetensors").exists()
        pointer = json.loads((export(run) / "backbone.json").read_text())
        assert pointer["pretrained"] == str((export(source) / "backbone.safetensors").resolve())
    # `cirlab evaluate --baseline` gives the demo's baseline rows: from the CLIP's export folder, from
    # its checkpoint, and from the LinCIR checkpoint (a frozen copy of that CLIP, image tower embedded)
    from cirlab.train.cli import main

    test_set = str(tmp_path / "demo" / "world" / "eval" / "test")
    routes = {"export": ["--model", "cirlab-tiny", "--pretrained", str(export("clip"))],
              "clip ckpt": ["--ckpt", str(next((runs / "clip" / "version_0" / "checkpoints").glob("*.ckpt")))],
              "lincir ckpt": ["--ckpt", str(next((runs / "lincir" / "version_0" / "checkpoints").glob("*.ckpt")))]}
    for mode, row in (("image", "image only (no training)"), ("sum", "image + text (no training)"),
                      ("text", "text only (no training)")):
        for route, args in routes.items():
            if mode == "text" and route != "export":
                continue  # one route suffices for the text row
            out = tmp_path / f"{mode}-{route.replace(' ', '_')}.json"
            assert main(["evaluate", "--baseline", mode, *args, "--sets", test_set, "--out", str(out)]) == 0
            got = json.loads(out.read_text())["synthetic"]
            for key in ("R@1", "R@5", "R@10", "mAP@10", "composition=held_out/R@10"):
                assert abs(got[key] - rows[row][key]) < 1e-6, (mode, route, key, got[key], rows[row][key])


def test_the_demo_searle_follows_the_quickstart_recipe():
    """The demo's SEARLE (training tokens, phi, query-time OTI) takes its regulariser weights from
    recipes/quickstart/searle.yaml: a fifth of the reference's (docs/zero-shot-synthetic.md,
    attempt 11), the step count from the demo's scale."""
    from cirlab.train.demo import searle_settings

    oti, phi_reg = searle_settings(40, seed=3)
    assert (oti.steps, oti.batch_size, oti.seed) == (40, 64, 3)
    assert oti.lambda_reg == 0.1 and oti.lambda_content == 1.0 and oti.top_k == 15  # reference: 0.5, 1, 15
    assert oti.lr == 0.02  # the reference's
    assert phi_reg == {"lambda_reg": 0.15, "top_k_concepts": 150}  # reference: 0.75, 150
    assert searle_settings(2)[0].steps == 2


def test_a_branch_log_keeps_the_messages_of_handlers_made_in_an_earlier_branch(tmp_path):
    """A demo process runs branches one after another, each into its own log. A logging handler made
    during the first (Lightning's and wandb's are, on import) holds the stream of that moment; the
    second branch's messages through it must land in the second log, not raise "I/O operation on
    closed file" tracebacks into it (run S's lincir/pic2word/searle logs held 4-6 of them)."""
    import logging
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from cirlab.train.demo import _in_log

    first, second = tmp_path / "first.log", tmp_path / "second.log"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(_in_log, str(first), logging.basicConfig).result()  # a handler on this moment's stderr
        pool.submit(_in_log, str(first.with_suffix(".x")), print, "a line of the first branch").result()
        pool.submit(_in_log, str(second), logging.warning, "a message of a later branch").result()
    text = second.read_text()
    assert "a message of a later branch" in text, text
    assert "Traceback" not in text and "Logging error" not in text, text
    assert "a line of the first branch" in first.with_suffix(".x").read_text()
    assert "later branch" not in first.read_text()
