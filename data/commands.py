"""`cirlab data …`: one entry point for every shard-writing command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

USAGE = """usage: cirlab data <command> [options]

  convert     JSONL/CSV rows + an image folder -> pair, image, text, triplet or instruction shards;
              --kind evalset: a queries file + a gallery folder -> an evaluation set
  synthetic   write the synthetic world (the built-in default data)
  fashioniq   FashionIQ's official files -> training triplets + per-category evaluation sets
  cirr        CIRR's official files -> training triplets + evaluation sets (+ test1 for submissions)
  circo       CIRCO's official files + COCO unlabeled images -> evaluation sets
  mask        add LinCIR's keyword-masked form to text shards (so training does no tagging)
  llava       a LLaVA visual-instruction JSON file + its images -> instruction shards (FocalLens)
  genecis     one GeneCIS task's json + COCO / Visual Genome images -> an evaluation set
  conditional the synthetic world's conditional-retrieval evaluation set (FocalLens)

`cirlab data <command> --help` lists each command's options.
"""


def mask_cli(argv: Sequence[str]) -> int:
    from cirlab.data.masking import KeywordMasker, mask_text_shards

    p = argparse.ArgumentParser(prog="cirlab data mask", description="Keyword-mask text shards ahead of LinCIR training.")
    p.add_argument("--src", required=True, help="folder of text shards (with index.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--tagger", default="auto", choices=["auto", "spacy", "lexicon"])
    p.add_argument("--lexicon", default=None, choices=[None, "synthetic"],
                   help="word->POS table for the lexicon tagger (synthetic: the synthetic world's words)")
    p.add_argument("--reference-quirk", action="store_true",
                   help="reproduce the reference's substring replacement (see cirlab.data.masking)")
    p.add_argument("--processes", type=int, default=1,
                   help="spaCy tagging processes (default 1; same output for any number)")
    a = p.parse_args(list(argv))
    if a.processes < 1:
        p.error(f"--processes must be at least 1, got {a.processes}")
    lexicon = None
    if a.lexicon == "synthetic":
        from cirlab.data.synthetic import LEXICON as lexicon
    masker = KeywordMasker(tagger=a.tagger, lexicon=lexicon, reference_quirk=a.reference_quirk)
    if a.processes > 1 and masker.tagger != "spacy":
        print(f"note: --processes applies to spaCy tagging; the {masker.tagger} tagger runs in one process")
    index = mask_text_shards(a.src, a.out, masker, processes=a.processes)
    print(f"masked {index.total} captions into {a.out} ({len(index.shards)} shards, tagger {masker.tagger})")
    return 0


# subcommands made from typed functions (options from their signatures, `--config` files too)
_TYPED = {
    "llava": "cirlab.data.llava:convert_llava",
    "genecis": "cirlab.data.benchmarks.genecis:convert_genecis",
    "conditional": "cirlab.data.synthetic_conditional:write_conditional_set",
}


def _show_written(result: object) -> None:
    """A report's summary, or what an evaluation set holds."""
    if hasattr(result, "summary"):
        print(result.summary())
    elif hasattr(result, "queries") and hasattr(result, "gallery"):
        print(f"wrote {result.queries.total} queries and {result.gallery.total} gallery images to {result.root}")


def cli(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "convert":
        from cirlab.data.convert import cli as convert_cli

        return convert_cli(rest)
    if cmd == "mask":
        return mask_cli(rest)
    if cmd in _TYPED:
        from cirlab.typed_commands import run_function_command

        module, name = _TYPED[cmd].split(":")
        import importlib

        fn = getattr(importlib.import_module(module), name)
        return run_function_command(fn, rest, f"cirlab data {cmd}", show=_show_written)
    if cmd in ("synthetic", "fashioniq", "cirr", "circo"):
        from cirlab.data.benchmarks import cli as benchmarks_cli

        return benchmarks_cli(argv)
    print(f"cirlab data: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
