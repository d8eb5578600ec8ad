"""`cirlab data …`: one entry point for every shard-writing command."""

from __future__ import annotations

import sys
from typing import Literal, Optional, Sequence

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
  imagenet-r  ImageNet + ImageNet-R with Pic2Word's query/target lists -> domain-conversion sets

`cirlab data <command> --help` lists each command's options.
"""


def mask_command(src: str, out: str, tagger: Literal["auto", "spacy", "lexicon"] = "auto",
                 lexicon: Optional[Literal["synthetic"]] = None, reference_quirk: bool = False,
                 processes: int = 1) -> int:
    """Keyword-mask text shards ahead of LinCIR training (so training does no tagging).

    Args:
        src: folder of text shards (with index.json)
        out: output folder
        tagger: part-of-speech tagger (auto: spaCy, else an error unless a lexicon is given)
        lexicon: word->POS table for the lexicon tagger (synthetic: the synthetic world's words)
        reference_quirk: reproduce the reference's substring replacement (see cirlab.data.masking)
        processes: spaCy tagging processes (same output for any number)
    """
    from cirlab.data.masking import KeywordMasker, mask_text_shards
    from cirlab.errors import CirlabError

    if processes < 1:
        raise CirlabError(f"--processes must be at least 1, got {processes}", "use 1 or more")
    table = None
    if lexicon == "synthetic":
        from cirlab.data.synthetic import LEXICON as table
    masker = KeywordMasker(tagger=tagger, lexicon=table, reference_quirk=reference_quirk)
    if processes > 1 and masker.tagger != "spacy":
        print(f"note: --processes applies to spaCy tagging; the {masker.tagger} tagger runs in one process")
    index = mask_text_shards(src, out, masker, processes=processes)
    print(f"masked {index.total} captions into {out} ({len(index.shards)} shards, tagger {masker.tagger})")
    return 0


def synthetic_command(out: str, seed: int = 0, scenes: int = 4000, queries: int = 400, image_size: int = 64,
                      renders: int = 3) -> int:
    """Write the synthetic world (the built-in default data).

    Args:
        out: output folder (new, empty, or an old world to rewrite)
        seed: the world's seed
        scenes: training scenes
        queries: queries per evaluation split
        image_size: image side in pixels
        renders: renderings per evaluation scene
    """
    from cirlab.data.synthetic import build_world
    from cirlab.errors import CirlabError

    small = [f"--{name} {value}" for name, value in (("scenes", scenes), ("queries", queries), ("renders", renders))
             if value < 1]
    if small:  # named by the flags typed, not by build_world's arguments
        raise CirlabError(f"{', '.join(small)}: each must be at least 1", "the defaults are --scenes 4000 "
                          "--queries 400 --renders 3; the tests' small worlds use --scenes 200 --queries 40")
    try:
        m = build_world(out, seed=seed, image_size=image_size, n_train_scenes=scenes, n_eval_queries=queries,
                        renders_per_scene=renders)
    except (ValueError, FileExistsError) as e:
        raise CirlabError(str(e), "choose another --out or other sizes") from None
    print(f"synthetic world in {m.root} ({m.seconds:.1f} s), held out: "
          + ", ".join(f"{c} {s}" for c, s in m.held_out))
    for k, v in m.counts.items():
        print(f"  {k:24s} {v}")
    return 0


def _benchmark(name: str):
    def command(root: str, out: str, splits: Optional[str] = None, maxcount: int = 1000,
                categories: str = "dress,shirt,toptee") -> int:
        from cirlab.data.benchmarks import convert_benchmark

        return convert_benchmark(name, root, out, splits, maxcount, categories)

    command.__doc__ = f"""{name}'s official files -> shards (training triplets, evaluation sets).

    Args:
        root: the benchmark's folder, in its official layout
        out: output folder for shards
        splits: comma-separated splits (default: all the benchmark has)
        maxcount: samples per shard
        categories: (fashioniq) comma-separated categories
    """
    return command


_BENCHMARKS = ("fashioniq", "cirr", "circo")

# subcommands made from typed functions (options from their signatures, `--config` files too)
_TYPED = {
    "llava": "cirlab.data.llava:convert_llava",
    "genecis": "cirlab.data.benchmarks.genecis:convert_genecis",
    "conditional": "cirlab.data.synthetic_conditional:write_conditional_set",
    "imagenet-r": "cirlab.data.benchmarks.imagenet_r:convert_imagenet_r",
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
    from cirlab.typed_commands import run_function_command

    local = {"mask": mask_command, "synthetic": synthetic_command, **{b: _benchmark(b) for b in _BENCHMARKS}}
    if cmd in local:
        return run_function_command(local[cmd], rest, f"cirlab data {cmd}")
    if cmd in _TYPED:
        import importlib

        module, name = _TYPED[cmd].split(":")
        fn = getattr(importlib.import_module(module), name)
        return run_function_command(fn, rest, f"cirlab data {cmd}", show=_show_written)
    print(f"cirlab data: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
    return 2
