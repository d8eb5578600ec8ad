"""Backbone checks on tiny random-init open_clip models: tokens, the pseudo-token encoder, checkpoint
formats, freezing, LoRA and errors (FocalLens's conditioned encoder: tests/test_focallens.py)."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from cirlab.models.backbone import DOLLAR_TOKEN_ID, STAR_TOKEN_ID, Backbone

TINY = "cirlab-tiny"


@pytest.fixture(scope="module")
def bb():
    torch.manual_seed(0)
    b = Backbone(TINY)
    return b.eval()


def _images(n=3, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _outputs(b, images, tokens):
    with torch.no_grad():
        return b.encode_image(images), b.encode_text(tokens)


# ----------------------------------------------------------------------------- tokenizer and basics
def test_placeholder_ids(bb):
    ids = lambda s: [i for i in bb.tokenize(s)[0].tolist() if i not in (0, 49406, 49407)]  # noqa: E731
    assert ids("$") == [DOLLAR_TOKEN_ID] == [259]
    assert ids("*") == [STAR_TOKEN_ID] == [265]
    # spaced placeholders stay separate tokens ...
    toks = ids("a photo of $ that is red")
    assert toks.count(DOLLAR_TOKEN_ID) == 1 and len(toks) == 7
    assert ids("a photo of * , red").count(STAR_TOKEN_ID) == 1
    # ... but glued punctuation merges into one different BPE token (documented in DESIGN.md)
    assert DOLLAR_TOKEN_ID not in ids("$.") and len(ids("$.")) == 1
    assert STAR_TOKEN_ID not in ids("*,") and len(ids("*,")) == 1


def test_attributes_and_shapes(bb):
    assert (bb.embed_dim, bb.token_dim, bb.image_size, bb.context_length) == (64, 64, 64, 77)
    tok = bb.tokenize(["a cat", "a dog"])
    assert tok.shape == (2, 77) and tok.dtype == torch.long
    img, txt = _outputs(bb, _images(2), tok)
    assert img.shape == (2, 64) and txt.shape == (2, 64)
    # raw features: not normalised
    assert not torch.allclose(img.norm(dim=-1), torch.ones(2))
    from PIL import Image
    x = bb.transform("targetpad")(Image.new("RGB", (200, 90), "red"))
    assert x.shape == (3, 64, 64)


def test_vit_b32_random_init_builds():
    b = Backbone("ViT-B/32")  # the slash spelling maps to open_clip's ViT-B-32
    assert b.model_name == "ViT-B-32"
    assert (b.embed_dim, b.token_dim, b.image_size) == (512, 512, 224)


# ----------------------------------------------------------------------------- pseudo tokens
@pytest.mark.parametrize("first_only", [False, True])
@pytest.mark.parametrize("placeholder", [DOLLAR_TOKEN_ID, STAR_TOKEN_ID])
def test_pseudo_token_identity_equals_encode_text(bb, first_only, placeholder):
    ch = "$" if placeholder == DOLLAR_TOKEN_ID else "*"
    tok = bb.tokenize([f"a photo of {ch} that is red", f"{ch} and {ch} together", f"{ch}"])
    own = bb.model.token_embedding.weight[placeholder].detach()
    pseudo = own.unsqueeze(0).repeat(3, 1)
    with torch.no_grad():
        got = bb.encode_text_with_pseudo_tokens(tok, pseudo, placeholder, first_only=first_only)
        ref = bb.encode_text(tok)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_pseudo_token_gradient_and_effect(bb):
    tok = bb.tokenize(["a photo of $ that is red", "$ on a table"])
    pseudo = torch.randn(2, bb.token_dim, requires_grad=True)
    out = bb.encode_text_with_pseudo_tokens(tok, pseudo)
    out.pow(2).sum().backward()
    assert pseudo.grad is not None and pseudo.grad.abs().sum() > 0
    assert pseudo.grad[0].abs().sum() > 0 and pseudo.grad[1].abs().sum() > 0
    with torch.no_grad():
        plain = bb.encode_text(tok)
    assert (out.detach() - plain).abs().max() > 1e-3  # the pseudo vector really enters


def test_first_only_replaces_only_the_first(bb):
    g = torch.Generator().manual_seed(1)
    pseudo = torch.randn(2, bb.token_dim, generator=g) * 0.1
    two = bb.tokenize(["a $ and $ together", "$ near $"])
    with torch.no_grad():
        first = bb.encode_text_with_pseudo_tokens(two, pseudo, first_only=True)
        every = bb.encode_text_with_pseudo_tokens(two, pseudo, first_only=False)
        # same texts with the first placeholder spelled '*': replacing '*' leaves the second '$' as '$'
        star = bb.tokenize(["a * and $ together", "* near $"])
        ref = bb.encode_text_with_pseudo_tokens(star, pseudo, STAR_TOKEN_ID, first_only=False)
    torch.testing.assert_close(first, ref, atol=1e-6, rtol=0)
    assert (first - every).abs().max() > 1e-4


def test_pseudo_token_missing_placeholder_raises(bb):
    tok = bb.tokenize(["a photo of $ that is red", "a photo of $. that"])  # '$.' is a different token
    with pytest.raises(ValueError, match=r"rows \[1\] contain no placeholder token id 259"):
        bb.encode_text_with_pseudo_tokens(tok, torch.zeros(2, bb.token_dim))
    with pytest.raises(ValueError, match="pseudo must be"):
        bb.encode_text_with_pseudo_tokens(tok[:1], torch.zeros(1, bb.token_dim + 1))


# ----------------------------------------------------------------------------- checkpoints
def _tiny_and_state(seed=3):
    torch.manual_seed(seed)
    b = Backbone(TINY).eval()
    return b, {k: v.clone() for k, v in b.model.state_dict().items()}


@pytest.mark.parametrize("fmt", ["plain", "clip4cir", "module_state_dict", "safetensors"])
def test_checkpoint_roundtrip(tmp_path, fmt):
    b, sd = _tiny_and_state()
    img, tok = _images(2), b.tokenize(["a red cube", "two blue spheres"])
    ref_img, ref_txt = _outputs(b, img, tok)
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt")
    if fmt == "plain":
        torch.save(sd, path)
    elif fmt == "clip4cir":
        torch.save({"epoch": 3, "CLIP": sd}, path)
    elif fmt == "module_state_dict":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    torch.manual_seed(99)  # a different random init that the checkpoint must overwrite
    loaded = Backbone(TINY, str(path)).eval()
    got_img, got_txt = _outputs(loaded, img, tok)
    assert torch.equal(got_img, ref_img) and torch.equal(got_txt, ref_txt)
    assert loaded.fingerprint() == b.fingerprint()


def test_openai_format_state_dict_loads(tmp_path):
    # OpenAI's released state dicts: fp16 tensors, OpenAI key names (open_clip's CLIP keeps them) and the
    # JIT scalars input_resolution / context_length / vocab_size; CLIP4Cir wraps them under 'CLIP'
    b, sd = _tiny_and_state(seed=4)
    openai_sd = {k: v.half() for k, v in sd.items()}
    for k in ("visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight",
              "transformer.resblocks.1.mlp.c_fc.weight", "token_embedding.weight", "ln_final.weight",
              "text_projection", "visual.proj", "visual.class_embedding", "logit_scale"):
        assert k in openai_sd
    openai_sd.update(input_resolution=torch.tensor(64), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))
    torch.save(openai_sd, tmp_path / "openai.pt")
    loaded = Backbone(TINY, str(tmp_path / "openai.pt")).eval()
    for k, v in loaded.model.state_dict().items():
        assert v.dtype == torch.float32
        torch.testing.assert_close(v, sd[k].half().float(), atol=0, rtol=0)
    torch.save({"CLIP": openai_sd}, tmp_path / "clip4cir.pt")
    again = Backbone(TINY, str(tmp_path / "clip4cir.pt")).eval()
    assert again.fingerprint() == loaded.fingerprint()


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    other = Backbone("cirlab-small")
    torch.save(other.model.state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="does not fit model 'cirlab-tiny'"):
        Backbone(TINY, str(tmp_path / "small.pt"))


# ----------------------------------------------------------------------------- bad input
def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model name 'ViT-Q-99'.*open_clip\.list_models\(\)"):
        Backbone("ViT-Q-99")


def test_missing_checkpoint_file(tmp_path):
    missing = str(tmp_path / "nope" / "clip.pt")
    with pytest.raises(FileNotFoundError, match="not found: '.*nope/clip.pt'"):
        Backbone(TINY, missing)
    with pytest.raises(FileNotFoundError, match="weights.safetensors"):
        Backbone(TINY, "weights.safetensors")


def test_unknown_tag_lists_tags():
    with pytest.raises(ValueError, match=r"unknown pretrained tag 'laion9000'.*'openai'"):
        Backbone("ViT-B-32", "laion9000")
    with pytest.raises(ValueError, match="no open_clip pretrained tags"):
        Backbone(TINY, "openai")


def test_tag_download_failure_is_explained(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # as on this machine, without the retries
    with pytest.raises(RuntimeError, match="could not fetch the weights of 'RN50'.*local path"):
        Backbone("RN50", "openai", cache_dir=str(tmp_path))


# ----------------------------------------------------------------------------- freezing, towers
def test_set_trainable_text_only():
    b = Backbone(TINY)
    b.set_trainable(image=False, text=True)
    trainable = {n for n, p in b.model.named_parameters() if p.requires_grad}
    text = {n for n, p in b.model.named_parameters() if not n.startswith("visual.") and n != "logit_scale"}
    assert trainable == text | {"logit_scale"}  # logit_scale is left as it was
    assert all(not p.requires_grad for p in b.model.visual.parameters())
    b.set_trainable(image=True, text=False)
    assert all(p.requires_grad for p in b.model.visual.parameters())
    assert not any(p.requires_grad for p in b.text_parameters())
    frozen = Backbone(TINY, freeze_image=True, freeze_text=True)
    assert [n for n, p in frozen.model.named_parameters() if p.requires_grad] == ["logit_scale"]


def test_no_image_tower():
    b = Backbone(TINY, load_image_tower=False)
    assert b.model.visual is None
    assert not any(n.startswith("visual.") for n, _ in b.model.named_parameters())
    assert b.image_size == 64
    with pytest.raises(RuntimeError, match="load_image_tower=False"):
        b.encode_image(_images(1))
    assert b.encode_text(b.tokenize("a red cube")).shape == (1, 64)


def test_grad_checkpointing_same_output():
    torch.manual_seed(5)
    a = Backbone(TINY)
    b = copy.deepcopy(a)
    b.model.set_grad_checkpointing(True)
    c = Backbone(TINY, grad_checkpointing=True)
    assert c.model.transformer.grad_checkpointing and c.model.visual.transformer.grad_checkpointing
    img = _images(2)
    torch.testing.assert_close(a.encode_image(img), b.encode_image(img), atol=1e-6, rtol=0)


def test_resnet_tiny_has_batchnorm():
    b = Backbone("cirlab-tiny-rn")
    bns = [m for m in b.model.visual.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and b.encode_image(_images(2)).shape == (2, 64)


def test_fingerprint_stable_and_sensitive():
    torch.manual_seed(6)
    b = Backbone(TINY)
    fp = b.fingerprint()
    assert fp == b.fingerprint() and len(fp) == 40
    with torch.no_grad():
        b.model.visual.proj[0, 0] += 1e-3
    assert b.fingerprint() != fp


# ----------------------------------------------------------------------------- LoRA
def test_lora_trainable_init_and_step():
    torch.manual_seed(7)
    b = Backbone(TINY)
    img, tok = _images(2), b.tokenize(["a red cube", "a blue ball"])
    ref_img, ref_txt = _outputs(b, img, tok)
    base = {k: v.clone() for k, v in b.model.state_dict().items()}
    b.apply_lora(r=4, alpha=8, towers=("image", "text"))
    trainable = [n for n, p in b.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable if n != "logit_scale")
    assert any(n.startswith("visual.") for n in trainable) and any(n.startswith("transformer.") for n in trainable)
    new_img, new_txt = _outputs(b, img, tok)
    # equal up to float rounding: the wrapped attention skips torch's fused inference path
    torch.testing.assert_close(new_img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(new_txt, ref_txt, atol=1e-5, rtol=0)

    opt = torch.optim.SGD([p for p in b.model.parameters() if p.requires_grad], lr=0.5)
    loss = b.encode_image(img).pow(2).sum() + b.encode_text(tok).pow(2).sum()
    loss.backward()
    assert all(p.grad is not None for n, p in b.model.named_parameters() if "lora_B" in n)
    opt.step()
    merged = b.merged_state_dict()
    state = {k: v for k, v in b.model.state_dict().items() if "lora_" not in k}
    for k, v in state.items():  # peft's base_layer copies are the untouched originals
        orig = k.replace(".base_layer", "")
        assert torch.equal(v, base[orig]), k
    after_img, after_txt = _outputs(b, img, tok)
    assert (after_img - ref_img).abs().max() > 1e-4 and (after_txt - ref_txt).abs().max() > 1e-4
    # the merged open_clip state dict has the original keys and reproduces the LoRA model
    assert set(merged) == set(base)
    plain = Backbone(TINY)
    plain.model.load_state_dict(merged)
    m_img, m_txt = _outputs(plain, img, tok)
    torch.testing.assert_close(m_img, after_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(m_txt, after_txt, atol=1e-5, rtol=0)


def test_lora_restricted_to_tower_and_blocks():
    b = Backbone(TINY, lora={"r": 2, "towers": ["image"], "blocks": [-1], "mlp": True})
    lora = [n for n, _ in b.model.named_parameters() if "lora_" in n]
    assert lora and all(n.startswith("visual.transformer.resblocks.1.") for n in lora)
    assert any(".mlp.c_fc." in n for n in lora)
    # the text tower keeps its own setting (trainable), the image tower's base weights are frozen
    assert all(p.requires_grad for p in b.text_parameters())
    assert [n for n, p in b.model.visual.named_parameters() if p.requires_grad] == \
        [n[len("visual."):] for n in lora]
    with pytest.raises(ValueError, match="unknown LoRA option"):
        Backbone(TINY, lora={"rank": 2})
    with pytest.raises(ValueError, match="out of range"):
        Backbone(TINY, lora={"blocks": [5]})


def test_encode_text_skips_the_padding_and_equals_open_clip(bb):
    """The cut after the batch's last end token changes nothing: open_clip's own encode_text on the
    full 77 positions gives the same features; the transformer really runs the short sequence."""
    texts = ["a red circle", "a photo of a large blue square at the top left and a small green circle"]
    tokens = bb.tokenize(texts)
    lengths = []
    hook = bb.model.transformer.register_forward_hook(lambda m, i, o: lengths.append(i[0].shape[1]))
    try:
        with torch.no_grad():
            ours = bb.encode_text(tokens)
            theirs = bb.model.encode_text(tokens)
    finally:
        hook.remove()
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    # our call: 1 + 17 words + end token; open_clip's: the whole context
    assert lengths == [int(tokens[1].argmax()) + 1, 77] and lengths[0] < 25


def test_tokenize_keeps_rows_of_distinct_texts_and_still_counts_every_cut_text():
    from cirlab.models.text_context import cut_text_summaries, reset_monitors

    reset_monitors()
    b = Backbone("cirlab-tiny")
    long = "a large red circle at the top left " * 12  # 98 tokens: past the 77-token context
    first = ["a red circle", long, "a red circle", ""]
    second = [long, "a blue square", long]
    for texts in (first, second, first):
        assert torch.equal(b.tokenize(texts), b.tokenizer(texts))  # the tokenizer's own rows, in order
    assert len(b._token_rows) == 4  # each distinct text tokenized once
    # every occurrence of the long text is counted, cached or not: 1 + 2 + 1 of 4 + 3 + 4 texts
    assert cut_text_summaries() == ["4 of 11 texts were longer than the 77-token context and were cut "
                                    f"(the longest had {len(b.tokenizer.encode(long)) + 2} tokens)"]
    reset_monitors()
