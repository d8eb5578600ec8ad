"""FocalLens-CLIP (our design, METHODS.md "FocalLens"): an open_clip ViT conditioned on an instruction.

The instruction is tokenized and run through the CLIP text tower; its per-token features after
ln_final (SOT .. EOT, the causal tower's prefix encodings) are projected to the ViT width and take
part in every block of the ViT as extra tokens. The conditional embedding is the ViT's usual pooled
output over the class and patch tokens (instruction tokens are not pooled), projected as usual.

Gate, and why it is not on the attention logits: with a gate that is exactly zero at init, any gate
on logits or keys must be a -inf bias, whose gradient is zero (the gate could never open). So:
- inside the ViT's blocks the class and patch tokens never attend to instruction tokens; instruction
  tokens attend to every image token and to themselves only (so padding after a short instruction's
  EOT, and the batch's longest instruction, change nothing);
- at L + 1 points, before the first block (point 0: the projected instruction tokens as they enter the
  ViT) and after each block l (point l + 1), the instruction reaches the image tokens through
  ``gate[point] * c`` (a per-point, per-channel gate, zero-initialised, as LayerScale/Flamingo's tanh
  gates), where c is, with
  ``conditioning="xattn"`` (default), a gated cross-attention in Flamingo's manner: each image token
  (LayerNorm, query projection) attends, in a softmax of its own, to the valid instruction tokens of
  that layer (LayerNorm, key/value projections), output projection; with ``conditioning="mean"`` (the
  first design) c is the mean of the valid instruction tokens, the same vector for every image token.
With gate = 0 the image tokens run exactly the plain ViT, so the untrained model gives the plain CLIP
image feature; an empty instruction (no word between SOT and EOT) skips the instruction path
altogether, and so does a closed gate without autograd (inference of an untrained model: the result
is the same, up to float rounding, ~1e-6 at ViT-B/16). The gate receives gradient from the first
step; the projection and the cross-attention do once the gate is non-zero (as with every zero-gated
adapter). On the synthetic world (docs/focallens-synthetic.md) "xattn" gave +1.3-1.5 mAP@10 over
"mean" (two seeds) with the text tower training, and nothing with it frozen; the point before the
first block (so that both blocks of the 2-layer demo ViT work on instruction-aware tokens) gave +4.

Since inside the blocks image tokens never look at instruction tokens, only the attention is split
(`_split_block`; the blocks' linear layers and MLP see one [image, instruction] sequence, one large
product): the image tokens' attention is the plain ViT's, without a mask, so it keeps
PyTorch's fused attention kernels, and the n instruction queries attend to the S image keys plus
their own (a second, masked call of n queries: small next to S x S). The result equals open_clip's
own blocks run on one [class, instruction, patches] sequence under an (S, S) mask
(`_conditioned_masked`, kept for blocks whose attention is not a plain nn.MultiheadAttention, e.g.
LoRA-wrapped).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cirlab.models.backbone import Backbone

_SOT_ID, _EOT_ID = 49406, 49407
CONDITIONINGS = ("xattn", "mean")


class FocalLens(nn.Module):
    """The instruction projection, the cross-attention and gates of each injection point; the towers stay in the Backbone
    passed to calls."""

    def __init__(self, text_width: int, vision_width: int, vision_layers: int, heads: int = 1,
                 conditioning: str = "xattn") -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ValueError(f"conditioning must be one of {CONDITIONINGS}, got {conditioning!r}")
        if vision_width % heads:
            raise ValueError(f"vision width {vision_width} is not a multiple of heads={heads}")
        self.conditioning = conditioning
        self.instruction_proj = nn.Linear(text_width, vision_width)
        # one injection point before the first block and one after each block
        self.gate = nn.Parameter(torch.zeros(vision_layers + 1, vision_width))
        if conditioning == "xattn":
            self.cross = nn.ModuleList(CrossAttention(vision_width, heads) for _ in range(vision_layers + 1))

    @classmethod
    def for_backbone(cls, backbone: Backbone, conditioning: str = "xattn") -> "FocalLens":
        """Sized for `backbone`'s text width and ViT width/depth/heads (an open_clip VisionTransformer)."""
        vit = backbone.vision_transformer("FocalLens")
        block = vit.transformer.resblocks[0]
        heads = getattr(getattr(block, "attn", None), "num_heads", None) or 1
        return cls(backbone.token_dim, vit.transformer.width, len(vit.transformer.resblocks), int(heads), conditioning)

    def inject(self, point: int, x: torch.Tensor, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """What the instruction adds to the image tokens x (B, S, W) at injection `point`, gate applied
        (0: before the first block; l + 1: after block l).

        z: the instruction tokens at that point (B, n, W); weights (B, n, 1): 1/length on valid
        tokens, 0 on padding. "xattn": each image token attends to the valid instruction tokens;
        "mean": every image token gets the mean of the valid instruction tokens.
        """
        gate = self.gate[point].to(x.dtype)
        if self.conditioning == "xattn":
            return self.cross[point](x, z, weights.squeeze(-1) > 0, out_scale=gate)
        return gate * (z * weights).sum(dim=1, keepdim=True)

    def add_instruction(self, point: int, x: torch.Tensor, z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x + inject(point, x, z, weights), with "xattn"'s residual add fused into its last product."""
        if self.conditioning == "xattn":
            return self.cross[point](x, z, weights.squeeze(-1) > 0, out_scale=self.gate[point].to(x.dtype), residual=x)
        return x + self.inject(point, x, z, weights)

    # ------------------------------------------------------------------ instructions
    @staticmethod
    def instruction_lengths(backbone: Backbone, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens per instruction up to and including EOT; 0 for an empty instruction (no word)."""
        sot = getattr(backbone.tokenizer, "sot_token_id", _SOT_ID)
        eot = getattr(backbone.tokenizer, "eot_token_id", _EOT_ID)
        words = (tokens != 0) & (tokens != sot) & (tokens != eot)
        lengths = tokens.argmax(dim=1) + 1  # EOT has the largest id
        return torch.where(words.any(dim=1), lengths, torch.zeros_like(lengths))

    def encode_instructions(self, backbone: Backbone, instructions: Sequence[str] | torch.Tensor,
                            device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected instruction tokens (B, n, vision width), lengths (B,)) with n the longest length.

        The text tower runs without autograd when none of its parameters trains (frozen by default).
        """
        device = device or self.instruction_proj.weight.device
        tokens = instruction_tokens(backbone, instructions).to(device)
        lengths = self.instruction_lengths(backbone, tokens)
        n = max(int(lengths.max()), 1) if lengths.numel() else 1
        # each distinct instruction once (a training batch repeats the world's few questions often)
        unique, inverse = torch.unique(tokens[:, :n], dim=0, return_inverse=True)
        text_trains = any(p.requires_grad for p in backbone.text_parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and text_trains):
            feats = backbone.text_token_features(unique)  # causal: a prefix needs no later tokens
        return self.instruction_proj(feats.to(self.instruction_proj.weight.dtype))[inverse], lengths

    # ------------------------------------------------------------------ images
    def forward(self, backbone: Backbone, images: torch.Tensor,
                instructions: Sequence[str] | torch.Tensor | None) -> torch.Tensor:
        """Raw conditional image features (B, D); rows with an empty (or no) instruction = encode_image."""
        if instructions is None:
            return backbone.encode_image(images)
        instr, lengths = self.encode_instructions(backbone, instructions, images.device)
        if instr.shape[0] != images.shape[0]:
            raise ValueError(f"{instr.shape[0]} instructions for {images.shape[0]} images; pass one per image")
        return self.encode_images(backbone, images, instr, lengths)

    def encode_images(self, backbone: Backbone, images: torch.Tensor, instr: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
        """Conditional features of `images` given encoded instructions: (B, n, W) or one (1, n, W) for all."""
        if instr.shape[0] == 1 and images.shape[0] != 1:  # one instruction for a whole gallery batch
            instr, lengths = instr.expand(images.shape[0], -1, -1), lengths.expand(images.shape[0])
        non_empty = lengths > 0
        # a closed gate (all zero) lets nothing in: without autograd (nothing to learn) skip the work
        closed = not torch.is_grad_enabled() and not bool(self.gate.any())
        if closed or not bool(non_empty.any()):
            return backbone.encode_image(images)
        if bool(non_empty.all()):
            return self._conditioned(backbone, images, instr, lengths)
        # mixed batch: plain rows through the untouched path, so they equal encode_image exactly
        cond = self._conditioned(backbone, images[non_empty], instr[non_empty], lengths[non_empty])
        plain = backbone.encode_image(images[~non_empty])
        out = cond.new_empty((images.shape[0], cond.shape[1]))
        out[non_empty] = cond
        out[~non_empty] = plain.to(cond.dtype)
        return out

    @staticmethod
    def attention_mask(n_image: int, n_instr: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive (S, S) mask for [class, instruction tokens, patches]: image queries skip instruction
        keys; instruction queries see the image tokens and themselves (the fallback path's form)."""
        seq = n_image + n_instr
        is_instr = torch.zeros(seq, dtype=torch.bool, device=device)
        is_instr[1:1 + n_instr] = True
        blocked = is_instr.unsqueeze(0) & ~torch.eye(seq, dtype=torch.bool, device=device)
        mask = torch.zeros(seq, seq, dtype=dtype, device=device)
        return mask.masked_fill_(blocked, float("-inf"))

    def _conditioned(self, backbone: Backbone, images: torch.Tensor, instr: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
        vit = backbone.vision_transformer("FocalLens")
        x = vit._embeds(images)  # open_clip's own embedding (conv, class token, positions, ln_pre)
        z = vit.ln_pre(instr.to(x.dtype))
        n = z.shape[1]
        valid = (torch.arange(n, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)).to(x.dtype)
        weights = (valid / valid.sum(dim=1, keepdim=True).clamp(min=1)).unsqueeze(-1)  # (B, n, 1)
        stack = vit.transformer
        split = all(_splittable(b) for b in stack.resblocks)
        if not split:  # e.g. LoRA-wrapped attention: one sequence with the (S, S) mask, same model
            return self._conditioned_masked(vit, x, z, weights)
        s = x.shape[1]
        x = self.add_instruction(0, x, z, weights)
        for layer, block in enumerate(stack.resblocks):
            # one (B, S + n, W) sequence, image tokens first: the blocks' linear layers and MLP see
            # one large matrix instead of a second one of B * n rows (small products run far below
            # the large ones' rate: +14 % of the linear time for 4 % more rows, measured)
            seq = torch.cat([x, z], dim=1)
            if stack.grad_checkpointing and torch.is_grad_enabled():
                seq = checkpoint(_split_block, block, seq, s, use_reentrant=False)
            else:
                seq = _split_block(block, seq, s)
            x, z = seq[:, :s], seq[:, s:]
            x = self.add_instruction(layer + 1, x, z, weights)
        return _pool_project(vit, x)

    def _conditioned_masked(self, vit: nn.Module, x: torch.Tensor, z: torch.Tensor,
                            weights: torch.Tensor) -> torch.Tensor:
        """The same model as one [class, instruction, patches] sequence under an (S, S) mask (slower:
        a mask leaves PyTorch's fused attention kernels), for blocks `_split_block` cannot read."""
        n = z.shape[1]
        x = x + self.inject(0, x, z, weights)
        x = torch.cat([x[:, :1], z, x[:, 1:]], dim=1)
        mask = self.attention_mask(x.shape[1] - n, n, x.dtype, x.device)
        is_image = torch.ones(x.shape[1], 1, dtype=x.dtype, device=x.device)
        is_image[1:1 + n] = 0
        stack = vit.transformer
        for layer, block in enumerate(stack.resblocks):
            if stack.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, None, None, mask, use_reentrant=False)
            else:
                x = block(x, attn_mask=mask)
            image = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
            add = self.inject(layer + 1, image, x[:, 1:1 + n], weights).expand_as(image)  # "mean": one vector
            x = x + is_image * torch.cat([add[:, :1], add.new_zeros(add.shape[0], n, add.shape[2]), add[:, 1:]], dim=1)
        return _pool_project(vit, torch.cat([x[:, :1], x[:, 1 + n:]], dim=1))


class CrossAttention(nn.Module):
    """Image tokens (queries) attend to the valid instruction tokens (keys/values), Flamingo style;
    the caller multiplies the output by the zero-initialised per-point gate."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, z: torch.Tensor, valid: torch.Tensor,
                out_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, W) image tokens, z (B, n, W) instruction tokens, valid (B, n) bool -> (B, S, W);
        out_scale (W,): a per-channel factor on the output (the caller's gate); `residual`: returned
        plus the output (fused into the last product on the folded path)."""
        k, v = self._keys_values(z)
        bias = torch.zeros_like(valid, dtype=k.dtype).masked_fill(~valid, float("-inf"))  # (B, n)
        if self.heads * z.shape[1] < x.shape[2]:
            return self._folded(self.ln_q(x), k, v, bias, out_scale, residual)
        out = self._projected(self.ln_q(x), k, v, bias)
        out = out if out_scale is None else out * out_scale
        return out if residual is None else residual + out

    def _keys_values(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, w = z.shape
        k, v = self.kv(self.ln_kv(z)).view(b, n, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v  # (B, h, n, d) each

    def _projected(self, xq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """The textbook form: project every image token to queries, attend, project back."""
        b, s, w = xq.shape
        q = self.q(xq).view(b, s, self.heads, w // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :])
        return self.out(o.transpose(1, 2).reshape(b, s, w))

    def _folded(self, xq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                out_scale: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The same attention with the query and output projections folded into the few keys/values.

        q_h . k_j = xq . (W_q,h^T k_j) + b_q,h . k_j, and out = sum_h p_h (v W_o,h^T) + b_o: per image
        token two products of width W against h * n folded vectors instead of two W x W projections
        (h * n = 96 vs W = 768 at ViT-B/16 with 8 tokens), the reason conditional gallery encoding
        stays near the plain ViT's cost. The softmax scale, the padding mask and `out_scale` are
        applied to the small folded tensors too. Equal to `_projected` up to float rounding (tested).
        """
        b, s, w = xq.shape
        h, n, d = k.shape[1], k.shape[2], k.shape[3]
        def fold(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            # (B, h, n, d) x (h, d, W) -> (B, n*h, W) as one bmm per head (a broadcast matmul would
            # copy the weight B times); rows ordered (token, head) so that each head's softmax over
            # the n tokens runs along a strided axis with the h heads contiguous: a softmax over a
            # last axis of 8 is ~3x slower (measured)
            return (t.transpose(0, 1).reshape(h, b * n, d) @ weight).view(h, b, n, w).permute(1, 2, 0, 3).reshape(b, n * h, w)

        k = k * d ** -0.5
        keys = fold(k, self.q.weight.view(h, d, w))                                  # (B, n*h, W)
        key_bias = (k @ self.q.bias.view(h, d, 1)).squeeze(-1) + bias[:, None, :]   # (B, h, n)
        logits = torch.baddbmm(key_bias.transpose(1, 2).reshape(b, 1, n * h), xq, keys.transpose(1, 2))
        p = logits.view(b, s, n, h).softmax(dim=-2).view(b, s, n * h)
        wo, bo = self.out.weight, self.out.bias
        if out_scale is not None:
            wo, bo = wo * out_scale[:, None], bo * out_scale
        values = fold(v, wo.view(w, h, d).permute(1, 2, 0))                          # (B, n*h, W)
        if residual is None:
            return torch.baddbmm(bo.expand(b, 1, w), p, values)
        # each head's weights sum to 1 over the valid tokens, so bo / h on every folded value adds bo
        # once; the residual then enters as baddbmm's input (one pass over (B, S, W) less, measured)
        return torch.baddbmm(residual, p, values + bo / h)


def _pool_project(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ViT's own pooling (class + patch tokens only) and projection."""
    pooled, _ = vit._pool(x)
    if vit.proj is not None:
        pooled = pooled @ vit.proj
    return pooled


def _splittable(block: nn.Module) -> bool:
    """An open_clip ResidualAttentionBlock whose attention is a plain batch-first nn.MultiheadAttention."""
    attn = getattr(block, "attn", None)
    return (type(attn) is nn.MultiheadAttention and attn.batch_first and attn.in_proj_weight is not None
            and not hasattr(block, "ln_1_kv") and all(hasattr(block, m) for m in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2")))


def _split_block(block: nn.Module, seq: torch.Tensor, s: int) -> torch.Tensor:
    """One residual block over seq (B, S + n, W): S image tokens, then n instruction tokens.

    Image tokens never attend to instruction tokens, so their attention is the plain ViT's, unmasked
    (PyTorch's fused kernels); each instruction token attends to every image token and to itself,
    computed from the same projections (its n queries against S + n keys under a mask: small next to
    S x S).
    The projections and the MLP run over the whole sequence at once.
    """
    attn = block.attn
    b, t, w = seq.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(seq), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(b, t, 3, heads, w // heads).permute(2, 0, 3, 1, 4)
    # two calls write one (B, S + n, h, d) output: the image rows unmasked, as in the plain ViT (same
    # kernel, same rounding), the n instruction rows over all keys under their (n, S + n) mask; no
    # sliced copies of the keys/values and no concatenation (1.6-1.8x faster attention, measured)
    o = q.new_empty(b, t, heads, w // heads)
    o[:, :s] = F.scaled_dot_product_attention(q[:, :, :s], k[:, :, :s], v[:, :, :s]).transpose(1, 2)
    mask = _instruction_mask(s, t - s, seq.device)
    o[:, s:] = F.scaled_dot_product_attention(q[:, :, s:], k, v, attn_mask=mask).transpose(1, 2)
    o = o.view(b, t, w)
    seq = seq + block.ls_1(attn.out_proj(o))
    return seq + block.ls_2(block.mlp(block.ln_2(seq)))


def _instruction_mask(s: int, n: int, device: torch.device) -> torch.Tensor:
    """Boolean (n, S + n) mask, True = may attend: instruction query j sees the S image keys and its own."""
    allowed = torch.zeros(n, s + n, dtype=torch.bool, device=device)
    allowed[:, :s] = True
    allowed[:, s:] = torch.eye(n, dtype=torch.bool, device=device)
    return allowed


def instruction_tokens(backbone: Backbone, instructions: Sequence[str] | torch.Tensor) -> torch.Tensor:
    """Token ids (B, L) for instruction strings (None counts as empty), or the tensor as given."""
    if isinstance(instructions, torch.Tensor):
        if instructions.dim() != 2:
            raise ValueError(f"instruction tokens must be (B, L), got shape {tuple(instructions.shape)}")
        return instructions
    if isinstance(instructions, str):
        raise TypeError("pass a list of instructions (one per image), not a single string")
    return backbone.tokenize(["" if t is None else str(t) for t in instructions])
