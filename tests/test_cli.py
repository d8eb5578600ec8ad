"""The `cirlab` command: help, recipes that parse, clear errors for bad keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cirlab.train.cli import main

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))


def _run(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "cirlab.train.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "data", "evaluate", "retrieve", "import", "demo", "demo-focallens"):
        assert f"\n  {cmd}" in out


def test_unknown_command_is_an_error(capsys):
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(REPO / "recipes")))
def test_every_recipe_parses(recipe, capsys):
    # --print_config parses the whole recipe (classes resolved, keys checked) without running anything
    with pytest.raises(SystemExit) as e:
        main(["fit", "-c", str(recipe), "--print_config"])
    assert e.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_unknown_recipe_key_names_the_key():
    # a shipped recipe by name; the misspelled key, the closest valid one and where keys are listed,
    # on one line (plus a hint), never the 50 lines of usage
    r = _run("fit", "-c", "quickstart/combiner", "--model.init_args.backbone.modle_name=x", "--print_config")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[0].startswith("cirlab fit: error: recipe key 'modle_name' does not exist")
    assert "did you mean 'model_name'" in lines[0] and "docs/recipes.md" in lines[0]


def test_unknown_key_inside_a_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (REPO / "recipes/quickstart/lincir.yaml").read_text().replace("noise: true", "nosie: true")
    bad.write_text(text)
    r = _run("fit", "-c", str(bad), "--print_config")
    assert r.returncode == 2
    assert "recipe key 'nosie' does not exist in cirlab.train.lincir_task.LinCIRTask (did you mean 'noise'?)" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) <= 2


def test_an_unknown_recipe_name_suggests_the_closest(capsys):
    assert main(["fit", "-c", "quickstart/combinr"]) == 2
    err = capsys.readouterr().err
    assert "recipe not found: 'quickstart/combinr'" in err and "did you mean 'quickstart/combiner'" in err


def test_help_starts_without_torch():
    # deferred imports: `cirlab --help` never loads torch or Lightning
    code = ("import sys; from cirlab.train.cli import main; main(['--help']); "
            "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip().endswith("[]")


def test_defaults_are_csv_logging_and_rich_progress(tmp_path, capsys):
    recipe = tmp_path / "minimal.yaml"
    recipe.write_text("model:\n  class_path: cirlab.train.clip_task.CLIPTask\n"
                      "data:\n  class_path: cirlab.data.retrieval.RetrievalDataModule\n"
                      "  init_args: {train: somewhere, kind: pair}\n")
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(recipe), "--print_config"])
    out = capsys.readouterr().out
    assert "lightning.pytorch.loggers.CSVLogger" in out
    assert "lightning.pytorch.callbacks.RichProgressBar" in out


def test_data_commands_are_wired(capsys, tmp_path):
    assert main(["data", "--help"]) == 0
    out = capsys.readouterr().out
    for cmd in ("convert", "synthetic", "fashioniq", "cirr", "circo", "mask"):
        assert cmd in out
    # a real conversion through the top-level command: one good row, one row naming a missing image
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "imgs" / "a.png")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"image": "a.png", "text": "a red square"}\n{"image": "gone.png", "text": "x"}\n')
    assert main(["data", "convert", "--kind", "pair", "--rows", str(rows), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "out")]) == 0
    from cirlab.data.shards import read_index

    assert read_index(tmp_path / "out").total == 1
    captured = capsys.readouterr()
    assert "rows.jsonl:2" in captured.out + captured.err  # the bad row, reported with file and line


def test_bf16_mixed_falls_back_to_16_mixed_on_gpus_without_bfloat16():
    from cirlab.train.cli import precision_for_device

    assert precision_for_device("bf16-mixed", on_cuda=True, bf16_supported=False) == "16-mixed"  # V100, T4
    assert precision_for_device("bf16-mixed", on_cuda=True, bf16_supported=True) == "bf16-mixed"  # A100, H100
    assert precision_for_device("bf16-mixed", on_cuda=False, bf16_supported=False) == "bf16-mixed"  # CPU autocast
    assert precision_for_device("32-true", on_cuda=True, bf16_supported=False) == "32-true"
