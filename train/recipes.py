"""Recipes that ship with the package: resolved by name (`cirlab fit -c quickstart/combiner`).

The YAML files live in the repository's recipes/ folder, installed as the package data of
`cirlab.recipes`, so a name works from any folder after `pip install cirlab`, not only in a clone.
"""

from __future__ import annotations

import difflib
import sys
from importlib import resources
from pathlib import Path
from typing import Sequence

from cirlab.errors import CirlabError

_CONFIG_FLAGS = ("-c", "--config")


def recipes_root() -> Path:
    """The folder of the shipped recipes (inside the installed package, or the clone when editable)."""
    return Path(str(resources.files("cirlab.recipes")))


def list_recipes() -> list[str]:
    """Every shipped recipe by name: `<method>/<dataset>[-<backbone>]`, without `.yaml`."""
    root = recipes_root()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_recipe(name: str) -> Path:
    """A recipe file: an existing path as given, else a shipped recipe by name (with or without .yaml)."""
    given = Path(name)
    if given.is_file():
        return given
    root = recipes_root()
    stem = name[:-5] if name.endswith(".yaml") else name
    stem = stem[len("recipes/"):] if stem.startswith("recipes/") else stem
    candidate = root / f"{stem}.yaml"
    if candidate.is_file():
        return candidate
    close = difflib.get_close_matches(stem, list_recipes(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CirlabError(f"recipe not found: {name!r} is neither a file nor a shipped recipe",
                      f"{hint}`cirlab recipes` lists the shipped ones")


def resolve_recipe_args(args: Sequence[str]) -> list[str]:
    """Command-line arguments with each `-c NAME` / `--config=NAME` turned into the recipe's path."""
    out: list[str] = []
    it = iter(range(len(args)))
    args = list(args)
    for i in it:
        a = args[i]
        if a in _CONFIG_FLAGS and i + 1 < len(args):
            out += [a, str(find_recipe(args[i + 1]))]
            next(it, None)
        elif a.startswith("--config="):
            out.append("--config=" + str(find_recipe(a.split("=", 1)[1])))
        else:
            out.append(a)
    return out


def recipes_cli(argv: Sequence[str]) -> int:
    """`cirlab recipes` lists the shipped recipes; `cirlab recipes show NAME` prints one."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: cirlab recipes [show NAME]\n\nList the recipes that ship with cirlab, or print one "
              "(copy it to start your own: cirlab recipes show combiner/custom-stage1 > my.yaml).")
        return 0
    if not argv:
        for name in list_recipes():
            print(name)
        return 0
    if argv[0] == "show" and len(argv) == 2:
        sys.stdout.write(find_recipe(argv[1]).read_text())
        return 0
    raise CirlabError(f"unknown arguments {' '.join(argv)!r}", "use `cirlab recipes` or `cirlab recipes show NAME`")
