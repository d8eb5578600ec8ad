"""SEARLE's phrase sources: a causal LM through `transformers` (a tiny random GPT-Neo saved here),
a user's JSONL file, and the synthetic world's templates; written once and resumed."""

from __future__ import annotations

import json

import pytest
import torch

from cirlab.data.phrases import (FilePhrases, LanguageModelPhrases, TemplatePhrases, clean_phrase,
                                 generate_phrases, load_phrases, usable_phrases)
from cirlab.errors import CirlabError


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A randomly initialised GPT-Neo and a byte-level BPE tokenizer trained here, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoConfig, GPTNeoForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["a photo of a red circle that is small.\n", "a photo of dog that runs"] * 10, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    cfg = GPTNeoConfig(vocab_size=len(fast), max_position_embeddings=64, hidden_size=32, num_layers=2, num_heads=2,
                       attention_types=[[["global", "local"], 1]], window_size=16, intermediate_size=64,
                       bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lm") / "tiny-gpt-neo"
    GPTNeoForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


def test_clean_phrase_as_the_reference():
    assert clean_phrase("a photo of dog that runs\n\nfast...and\njumps..") == "a photo of dog that runs. fast.and. jumps."


def test_language_model_phrases_use_the_reference_settings(tiny_lm):
    src = LanguageModelPhrases(tiny_lm, n=5)
    seen = {}
    generate = src.model.generate

    def recording(**kw):
        seen.update(kw)
        return generate(**kw)

    src.model.generate = recording
    out = src.phrases("red circle")
    assert len(out) == 5
    assert all(p.startswith("a photo of red circle that") for p in out)
    assert all("\n" not in p and ".." not in p for p in out)
    assert {k: seen[k] for k in ("do_sample", "max_length", "num_return_sequences", "temperature",
                                 "no_repeat_ngram_size")} == {"do_sample": True, "max_length": 35,
                                                              "num_return_sequences": 5, "temperature": 0.5,
                                                              "no_repeat_ngram_size": 2}
    tokenizer = src.tokenizer
    assert tokenizer.decode(seen["input_ids"][0]) == "a photo of red circle that"
    # defaults are the reference's: GPT-Neo-2.7B, 256 phrases per concept
    import inspect

    params = inspect.signature(LanguageModelPhrases).parameters
    assert params["model"].default == "EleutherAI/gpt-neo-2.7B" and params["n"].default == 256


def test_an_unloadable_language_model_is_one_clear_error(tmp_path):
    with pytest.raises(CirlabError, match="could not load the language model"):
        LanguageModelPhrases(str(tmp_path / "nothing-here"))


def test_generate_phrases_writes_once_and_resumes(tiny_lm, tmp_path):
    out = tmp_path / "phrases.jsonl"
    r = generate_phrases(tiny_lm, ["dog", "red circle"], str(out), n=3, progress=False)
    assert r == {"generated": 2, "kept": 0, "total": 2}
    table = load_phrases(out)
    assert list(table) == ["dog", "red circle"] and all(len(v) == 3 for v in table.values())
    # a killed job's half line is dropped and that concept redone; finished ones are kept as they were
    text = out.read_text()
    out.write_text(text + '{"concept": "cat", "phr')
    r = generate_phrases(tiny_lm, ["dog", "red circle", "cat"], str(out), n=3, progress=False)
    assert r == {"generated": 1, "kept": 2, "total": 3}
    again = load_phrases(out)
    assert again["dog"] == table["dog"] and len(again["cat"]) == 3


def test_a_users_phrase_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"concept": "owl", "phrases": ["a photo of owl that hoots"]}) + "\n")
    assert FilePhrases(path).phrases("owl") == ["a photo of owl that hoots"]
    with pytest.raises(CirlabError, match="no phrases for concept 'cat'"):
        FilePhrases(path).phrases("cat")
    out = tmp_path / "copy.jsonl"
    assert generate_phrases(str(path), ["owl"], str(out), progress=False)["generated"] == 1
    assert load_phrases(out) == {"owl": ["a photo of owl that hoots"]}
    path.write_text('{"concept": "owl", "phrases": "not a list"}\n')
    with pytest.raises(CirlabError, match="line 1"):
        load_phrases(path)


def test_synthetic_templates_name_their_concept_and_no_held_out_pair():
    from cirlab.data.concepts import synthetic_vocabulary
    from cirlab.data.synthetic import HELD_OUT

    vocab = synthetic_vocabulary()
    assert "circle" in vocab and "red" in vocab and "red circle" in vocab
    assert not any(f"{c} {s}" in vocab for c, s in HELD_OUT)
    src = TemplatePhrases(n=12, seed=0)
    table = {c: src.phrases(c) for c in vocab}
    kept, dropped = usable_phrases(table)
    assert dropped == [] and all(len(v) == 12 for v in kept.values())
    assert all(p.startswith("a photo of a ") and " that " in p for v in table.values() for p in v)
    assert not any(f"{c} {s}" in p for v in table.values() for p in v for c, s in HELD_OUT)
    assert TemplatePhrases(n=12, seed=0).phrases("red") == table["red"]  # reproducible
