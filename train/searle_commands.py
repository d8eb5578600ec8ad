"""`cirlab searle concepts|phrases|oti`: SEARLE's three batch jobs before `cirlab fit` (recipes/searle/).

Each subcommand is a typed function (options from its signature and docstring, `--config` YAML too)
over the library functions in cirlab.data.concepts, cirlab.data.phrases and cirlab.train.oti. Under
torchrun/srun (torch.distributed initialised, or --rank/--world_size) each rank takes every
world_size-th image shard; a rerun skips shards (and concepts) already written.
"""

from __future__ import annotations

from typing import Optional, Sequence

from cirlab.train.oti import OTIConfig

USAGE = """usage: cirlab searle <command> [options]

  concepts   each image's top-k concepts of a vocabulary (24-template CLIP text features), beside the shards
  phrases    phrases per concept: a causal LM (GPT-Neo-2.7B by default), your JSONL file, or 'synthetic'
  oti        optimisation-based textual inversion: one pseudo-token per image, written per image shard

`cirlab searle <command> --help` lists each command's options.
"""


def concepts_command(images: str, vocabulary: str = "synthetic", out: Optional[str] = None,
                     model_name: str = "ViT-B-32-quickgelu", pretrained: Optional[str] = "openai", k: int = 250,
                     batch_size: int = 32, image_transform: str = "targetpad", device: str = "cpu",
                     rank: Optional[int] = None, world_size: Optional[int] = None) -> int:
    """Each image's top-k concepts, as JSONL files beside the image shards.

    Args:
        images: image shard folder (with index.json)
        vocabulary: concept names: 'synthetic', a .csv (column DisplayName: Open Images'
            oidv7-class-descriptions.csv), a .txt (one per line) or a .json list
        out: output folder (default: IMAGES/concepts)
        model_name: open_clip model name
        pretrained: open_clip tag or local checkpoint file
        k: concepts kept per image (the reference: 250)
        batch_size: images per forward pass
        image_transform: clip | targetpad | squarepad (the reference: targetpad)
        device: cpu | cuda | cuda:N
        rank: this process's rank (default: torch.distributed's, else 0)
        world_size: number of ranks (default: torch.distributed's, else 1)
    """
    from cirlab.data.concepts import compute_concepts

    r = compute_concepts(images, vocabulary, out, model_name, pretrained, k, batch_size, image_transform, device,
                         rank, world_size)
    print(f"concepts in {r['out']}: {len(r['written'])} shard(s) written, {len(r['skipped'])} already there")
    return 0


def phrases_command(source: str = "EleutherAI/gpt-neo-2.7B", concepts: str = "synthetic",
                    out: str = "phrases.jsonl", n: int = 256, max_length: int = 35, temperature: float = 0.5,
                    no_repeat_ngram_size: int = 2, device: str = "cpu", dtype: Optional[str] = None,
                    seed: int = 0) -> int:
    """Phrases for every concept, written once to a JSONL file (a rerun adds the missing concepts).

    Args:
        source: a causal LM for transformers (hub name or local folder), a JSONL file of
            {"concept", "phrases"} lines, or 'synthetic' (the synthetic world's templates)
        concepts: the vocabulary (as for `cirlab searle concepts`)
        out: output JSONL file
        n: phrases per concept (the reference: 256)
        max_length: generated length in LM tokens, prompt included (the reference: 35)
        temperature: sampling temperature (the reference: 0.5)
        no_repeat_ngram_size: (the reference: 2)
        device: cpu | cuda
        dtype: the LM's weights dtype, e.g. float16 (default: as saved)
        seed: sampling seed (per concept, so a rerun regenerates the same phrases)
    """
    from cirlab.data.phrases import generate_phrases

    r = generate_phrases(source, concepts, out, n, max_length, temperature, no_repeat_ngram_size, device, dtype, seed)
    print(f"phrases in {out}: {r['generated']} concept(s) generated, {r['kept']} already there")
    return 0


def oti_command(images: str, out: str, concepts: Optional[str] = None, phrases: Optional[str] = None,
                model_name: str = "ViT-B-32-quickgelu", pretrained: Optional[str] = "openai",
                oti: Optional[OTIConfig] = None, image_transform: str = "targetpad", device: str = "cpu",
                cache_dir: Optional[str] = None, rank: Optional[int] = None,
                world_size: Optional[int] = None) -> int:
    """OTI tokens for every image, one safetensors file per image shard (a rerun skips finished shards).

    Args:
        images: image shard folder (with index.json)
        out: output folder
        concepts: the folder `cirlab searle concepts` wrote (default: IMAGES/concepts)
        phrases: the JSONL file `cirlab searle phrases` wrote (needed unless --oti.lambda_reg 0)
        model_name: open_clip model name
        pretrained: open_clip tag or local checkpoint file
        oti: OTI settings (--oti.steps, --oti.lr, --oti.batch_size, --oti.precision, ...; the reference's by default)
        image_transform: clip | targetpad | squarepad (the reference: targetpad)
        device: cpu | cuda | cuda:N
        cache_dir: the original phrases' features (default: OUT/feature_cache)
        rank: this process's rank (default: torch.distributed's, else 0)
        world_size: number of ranks (default: torch.distributed's, else 1)
    """
    from cirlab.train.oti import run_oti

    r = run_oti(images, out, model_name, pretrained, concepts, phrases, oti, image_transform, device, cache_dir,
                rank, world_size)
    print(f"OTI tokens in {r['out']}: {len(r['written'])} shard(s) written, {len(r['skipped'])} already there")
    return 0


_COMMANDS = {"concepts": concepts_command, "phrases": phrases_command, "oti": oti_command}


def searle_cli(argv: Sequence[str]) -> int:
    """`cirlab searle <command> …`."""
    from cirlab.typed_commands import run_function_command

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    fn = _COMMANDS.get(argv[0])
    if fn is None:
        from cirlab.errors import CirlabError

        raise CirlabError(f"unknown searle command {argv[0]!r}", f"one of: {', '.join(_COMMANDS)}")
    return run_function_command(fn, argv[1:], f"cirlab searle {argv[0]}")
