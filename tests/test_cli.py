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
    for cmd in ("fit", "validate", "test", "data", "evaluate", "retrieve", "import", "demo"):
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
    r = _run("fit", "-c", str(REPO / "recipes/quickstart/combiner.yaml"), "--model.init_args.backbone.modle_name=x",
             "--print_config")
    assert r.returncode != 0
    assert "modle_name" in r.stderr


def test_unknown_key_inside_a_recipe_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    text = (REPO / "recipes/quickstart/lincir.yaml").read_text().replace("noise: true", "nosie: true")
    bad.write_text(text)
    r = _run("fit", "-c", str(bad), "--print_config")
    assert r.returncode != 0 and "nosie" in r.stderr


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
