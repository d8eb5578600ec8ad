"""FocalLens conditional encoder on tiny open_clip ViTs: exact fallback, gating, padding, gradients, LoRA."""

import pytest
import torch

from cirlab.models.backbone import Backbone
from cirlab.models.focallens import FocalLens

TINY = "cirlab-tiny"


def _images(n=3, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    bb = Backbone(TINY, freeze_text=True).eval()
    return bb, FocalLens.for_backbone(bb)


def _open_gate(fl, seed=1, scale=0.5):
    with torch.no_grad():
        fl.gate.copy_(torch.randn(fl.gate.shape, generator=torch.Generator().manual_seed(seed)) * scale)


def test_untrained_and_empty_equal_plain_clip(model):
    bb, fl = model
    img = _images(3)
    instructions = ["what colour is the circle?", "how many objects are there?", "where is it"]
    # gate = 0 at init: the computed path (autograd on, as in training) gives the plain feature ...
    torch.testing.assert_close(fl(bb, img, instructions).detach(), bb.encode_image(img).detach(), atol=1e-6, rtol=0)
    with torch.no_grad():
        plain = bb.encode_image(img)
        assert torch.equal(fl(bb, img, instructions), plain)  # ... and inference skips the closed gate
        assert torch.equal(fl(bb, img, None), plain) and torch.equal(fl(bb, img, ["", "", ""]), plain)
        gated = FocalLens.for_backbone(bb)
        _open_gate(gated)
        mixed = gated(bb, img, ["", "what colour is it", ""])
    torch.testing.assert_close(mixed[[0, 2]], plain[[0, 2]], atol=1e-6, rtol=0)  # empty rows: plain
    assert (mixed[1] - plain[1]).abs().max() > 1e-3  # an open gate lets the instruction in


def test_vit_b16_untrained_equals_plain():
    torch.manual_seed(0)
    bb = Backbone("ViT-B-16").eval()
    fl = FocalLens.for_backbone(bb)
    img = _images(2, size=224)
    with torch.no_grad():
        plain = bb.encode_image(img)
    got = fl(bb, img, ["focus on the colour of the car", "what is on the table"]).detach()  # computed path
    torch.testing.assert_close(got, plain, atol=5e-6, rtol=0)  # float rounding of the masked attention
    assert fl.gate.shape == (13, 768) and fl.instruction_proj.weight.shape == (768, 512)


def test_instructions_differ_and_padding_is_invariant(model):
    bb, _ = model
    fl = FocalLens.for_backbone(bb)
    _open_gate(fl, seed=2)
    img = _images(2)
    short, long_ = "red", "what is the colour of the big shape on the left side"
    with torch.no_grad():
        a = fl(bb, img[:1], ["what colour is it"])
        c = fl(bb, img[:1], ["where is it"])
        alone = fl(bb, img[:1], [short])
        batched = fl(bb, img, [short, long_])
        long_alone = fl(bb, img[1:], [long_])
    assert (a - c).abs().max() > 1e-4
    torch.testing.assert_close(batched[:1], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1:], long_alone, atol=1e-5, rtol=0)


def test_one_instruction_for_a_gallery_equals_per_image(model):
    bb, _ = model
    fl = FocalLens.for_backbone(bb)
    _open_gate(fl, seed=3)
    img = _images(4)
    with torch.no_grad():
        instr, lengths = fl.encode_instructions(bb, ["what colour is the square?"])
        once = fl.encode_images(bb, img, instr, lengths)
        each = fl(bb, img, ["what colour is the square?"] * 4)
    torch.testing.assert_close(once, each, atol=1e-6, rtol=0)


def _open_cross(fl, seed=8):
    """Random cross-attention weights (LayerNorm weights stay 1): a trained-looking adapter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in fl.named_parameters():
            if name.startswith("cross.") and ".ln_" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("conditioning", ["xattn", "mean"])
def test_untrained_equals_plain_for_each_conditioning(model, conditioning):
    bb, _ = model
    fl = FocalLens.for_backbone(bb, conditioning)
    _open_cross(fl)  # whatever the cross-attention holds, a closed gate lets nothing in
    img = _images(3)
    with torch.no_grad():
        plain = bb.encode_image(img)
    got = fl(bb, img, ["what colour is the circle?", "how many objects are there?", "where"]).detach()
    torch.testing.assert_close(got, plain, atol=1e-6, rtol=0)
    assert (conditioning == "xattn") == hasattr(fl, "cross")
    if conditioning == "xattn":
        assert len(fl.cross) == 3 and fl.cross[0].heads == bb.vision_transformer().transformer.resblocks[0].attn.num_heads


@pytest.mark.parametrize("n", [3, 40])  # h * n below the width: folded form; above: projected
def test_cross_attention_equals_torch_multihead_attention(n):
    # reference: torch's own nn.MultiheadAttention with the same weights and a key padding mask
    from torch import nn

    from cirlab.models.focallens import CrossAttention

    torch.manual_seed(3)
    width, heads, b, s = 32, 4, 2, 10
    cross = CrossAttention(width, heads)
    with torch.no_grad():
        for prm in cross.parameters():
            prm.copy_(torch.randn(prm.shape) * 0.3)
    x, z = torch.randn(b, s, width), torch.randn(b, n, width)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, n // 2:] = False
    ref = nn.MultiheadAttention(width, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([cross.q.weight, cross.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([cross.q.bias, cross.kv.bias]))
        ref.out_proj.weight.copy_(cross.out.weight)
        ref.out_proj.bias.copy_(cross.out.bias)
    kv = cross.ln_kv(z)
    want, _ = ref(cross.ln_q(x), kv, kv, key_padding_mask=~valid, need_weights=False)
    torch.testing.assert_close(cross(x, z, valid), want, atol=1e-5, rtol=1e-5)
    gate = torch.randn(width)
    torch.testing.assert_close(cross(x, z, valid, out_scale=gate), want * gate, atol=1e-5, rtol=1e-5)
    # the residual fused into the last product (the output bias spread over the heads' values)
    res = torch.randn(b, s, width)
    torch.testing.assert_close(cross(x, z, valid, out_scale=gate, residual=res), res + want * gate, atol=1e-5, rtol=1e-5)
    # both forms, and their gradients, agree whichever the size picks
    bias = torch.zeros(b, n).masked_fill(~valid, float("-inf"))
    folded = cross._folded(cross.ln_q(x), *cross._keys_values(z), bias)
    projected = cross._projected(cross.ln_q(x), *cross._keys_values(z), bias)
    torch.testing.assert_close(folded, projected, atol=1e-5, rtol=1e-5)
    g_f = torch.autograd.grad(folded.square().sum(), [cross.q.weight, cross.out.weight, cross.kv.weight])
    g_p = torch.autograd.grad(projected.square().sum(), [cross.q.weight, cross.out.weight, cross.kv.weight])
    for a, c in zip(g_f, g_p):
        torch.testing.assert_close(a, c, atol=1e-4, rtol=1e-4)


def test_bad_conditioning_is_refused(model):
    with pytest.raises(ValueError, match="conditioning"):
        FocalLens.for_backbone(model[0], "concat")


def test_cross_attention_is_per_token(model):
    # "xattn": image tokens receive different instruction features (the mean path adds one vector to all)
    bb, _ = model
    fl = FocalLens.for_backbone(bb)
    _open_cross(fl)
    img = _images(1)
    instr, lengths = fl.encode_instructions(bb, ["what colour is the circle?"])
    vit = bb.vision_transformer()
    x, z = vit._embeds(img), vit.ln_pre(instr)
    weights = (torch.ones(1, z.shape[1], 1) / z.shape[1])
    with torch.no_grad():
        fl.gate.fill_(1.0)
        add = fl.inject(0, x, z, weights)
    assert add.shape == x.shape and (add[0, 0] - add[0, 1]).abs().max() > 1e-3
    # padding keys are masked: appending padded instruction tokens changes nothing
    zp = torch.cat([z, torch.randn(1, 3, z.shape[2])], dim=1)
    wp = torch.cat([weights, torch.zeros(1, 3, 1)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(fl.inject(0, x, zp, wp), add, atol=1e-6, rtol=0)


@pytest.mark.parametrize("conditioning", ["xattn", "mean"])
def test_split_sequences_equal_open_clip_blocks_on_one_masked_sequence(model, conditioning):
    # the fast path keeps instruction tokens out of the image attention; the reference is open_clip's
    # own blocks over [class, instruction, patches] with the (S, S) mask: same outputs and gradients
    bb, _ = model
    fl = FocalLens.for_backbone(bb, conditioning)
    _open_gate(fl, seed=6)
    _open_cross(fl)
    img = _images(3)
    instr, lengths = fl.encode_instructions(bb, ["what colour is the circle?", "how many", "where is the big one"])
    vit = bb.vision_transformer()
    x, z = vit._embeds(img), vit.ln_pre(instr)
    valid = (torch.arange(z.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).float()
    weights = (valid / valid.sum(1, keepdim=True)).unsqueeze(-1)
    ref = fl._conditioned_masked(vit, x, z, weights)
    fast = fl.encode_images(bb, img, instr, lengths)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    params = [fl.gate, fl.instruction_proj.weight] + ([fl.cross[0].q.weight, fl.cross[1].kv.weight]
                                                      if conditioning == "xattn" else [])
    g_ref = torch.autograd.grad(ref.pow(2).sum(), params, retain_graph=True)
    g_fast = torch.autograd.grad(fast.pow(2).sum(), params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (fast - bb.encode_image(img)).abs().max() > 1e-3  # the instruction does change the result


def test_gradients_gate_projection_vision_never_frozen_text():
    torch.manual_seed(0)
    bb = Backbone(TINY, freeze_text=True).train()
    fl = FocalLens.for_backbone(bb)
    img = _images(2)
    fl(bb, img, ["what colour is the shape", "how many"]).pow(2).sum().backward()
    assert fl.gate.grad is not None and fl.gate.grad.abs().sum() > 0  # the closed gate gets gradient
    assert all(p.grad is None for p in bb.text_parameters())
    _open_gate(fl, seed=4, scale=0.1)
    fl.zero_grad(), bb.zero_grad()
    fl(bb, img, ["what colour is the shape", "how many"]).pow(2).sum().backward()
    assert fl.instruction_proj.weight.grad.abs().sum() > 0
    assert bb.model.visual.conv1.weight.grad.abs().sum() > 0
    assert bb.model.visual.transformer.resblocks[0].attn.in_proj_weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.text_parameters())


def test_lora_vision_tower():
    torch.manual_seed(0)
    bb = Backbone(TINY, freeze_text=True, lora={"r": 2, "towers": ["image"]})
    fl = FocalLens.for_backbone(bb)
    _open_gate(fl, seed=5, scale=0.1)
    fl(bb, _images(2), ["what colour", "where"]).pow(2).sum().backward()
    grads = {n: p.grad for n, p in bb.model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n and n.startswith("visual.") for n in grads)
    assert any(g.abs().sum() > 0 for n, g in grads.items() if "lora_A" in n or "lora_B" in n)


def test_resnet_is_refused():
    with pytest.raises(NotImplementedError, match="VisionTransformer"):
        FocalLens.for_backbone(Backbone("cirlab-tiny-rn"))


def test_the_point_before_the_first_block_conditions_the_blocks(model):
    # gate[0] alone open: the instruction enters before block 0 (both paths agree), and the image
    # tokens' attention in the blocks then works on instruction-aware tokens
    bb, _ = model
    fl = FocalLens.for_backbone(bb)
    _open_cross(fl)
    assert fl.gate.shape[0] == len(bb.vision_transformer().transformer.resblocks) + 1
    with torch.no_grad():
        fl.gate[0].fill_(0.5)
    img = _images(2)
    instr, lengths = fl.encode_instructions(bb, ["what colour is the circle?", "how many objects are there?"])
    vit = bb.vision_transformer()
    x, z = vit._embeds(img), vit.ln_pre(instr)
    valid = (torch.arange(z.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).float()
    weights = (valid / valid.sum(1, keepdim=True)).unsqueeze(-1)
    with torch.no_grad():
        fast = fl.encode_images(bb, img, instr, lengths)
        torch.testing.assert_close(fast, fl._conditioned_masked(vit, x, z, weights), atol=1e-5, rtol=1e-5)
        # by hand: add the gated cross-attention to the embedded tokens, then the plain ViT
        h = x + fl.cross[0](x, z, valid > 0) * 0.5
        for block in vit.transformer.resblocks:
            h = block(h)
        pooled, _ = vit._pool(h)
        torch.testing.assert_close(fast, pooled @ vit.proj, atol=1e-5, rtol=1e-5)
    assert (fast - bb.encode_image(img)).abs().max() > 1e-3
