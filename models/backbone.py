"""The open_clip backbone every cirlab method shares.

One class wraps an open_clip CLIP model (any open_clip name, plus cirlab's tiny configs registered at
import) and adds what the methods need: raw image/text features, the text tower with pseudo-word tokens
(Pic2Word, SEARLE, LinCIR), the vision tower with instruction tokens (FocalLens), freezing, LoRA (peft)
and a weight fingerprint for feature caches.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

import open_clip
import torch
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from cirlab.models.transforms import build_transform


#: BPE ids of the placeholder words in open_clip's CLIP tokenizer ("$</w>" and "*</w>"). Keep spaces
#: around them in prompts: "$." or "*," are single, different BPE tokens.
DOLLAR_TOKEN_ID = 259
STAR_TOKEN_ID = 265

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CIRLAB_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# scalar entries of OpenAI's JIT state dicts that are not parameters
_OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_SOT_ID, _EOT_ID = 49406, 49407


def register_model_configs(path: str | Path = MODEL_CONFIG_DIR) -> None:
    """Register cirlab's model configs (cirlab-tiny, ...) with open_clip; a no-op if already there."""
    path = Path(path)
    names = [p.stem for p in path.glob("*.json")] if path.is_dir() else [path.stem]
    if not all(n in open_clip.list_models() for n in names):
        open_clip.add_model_config(path)


register_model_configs()


# ----------------------------------------------------------------------------- checkpoint loading
def _looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.lower().endswith(_CHECKPOINT_SUFFIXES)
            or os.path.exists(value))


def _read_checkpoint(path: str) -> Any:
    """The object stored in a checkpoint file (safetensors or torch.save, weights only)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        try:  # mmap: cheap to peek at the structure before open_clip reads the file again
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"could not read checkpoint {path!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "expected a state dict saved with torch.save or safetensors") from e


def _unwrap_state_dict(obj: Any, path: str) -> tuple[dict[str, torch.Tensor], bool]:
    """(state dict, plain) where plain means open_clip's own loader reads the file as is.

    Handles {'CLIP': sd} (CLIP4Cir stage 1), {'state_dict': sd}, a DDP 'module.' prefix and the scalar
    keys of OpenAI's JIT state dicts.
    """
    plain = True
    if isinstance(obj, dict) and isinstance(obj.get("CLIP"), dict):
        obj, plain = obj["CLIP"], False
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {path!r} holds no state dict (found {type(obj).__name__}); expected an "
                         "open_clip/OpenAI state dict, optionally under 'CLIP' or 'state_dict'")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
        plain = False  # open_clip strips the prefix only when the first key has it; do it ourselves
    if any(k in obj for k in _OPENAI_EXTRA_KEYS):
        obj = {k: v for k, v in obj.items() if k not in _OPENAI_EXTRA_KEYS}
        plain = False
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path!r}: entries {bad[:5]} are not tensors; expected a state dict")
    return obj, plain


def _load_state_dict_like_open_clip(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """open_clip.load_checkpoint's steps for a state dict already in memory (same helpers, strict)."""
    from open_clip.convert import convert_state_dict

    state_dict = convert_state_dict(model, dict(state_dict))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    if "logit_scale" in state_dict and model.logit_scale.ndim != state_dict["logit_scale"].ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    if getattr(model, "logit_bias", None) is not None and "logit_bias" not in state_dict:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


class _quiet_random_init:
    """Silence open_clip's random-init warning while the weights are about to come from a file."""

    def __enter__(self):
        self.level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self.level)


def load_checkpoint_file(model: nn.Module, path: str, model_name: str = "") -> None:
    """Load a local checkpoint (open_clip, OpenAI or CLIP4Cir format, torch or safetensors) into `model`."""
    state_dict, plain = _unwrap_state_dict(_read_checkpoint(path), path)
    try:
        if plain:
            open_clip.load_checkpoint(model, path, strict=True, weights_only=True)
        else:
            _load_state_dict_like_open_clip(model, state_dict)
    except (RuntimeError, AssertionError, KeyError) as e:  # strict key/shape mismatch, pos-embed resize asserts
        first = (str(e).strip() or type(e).__name__).splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:600]
        raise ValueError(f"checkpoint {path!r} does not fit model {model_name!r}: {detail} ... Pass the model "
                         "name the checkpoint was trained with (OpenAI / CLIP4Cir weights use QuickGELU: "
                         "choose the '-quickgelu' variant, e.g. 'RN50x4-quickgelu').") from e


# ----------------------------------------------------------------------------- the backbone
class Backbone(nn.Module):
    """An open_clip model plus the encoders cirlab's methods need; all features are raw (unnormalised).

    `pretrained`: None (random init), a local checkpoint file, or an open_clip pretrained tag.
    `lora`: keyword arguments of `apply_lora` (r, alpha, dropout, towers, blocks, mlp).
    `conditioning`: build `instruction_proj` for `encode_image_conditioned` (FocalLens). Off by default so
    other methods carry no unused trainable parameters (DDP would fail on them).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, *, load_image_tower: bool = True,
                 freeze_image: bool = False, freeze_text: bool = False, grad_checkpointing: bool = False,
                 lora: dict | None = None, cache_dir: str | None = None, conditioning: bool = False) -> None:
        super().__init__()
        self.model_name = self._check_model_name(model_name)
        self.pretrained = pretrained
        self.model = self._create(self.model_name, pretrained, cache_dir)
        if grad_checkpointing:
            self.model.set_grad_checkpointing(True)

        visual = getattr(self.model, "visual", None)
        self.preprocess_cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
        size = self.preprocess_cfg.get("size", getattr(visual, "image_size", 224))
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(self.model.context_length if hasattr(self.model, "context_length")
                                  else self.model.text.context_length)
        self.embed_dim = self._find_embed_dim()
        text = self._text_parts()
        self.token_dim = int(text.token_embedding.embedding_dim) if text is not None else int(self.embed_dim)
        self.tokenizer = open_clip.get_tokenizer(self.model_name, context_length=self.context_length)
        self._lora_towers: set[str] = set()
        self.lora_config: dict | None = None

        if not load_image_tower:
            self.model.visual = None  # LinCIR trains text-only: free the image tower's memory

        self.instruction_proj: nn.Linear | None = None
        if conditioning:
            vit = self._require_vit("conditioning=True")
            if text is None:
                raise NotImplementedError(f"{self.model_name}: conditioning needs an open_clip text transformer")
            self.instruction_proj = nn.Linear(self.token_dim, vit.transformer.width)

        if freeze_image or freeze_text:
            self.set_trainable(image=not freeze_image, text=not freeze_text)
        if lora:
            self.apply_lora(**self._check_lora_kwargs(lora))

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _check_model_name(model_name: str) -> str:
        if not isinstance(model_name, str) or not model_name:
            raise ValueError(f"model_name must be a non-empty string, got {model_name!r}")
        if model_name.startswith(("hf-hub:", "local-dir:")):
            return model_name
        name = model_name.replace("/", "-")  # 'ViT-B/32' is open_clip's 'ViT-B-32'
        if open_clip.get_model_config(name) is None:
            raise ValueError(f"unknown model name {model_name!r}: open_clip.list_models() lists the known names "
                             f"(cirlab adds {', '.join(CIRLAB_MODELS)})")
        return name

    @staticmethod
    def _create(name: str, pretrained: str | None, cache_dir: str | None) -> nn.Module:
        """Build the open_clip model; weights from nothing, a local file or a tag."""
        random_init = dict(pretrained_image=False, pretrained_text=False)  # never fetch tower weights
        if name.startswith(("hf-hub:", "local-dir:")):
            try:
                return open_clip.create_model(name, cache_dir=cache_dir)
            except Exception as e:
                raise RuntimeError(f"could not build {name!r} ({e}); without network access use a local "
                                   "'local-dir:' folder or an open_clip model name with pretrained=<file>") from e
        if pretrained is None or pretrained == "":
            return open_clip.create_model(name, pretrained=None, **random_init)
        if not isinstance(pretrained, (str, os.PathLike)):
            raise ValueError(f"pretrained must be None, a file path or an open_clip tag, got {pretrained!r}")
        pretrained = os.fspath(pretrained)
        if _looks_like_path(pretrained):
            if os.path.isdir(pretrained):
                raise FileNotFoundError(f"pretrained {pretrained!r} is a directory; pass the checkpoint file inside it")
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint file not found: {pretrained!r} "
                                        "(pass an existing file, an open_clip tag, or None for random init)")
            with _quiet_random_init():  # open_clip warns "initialized randomly": the file follows
                model = open_clip.create_model(name, pretrained=None, **random_init)
            load_checkpoint_file(model, pretrained, name)
            return model
        tags = open_clip.list_pretrained_tags_by_model(name)
        clean = lambda tag: tag.lower().replace("-", "_")  # noqa: E731 -- open_clip's own tag normalisation
        if clean(pretrained) not in [clean(t) for t in tags]:
            known = f"its tags: {tags}" if tags else "it has no open_clip pretrained tags"
            raise ValueError(f"unknown pretrained tag {pretrained!r} for model {name!r}; {known}. "
                             "Or pass a local checkpoint file, or None for random init.")
        try:
            return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as e:
            raise RuntimeError(f"could not fetch the weights of {name!r} pretrained={pretrained!r} "
                               f"({str(e).splitlines()[0][:300]}). Without network access, download the "
                               "checkpoint elsewhere and pass its local path as pretrained=<file>.") from e

    @staticmethod
    def _check_lora_kwargs(lora: dict) -> dict:
        allowed = {"r", "alpha", "dropout", "towers", "blocks", "mlp"}
        unknown = set(lora) - allowed
        if unknown:
            raise ValueError(f"unknown LoRA option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        return dict(lora)

    def _find_embed_dim(self) -> int:
        cfg = open_clip.get_model_config(self.model_name) if ":" not in self.model_name else None
        if cfg and "embed_dim" in cfg:
            return int(cfg["embed_dim"])
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return int(proj.out_features)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[1])
        return int(self.model.text.output_dim)

    # ------------------------------------------------------------------ tower access
    def _text_parts(self) -> SimpleNamespace | None:
        """The text tower's pieces, for CLIP (attributes on the model) or CustomTextCLIP (`model.text`)."""
        m = self.model
        if hasattr(m, "token_embedding"):
            return SimpleNamespace(token_embedding=m.token_embedding, positional_embedding=m.positional_embedding,
                                   transformer=m.transformer, ln_final=m.ln_final, text_projection=m.text_projection,
                                   attn_mask=m.attn_mask, pool_type=m.text_pool_type,
                                   eos_id=getattr(m, "text_eos_id", None), prefix="transformer")
        text = getattr(m, "text", None)
        if isinstance(text, TextTransformer) and text.cls_emb is None and not text.use_pad_mask:
            return SimpleNamespace(token_embedding=text.token_embedding,
                                   positional_embedding=text.positional_embedding, transformer=text.transformer,
                                   ln_final=text.ln_final, text_projection=text.text_projection,
                                   attn_mask=text.attn_mask, pool_type=text.pool_type, eos_id=text.eos_id,
                                   prefix="text.transformer")
        return None

    def _require_text(self, what: str) -> SimpleNamespace:
        parts = self._text_parts()
        if parts is None:
            raise NotImplementedError(f"{what} needs an open_clip TextTransformer text tower; "
                                      f"{self.model_name!r} has {type(getattr(self.model, 'text', None)).__name__}")
        return parts

    def _require_visual(self) -> nn.Module:
        visual = getattr(self.model, "visual", None)
        if visual is None:
            raise RuntimeError("this Backbone was built with load_image_tower=False, so it has no image tower; "
                               "build it with load_image_tower=True to encode images")
        return visual

    def _require_vit(self, what: str) -> VisionTransformer:
        visual = self._require_visual()
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(f"{what} supports open_clip VisionTransformer image towers only; "
                                      f"{self.model_name!r} has {type(visual).__name__}")
        if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
            raise NotImplementedError(f"{what}: ViT variants with attentional pooling or pool_type "
                                      f"{visual.pool_type!r} are not supported")
        return visual

    def _text_modules(self) -> list[nn.Module | nn.Parameter]:
        m = self.model
        if hasattr(m, "token_embedding"):
            return [m.token_embedding, m.positional_embedding, m.transformer, m.ln_final, m.text_projection]
        return [m.text] if getattr(m, "text", None) is not None else []

    @staticmethod
    def _params_of(items: Iterable[nn.Module | nn.Parameter | None]) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for item in items:
            if isinstance(item, nn.Parameter):
                out.append(item)
            elif isinstance(item, nn.Module):
                out.extend(item.parameters())
        return out

    def image_parameters(self) -> list[nn.Parameter]:
        """Parameters of the image tower (empty without one)."""
        return self._params_of([getattr(self.model, "visual", None)])

    def text_parameters(self) -> list[nn.Parameter]:
        """Parameters of the text tower (embeddings, transformer, final LayerNorm, projection)."""
        return self._params_of(self._text_modules())

    # ------------------------------------------------------------------ tokenizer and transforms
    def tokenize(self, texts: list[str] | str) -> torch.LongTensor:
        """Token ids (B, context_length) with the model's tokenizer (longer texts are cut, EOT kept)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts))

    def transform(self, kind: str = "clip", train: bool = False, **kw: Any) -> Callable:
        """PIL image -> tensor for this model's input size and mean/std (see transforms.build_transform)."""
        kw.setdefault("mean", self.preprocess_cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        kw.setdefault("std", self.preprocess_cfg.get("std", open_clip.OPENAI_DATASET_STD))
        return build_transform(self.image_size, kind=kind, train=train, **kw)

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Raw projected image features (B, D)."""
        return self._require_visual()(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Raw projected text features (B, D)."""
        return self.model.encode_text(tokens)

    def _text_token_features(self, tokens: torch.Tensor, replace: torch.Tensor | None = None,
                             values: torch.Tensor | None = None) -> torch.Tensor:
        """Text transformer output after ln_final (B, L, width), optionally with token embeddings replaced.

        The same steps as open_clip's CLIP.encode_text up to pooling; `replace` (B, L) bool marks the
        positions whose token embedding becomes `values` (B, width), one vector per row.
        """
        t = self._require_text("text token features")
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast)
        if replace is not None:
            x = torch.where(replace.unsqueeze(-1), values.to(cast).unsqueeze(1).expand_as(x), x)
        x = x + t.positional_embedding[: x.shape[1]].to(cast)
        mask = t.attn_mask[: x.shape[1], : x.shape[1]] if t.attn_mask is not None else None
        x = t.transformer(x, attn_mask=mask)
        return t.ln_final(x)

    def _pool_project_text(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        t = self._require_text("text pooling")
        x = text_global_pool(x, tokens, t.pool_type, eos_token_id=t.eos_id)
        if t.text_projection is None:
            return x
        if isinstance(t.text_projection, nn.Linear):
            return t.text_projection(x)
        return x @ t.text_projection

    def encode_text_with_pseudo_tokens(self, tokens: torch.Tensor, pseudo: torch.Tensor,
                                       placeholder_id: int = DOLLAR_TOKEN_ID, first_only: bool = False
                                       ) -> torch.Tensor:
        """Raw text features (B, D) with the placeholder's token embedding replaced by `pseudo` (B, T).

        Every placeholder position of a row gets that row's vector (LinCIR), or only the first one
        with first_only=True (SEARLE). Gradients flow to `pseudo`.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (B, L) token ids, got shape {tuple(tokens.shape)}")
        if pseudo.dim() != 2 or pseudo.shape[0] != tokens.shape[0] or pseudo.shape[1] != self.token_dim:
            raise ValueError(f"pseudo must be (B, token_dim) = ({tokens.shape[0]}, {self.token_dim}), "
                             f"got {tuple(pseudo.shape)}")
        tokens = tokens.to(pseudo.device)
        replace = tokens == placeholder_id
        missing = (~replace.any(dim=1)).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"rows {missing[:10]} contain no placeholder token id {placeholder_id} ('$' is "
                             f"{DOLLAR_TOKEN_ID}, '*' is {STAR_TOKEN_ID}), so the pseudo token would be ignored; "
                             "put the placeholder in every text with spaces around it ('$.' is another token)")
        if first_only:
            first = replace.int().argmax(dim=1)  # index of the first True in each row
            replace = torch.zeros_like(replace)
            replace[torch.arange(tokens.shape[0], device=tokens.device), first] = True
        x = self._text_token_features(tokens, replace, pseudo)
        return self._pool_project_text(x, tokens)

    def _instruction_mask(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(non_empty (B,) bool, lengths (B,)): an instruction is empty when it has no word between SOT/EOT."""
        sot = getattr(self.tokenizer, "sot_token_id", _SOT_ID)
        eot = getattr(self.tokenizer, "eot_token_id", _EOT_ID)
        words = (tokens != 0) & (tokens != sot) & (tokens != eot)
        lengths = tokens.argmax(dim=1) + 1  # real tokens up to and including EOT (the largest id)
        return words.any(dim=1), lengths

    def encode_image_conditioned(self, images: torch.Tensor,
                                 instruction_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Raw image features (B, D) of the ViT with the instruction's text-token features as extra tokens.

        Rows whose instruction is None or empty get exactly `encode_image`'s features (FocalLens falls back
        to plain image features).
        """
        if instruction_tokens is None:
            return self.encode_image(images)
        if instruction_tokens.dim() != 2 or instruction_tokens.shape[0] != images.shape[0]:
            raise ValueError(f"instruction_tokens must be (B, L) with B = {images.shape[0]} images, "
                             f"got {tuple(instruction_tokens.shape)}")
        tokens = instruction_tokens.to(images.device)
        non_empty, lengths = self._instruction_mask(tokens)
        if not bool(non_empty.any()):
            return self.encode_image(images)
        if self.instruction_proj is None:
            raise RuntimeError("encode_image_conditioned with an instruction needs instruction_proj: build the "
                               "Backbone with conditioning=True")
        if bool(non_empty.all()):
            return self._conditioned(images, tokens, lengths)
        # mixed batch: plain rows through the untouched path, so they equal encode_image
        cond = self._conditioned(images[non_empty], tokens[non_empty], lengths[non_empty])
        plain = self.encode_image(images[~non_empty])
        out = cond.new_empty((images.shape[0], cond.shape[1]))
        out[non_empty] = cond
        out[~non_empty] = plain.to(cond.dtype)
        return out

    def _conditioned(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """open_clip's VisionTransformer.forward with instruction tokens inserted after the class token."""
        vit = self._require_vit("encode_image_conditioned")
        n_instr = int(lengths.max())
        feats = self._text_token_features(tokens[:, :n_instr])  # causal: a prefix needs no later tokens
        instr = self.instruction_proj(feats.to(self.instruction_proj.weight.dtype))

        # VisionTransformer._embeds up to (not including) ln_pre
        x = vit.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = vit.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        x = x + vit.positional_embedding.to(x.dtype)
        x = vit.patch_dropout(x)
        x = torch.cat([x[:, :1], instr.to(x.dtype), x[:, 1:]], dim=1)
        x = vit.ln_pre(x)

        mask = None
        if bool((lengths < n_instr).any()):
            # additive key-padding mask: nobody attends to instruction positions past a row's EOT
            seq = x.shape[1]
            pos = torch.arange(n_instr, device=x.device)
            pad_keys = torch.zeros(x.shape[0], seq, dtype=torch.bool, device=x.device)
            pad_keys[:, 1:1 + n_instr] = pos.unsqueeze(0) >= lengths.unsqueeze(1)
            heads = vit.transformer.resblocks[0].attn.num_heads
            mask = torch.zeros(x.shape[0], 1, seq, dtype=x.dtype, device=x.device)
            mask.masked_fill_(pad_keys.unsqueeze(1), float("-inf"))
            mask = mask.expand(-1, seq, -1).repeat_interleave(heads, dim=0)  # (B*heads, seq, seq)
        x = vit.transformer(x, attn_mask=mask)
        x = torch.cat([x[:, :1], x[:, 1 + n_instr:]], dim=1)  # pool over class + patch tokens only
        pooled, _ = vit._pool(x)
        if vit.proj is not None:
            pooled = pooled @ vit.proj
        return pooled

    # ------------------------------------------------------------------ training controls
    def set_trainable(self, image: bool, text: bool) -> None:
        """requires_grad for each tower (train mode is the task's business). logit_scale is left alone.

        On a tower with LoRA, True makes only its LoRA parameters trainable.
        """
        for tower, flag, params in (("image", image, self._named(self.image_parameters())),
                                    ("text", text, self._named(self.text_parameters()))):
            for name, p in params:
                lora_only = tower in self._lora_towers
                p.requires_grad_(bool(flag) and (not lora_only or "lora_" in name))

    def _named(self, params: list[nn.Parameter]) -> list[tuple[str, nn.Parameter]]:
        ids = {id(p) for p in params}
        return [(n, p) for n, p in self.model.named_parameters() if id(p) in ids]

    def apply_lora(self, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                   towers: Sequence[str] = ("image", "text"), blocks: Sequence[int] | None = None,
                   mlp: bool = False) -> None:
        """Add peft LoRA adapters to the attention (and with mlp=True the MLP linears) of chosen towers/blocks.

        Afterwards only the LoRA parameters of those towers are trainable (the other tower keeps its
        setting); outputs are unchanged at init because lora_B starts at zero. `blocks` are resblock
        indices (negative ones count from the end) applied in each chosen tower.
        """
        from peft import LoraConfig, inject_adapter_in_model

        if self._lora_towers:
            raise RuntimeError(f"LoRA is already applied to {sorted(self._lora_towers)}; apply it once")
        towers = [towers] if isinstance(towers, str) else list(towers)
        bad = [t for t in towers if t not in ("image", "text")]
        if bad or not towers:
            raise ValueError(f"LoRA towers must be a non-empty subset of ['image', 'text'], got {towers}")
        if int(r) < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")

        patterns = []
        for tower in towers:
            if tower == "image":
                prefix, stack = "visual.transformer", self._require_vit("LoRA on the image tower").transformer
            else:
                t = self._require_text("LoRA on the text tower")
                prefix, stack = t.prefix, t.transformer
            n = len(stack.resblocks)
            if not isinstance(stack.resblocks[0].attn, nn.MultiheadAttention):
                raise NotImplementedError(f"LoRA needs nn.MultiheadAttention blocks; the {tower} tower of "
                                          f"{self.model_name!r} uses {type(stack.resblocks[0].attn).__name__}")
            if blocks is None:
                idx = list(range(n))
            else:
                wrong = [b for b in blocks if not -n <= int(b) < n]
                if wrong:
                    raise ValueError(f"LoRA blocks {wrong} out of range for the {tower} tower ({n} blocks)")
                idx = sorted({int(b) % n for b in blocks})
            targets = "attn|mlp\\.c_fc|mlp\\.c_proj" if mlp else "attn"
            patterns.append(f"{re.escape(prefix)}\\.resblocks\\.({'|'.join(map(str, idx))})\\.({targets})")

        before = {n: p.requires_grad for n, p in self.model.named_parameters()}
        config = LoraConfig(r=int(r), lora_alpha=alpha, lora_dropout=float(dropout), bias="none",
                            target_modules="|".join(f"(?:{p})" for p in patterns))
        inject_adapter_in_model(config, self.model)
        self._lora_towers = set(towers)
        self.lora_config = dict(r=int(r), alpha=alpha, dropout=float(dropout), towers=list(towers),
                                blocks=None if blocks is None else list(blocks), mlp=bool(mlp))

        # peft freezes every non-LoRA parameter of the model: restore those outside the LoRA towers
        lora_tower_ids = set()
        if "image" in towers:
            lora_tower_ids |= {id(p) for p in self.image_parameters()}
        if "text" in towers:
            lora_tower_ids |= {id(p) for p in self.text_parameters()}
        for name, p in self.model.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
            elif id(p) in lora_tower_ids:
                p.requires_grad_(False)
            else:
                p.requires_grad_(before.get(name, p.requires_grad))

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's open_clip-format state dict with LoRA deltas merged in (loadable via pretrained=<file>)."""
        if not self._lora_towers:
            return {k: v.detach() for k, v in self.model.state_dict().items()}
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import MultiheadAttention as LoraMHA

        model = copy.deepcopy(self.model)
        done: list[str] = []
        for name, module in list(model.named_modules()):
            if not isinstance(module, LoraLayer) or any(name.startswith(d + ".") for d in done):
                continue  # e.g. the out_proj inside a LoRA MultiheadAttention, merged with it
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(module, LoraMHA):
                merged = module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None)
            else:
                module.merge()
                merged = module.get_base_layer()
            setattr(parent, child, merged)
            done.append(name)
        return {k: v.detach() for k, v in model.state_dict().items()}

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha1 over the model name and every state-dict tensor (sorted keys): the feature-cache key."""
        h = hashlib.sha1(self.model_name.encode())
        state = self.model.state_dict()
        for key in sorted(state):
            t = state[key].detach()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, embed_dim={self.embed_dim}, "
                f"token_dim={self.token_dim}, image_size={self.image_size}, lora={self.lora_config}")
