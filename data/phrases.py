"""Phrases about each concept, for SEARLE's regulariser, behind one interface (METHODS.md "SEARLE").

Sources: a causal language model loaded with `transformers` by name or folder (the reference:
GPT-Neo-2.7B, prompt "a photo of {concept} that", sampling, max_length 35, temperature 0.5,
no_repeat_ngram_size 2, 256 phrases per concept), a user's JSONL file ({"concept", "phrases"} per
line), or templated phrases for the synthetic world. `generate_phrases` writes them once, as JSONL,
and a rerun only adds the concepts still missing. A concept any of whose phrases lacks the concept
string is dropped by the regulariser (`usable_phrases`), as in the reference.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Iterable, Optional, Protocol, Sequence

from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

PROMPT = "a photo of {} that"


class PhraseSource(Protocol):
    """Anything that turns concept names into phrases about them."""

    def phrases(self, concept: str) -> list[str]:
        """Phrases for one concept (each should contain the concept string)."""


def clean_phrase(text: str) -> str:
    """The reference's clean-up of a generated phrase: newlines -> ". ", repeated dots -> one."""
    return re.sub(r"\.+", ".", re.sub(r"\n+", ". ", text))


# ----------------------------------------------------------------------------- the placeholders
def oti_phrase(phrase: str, concept: str) -> str:
    """OTI's regulariser text: the FIRST occurrence of the concept replaced by " $ "."""
    return phrase.replace(concept, " $ ", 1)


def phi_phrase(phrase: str, concept: str) -> str:
    """phi's regulariser text: EVERY occurrence replaced by " $ " (only the first `$` gets the token)."""
    return phrase.replace(concept, " $ ")


def usable_phrases(concept_to_phrases: dict[str, list[str]]) -> tuple[dict[str, list[str]], list[str]]:
    """(kept, dropped): a concept is dropped when any of its phrases lacks the concept string (or it has none)."""
    kept, dropped = {}, []
    for concept, phrases in concept_to_phrases.items():
        if phrases and all(concept in p for p in phrases):
            kept[concept] = list(phrases)
        else:
            dropped.append(concept)
    if dropped:
        log.warning("phrases: %d of %d concepts dropped (a phrase lacks the concept), e.g. %s",
                    len(dropped), len(concept_to_phrases), ", ".join(map(repr, dropped[:5])))
    return kept, dropped


# ----------------------------------------------------------------------------- sources
class LanguageModelPhrases:
    """Phrases sampled from a causal LM (`transformers` AutoModelForCausalLM, by hub name or local folder)."""

    def __init__(self, model: str = "EleutherAI/gpt-neo-2.7B", n: int = 256, max_length: int = 35,
                 temperature: float = 0.5, no_repeat_ngram_size: int = 2, device: str = "cpu",
                 dtype: Optional[str] = None, seed: int = 0) -> None:
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as e:
            raise CirlabError("phrases from a language model need the `transformers` package",
                              "pip install transformers, or give a phrase file / 'synthetic'") from e
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            torch_dtype = getattr(torch, dtype) if dtype else None
            self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).to(device).eval()
        except OSError as e:
            raise CirlabError(f"could not load the language model {model!r} ({str(e).splitlines()[0][:200]})",
                              "give a local folder saved with save_pretrained, or a hub name reachable here") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.n, self.max_length, self.temperature = n, max_length, temperature
        self.no_repeat_ngram_size = no_repeat_ngram_size
        self.device = device
        self.seed = seed

    def phrases(self, concept: str) -> list[str]:
        import torch

        torch.manual_seed(self.seed + _stable_hash(concept))  # a rerun regenerates the same phrases
        inputs = self.tokenizer(PROMPT.format(concept), return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, do_sample=True, max_length=self.max_length,
                                      num_return_sequences=self.n, temperature=self.temperature,
                                      no_repeat_ngram_size=self.no_repeat_ngram_size,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return [clean_phrase(t) for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


class FilePhrases:
    """A user's phrases: JSONL, one {"concept": str, "phrases": [str, ...]} per line."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.table = load_phrases(self.path)

    def phrases(self, concept: str) -> list[str]:
        if concept not in self.table:
            raise CirlabError(f"phrase file {self.path} has no phrases for concept {concept!r}",
                              "add a line for it, or leave the concept out of the vocabulary")
        return self.table[concept]


class TemplatePhrases:
    """Templated phrases for the synthetic world's concepts (shapes, colours, colour-shape pairs)."""

    def __init__(self, n: int = 16, seed: int = 0, held_out: Optional[Iterable[Sequence[str]]] = None) -> None:
        from cirlab.data.synthetic import COLOURS, HELD_OUT, POSITIONS, SHAPES, SIZES

        self.n, self.seed = n, seed
        held = {tuple(c) for c in (HELD_OUT if held_out is None else held_out)}
        self.shapes, self.colours, self.sizes, self.positions = list(SHAPES), list(COLOURS), list(SIZES), list(POSITIONS)
        self.combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]

    def _thing(self, concept: str, rng: random.Random) -> str:
        """The concept as a full object name: a shape gets a colour, a colour a shape (seen pairs only)."""
        if concept in self.shapes:
            return f"{rng.choice([c for c, s in self.combos if s == concept])} {concept}"
        if concept in self.colours:
            return f"{concept} {rng.choice([s for c, s in self.combos if c == concept])}"
        return concept

    def phrases(self, concept: str) -> list[str]:
        rng = random.Random(f"{self.seed}-{concept}")
        out = []
        for _ in range(self.n):
            thing = self._thing(concept, rng)
            other = " ".join(rng.choice(self.combos))
            size, pos = rng.choice(self.sizes), rng.choice(self.positions)
            tail = rng.choice([f"is {size}", f"sits at the {pos}", f"is next to a {other}",
                               f"is {size} and at the {pos}", f"shares the picture with a {size} {other}"])
            out.append(f"a photo of a {thing} that {tail}")  # `thing` always contains the concept
        return out


def phrase_source(source: str, **kw) -> PhraseSource:
    """"synthetic" -> TemplatePhrases; an existing .jsonl file -> FilePhrases; else a language model name/folder."""
    if source == "synthetic":
        return TemplatePhrases(**{k: v for k, v in kw.items() if k in ("n", "seed", "held_out")})
    if source.endswith((".jsonl", ".json")):
        if not Path(source).is_file():
            raise CirlabError(f"phrase file {source} does not exist", "give a JSONL file of {concept, phrases}")
        return FilePhrases(source)
    return LanguageModelPhrases(source, **{k: v for k, v in kw.items() if k != "held_out"})


# ----------------------------------------------------------------------------- the batch job
def _stable_hash(text: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=4).digest(), "little")


def load_phrases(path: str | os.PathLike) -> dict[str, list[str]]:
    """concept -> phrases from a JSONL file of {"concept", "phrases"} lines."""
    path = Path(path)
    if not path.is_file():
        raise CirlabError(f"phrase file {path} does not exist", "run generate_phrases (cirlab searle phrases) first")
    table: dict[str, list[str]] = {}
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                concept, phrases = str(row["concept"]).strip(), row["phrases"]
                if not isinstance(phrases, list) or not all(isinstance(p, str) for p in phrases):
                    raise TypeError("'phrases' is not a list of strings")
            except (ValueError, KeyError, TypeError) as e:
                raise CirlabError(f"{path}, line {no}: not a phrases row ({e})",
                                  'write one {"concept": "...", "phrases": ["...", ...]} per line') from None
            table[concept] = phrases
    return table


def generate_phrases(source: str = "EleutherAI/gpt-neo-2.7B", concepts: str | list[str] = "synthetic",
                     out: str = "phrases.jsonl", n: int = 256, max_length: int = 35, temperature: float = 0.5,
                     no_repeat_ngram_size: int = 2, device: str = "cpu", dtype: Optional[str] = None,
                     seed: int = 0, held_out: Optional[list[list[str]]] = None,
                     progress: bool = True) -> dict[str, int]:
    """Write phrases for every concept of the vocabulary `concepts` to the JSONL file `out`; concepts
    already in `out` are kept (a rerun resumes). `held_out`: the synthetic world's held-out pairs
    (templated phrases never name them). Returns {"generated", "kept", "total"}."""
    from tqdm.auto import tqdm

    from cirlab.data.concepts import load_vocabulary

    names = load_vocabulary(concepts)
    path = Path(out)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a job killed mid-line: drop the partial concept, redo it
            path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")
    done = load_phrases(path) if path.is_file() else {}
    todo = [c for c in names if c not in done]
    if todo:
        src = phrase_source(source, n=n, max_length=max_length, temperature=temperature,
                            no_repeat_ngram_size=no_repeat_ngram_size, device=device, dtype=dtype, seed=seed,
                            held_out=held_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:  # one line per concept, flushed: a killed job keeps its work
            for concept in tqdm(todo, desc="phrases", unit="concept", disable=not progress, mininterval=2.0):
                f.write(json.dumps({"concept": concept, "phrases": src.phrases(concept)}) + "\n")
                f.flush()
    return {"generated": len(todo), "kept": len(names) - len(todo), "total": len(names)}
