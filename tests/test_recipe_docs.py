"""docs/recipes.md documents every recipe key: each constructor argument of every task, config
section and the data module appears (in backquotes) in the section written for it."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from cirlab.data.retrieval import RetrievalDataModule
from cirlab.train.baselines import BaselineTask
from cirlab.train.classify_task import ImageClassificationTask
from cirlab.train.clip_task import CLIPTask
from cirlab.train.combiner_task import CombinerConfig, CombinerTask
from cirlab.train.config import BackboneConfig, EvalConfig, LoraConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.lincir_task import LinCIRTask, MaskingConfig

DOC = (Path(__file__).resolve().parent.parent / "docs" / "recipes.md").read_text()
SHARED = {"backbone", "optimizer", "scheduler", "evaluation"}  # documented once, in their own sections


def section(title: str) -> str:
    """The text from the heading containing ``title`` to the next heading of the same or higher level."""
    m = re.search(rf"^(#+) [^\n]*{re.escape(title)}[^\n]*$", DOC, re.MULTILINE)
    assert m, f"docs/recipes.md has no section for {title}"
    level = len(m.group(1))
    rest = DOC[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def keys(obj) -> set[str]:
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    return {p for p in inspect.signature(obj.__init__).parameters if p != "self"} - SHARED


@pytest.mark.parametrize("obj, title, prefix", [
    (CLIPTask, "clip_task.CLIPTask", ""), (ImageClassificationTask, "classify_task.ImageClassificationTask", ""),
    (CombinerTask, "combiner_task.CombinerTask", ""),
    (LinCIRTask, "lincir_task.LinCIRTask", ""), (BaselineTask, "baselines.BaselineTask", ""),
    (BackboneConfig, "model.init_args.backbone", ""),
    (RetrievalDataModule, "cirlab.data.retrieval.RetrievalDataModule", ""),
    (OptimizerConfig, "model.init_args.optimizer", "optimizer."),
    (SchedulerConfig, "model.init_args.optimizer", "scheduler."),
    (EvalConfig, "model.init_args.optimizer", "evaluation."),
])
def test_every_recipe_key_is_documented(obj, title, prefix):
    text = section(title)
    missing = sorted(k for k in keys(obj) if f"`{k}`" not in text and f"`{prefix}{k}`" not in text)
    assert not missing, f"docs/recipes.md, section {title!r}, does not document {missing}"


@pytest.mark.parametrize("obj, title", [
    (LoraConfig, "model.init_args.backbone"), (CombinerConfig, "combiner_task.CombinerTask"),
    (MaskingConfig, "lincir_task.LinCIRTask"),
])
def test_nested_section_keys_are_documented(obj, title):
    # written inline, e.g. `{r, alpha, dropout, towers, blocks}`
    text = section(title)
    missing = sorted(k for k in keys(obj) if not re.search(rf"\b{k}\b", text))
    assert not missing, f"docs/recipes.md, section {title!r}, does not document {missing}"


def _all_tasks() -> list[type]:
    """Every task class the package defines: each module of cirlab.train imported, no list kept."""
    import importlib
    import pkgutil

    import cirlab.train
    from cirlab.train.base import BaseTask

    found = []
    for info in pkgutil.iter_modules(cirlab.train.__path__):
        module = importlib.import_module(f"cirlab.train.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseTask) and obj.__module__ == module.__name__:
                found.append(obj)
    return sorted(found, key=lambda c: c.__qualname__)


def test_every_task_of_the_package_is_documented():
    from cirlab.train.base import _recipe_dataclasses
    from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig

    shared = {BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig}
    tasks = _all_tasks()
    assert {"CombinerTask", "LinCIRTask", "Pic2WordTask", "SEARLETask", "FocalLensTask"} <= {t.__name__ for t in tasks}
    for task in tasks:
        own = keys(task)
        if not own:  # a family base with only the shared sections (e.g. ComposedRetrievalTask)
            continue
        title = f"{task.__module__.removeprefix('cirlab.train.')}.{task.__name__}"
        subclasses = [t for t in tasks if t is not task and issubclass(t, task)]
        if subclasses and not re.search(rf"^#+ [^\n]*{re.escape(title)}", DOC, re.MULTILINE):
            # a family base is documented in each method's section (its keys are the method's too)
            for sub in subclasses:
                sub_text = section(f"{sub.__module__.removeprefix('cirlab.train.')}.{sub.__name__}")
                missing = sorted(k for k in own if f"`{k}`" not in sub_text)
                assert not missing, f"docs/recipes.md, section of {sub.__name__}, does not document {missing}"
            continue
        text = section(title)
        missing = sorted(k for k in own if f"`{k}`" not in text)
        assert not missing, f"docs/recipes.md, section {title!r}, does not document {missing}"
        for dc in set(_recipe_dataclasses(task)) - shared:
            nested = sorted(k for k in keys(dc) if not re.search(rf"\b{k}\b", text))
            assert not nested, f"docs/recipes.md, section {title!r}, does not document {dc.__name__}'s {nested}"
