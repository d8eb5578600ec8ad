"""The open_clip backbone every cirlab method shares.

One class wraps an open_clip CLIP model (any open_clip name, plus cirlab's tiny configs registered at
import) and adds what the methods need: raw image/text features, the text tower with pseudo-word tokens
(Pic2Word, SEARLE, LinCIR), per-token text features, freezing and a weight fingerprint for feature
caches. Checkpoint files are read by `cirlab.models.loading`, LoRA lives in `cirlab.models.lora`, and
FocalLens's instruction-conditioned image encoder in `cirlab.models.focallens`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

import open_clip
import torch
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from cirlab.errors import CirlabError
from cirlab.models import lora as _lora
from cirlab.models.loading import load_into_open_clip, looks_like_path, quiet_random_init
from cirlab.models.text_context import note_cut_texts, token_counts
from cirlab.models.transforms import build_transform


#: BPE ids of the placeholder words in open_clip's CLIP tokenizer ("$</w>" and "*</w>"). Keep spaces
#: around them in prompts: "$." or "*," are single, different BPE tokens.
DOLLAR_TOKEN_ID = 259
STAR_TOKEN_ID = 265

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CIRLAB_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))


def register_model_configs(path: str | Path = MODEL_CONFIG_DIR) -> None:
    """Register cirlab's model configs (cirlab-tiny, ...) with open_clip; a no-op if already there."""
    path = Path(path)
    names = [p.stem for p in path.glob("*.json")] if path.is_dir() else [path.stem]
    if not all(n in open_clip.list_models() for n in names):
        open_clip.add_model_config(path)


register_model_configs()


# re-exported for callers of the old names (the one reader lives in cirlab.models.loading)
load_checkpoint_file = load_into_open_clip


# ----------------------------------------------------------------------------- the backbone
# distinct texts whose token ids a Backbone keeps (~0.8 KB each); past this the table starts afresh
_TOKEN_CACHE_TEXTS = 32768


def hash_state(h: "hashlib._Hash", state: dict[str, torch.Tensor]) -> None:
    """Feed every tensor of a state dict (sorted keys: name, dtype, shape, bytes) into the hash `h`."""
    for key in sorted(state):
        t = state[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


class WeightsFetchError(CirlabError, RuntimeError):
    """Pretrained weights that could not be fetched (no network, a hub error): one line, with the way out."""


class UnknownPretrainedError(CirlabError, ValueError):
    """A pretrained tag open_clip does not know for this model."""

class Backbone(nn.Module):
    """An open_clip model plus the encoders cirlab's methods need; all features are raw (unnormalised).

    `pretrained`: None (random init), a local checkpoint file, or an open_clip pretrained tag.
    `lora`: keyword arguments of `apply_lora` (r, alpha, dropout, towers, blocks, mlp).
    """

    def __init__(self, model_name: str, pretrained: str | None = None, *, load_image_tower: bool = True,
                 freeze_image: bool = False, freeze_text: bool = False, grad_checkpointing: bool = False,
                 lora: dict | None = None, cache_dir: str | None = None) -> None:
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
        self._token_rows: dict[str, tuple[torch.Tensor, int]] = {}  # text -> (ids, tokens needed); see tokenize
        self._lora_towers: set[str] = set()
        self.lora_config: dict | None = None

        if not load_image_tower:
            self.model.visual = None  # LinCIR trains text-only: free the image tower's memory

        if freeze_image or freeze_text:
            self.set_trainable(image=not freeze_image, text=not freeze_text)
        if lora:
            self.apply_lora(**_lora.check_lora_options(lora))

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
                raise WeightsFetchError(f"could not build {name!r} ({str(e).splitlines()[0][:300]})",
                                        "without network access use a local 'local-dir:' folder, or an open_clip "
                                        "model name with pretrained=<file>") from e
        if pretrained is None or pretrained == "":
            return open_clip.create_model(name, pretrained=None, **random_init)
        if not isinstance(pretrained, (str, os.PathLike)):
            raise ValueError(f"pretrained must be None, a file path or an open_clip tag, got {pretrained!r}")
        pretrained = os.fspath(pretrained)
        if looks_like_path(pretrained):
            if os.path.isdir(pretrained):
                raise FileNotFoundError(f"pretrained {pretrained!r} is a directory; pass the checkpoint file inside it")
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(f"pretrained checkpoint file not found: {pretrained!r} "
                                        "(pass an existing file, an open_clip tag, or None for random init)")
            with quiet_random_init():  # open_clip warns "initialized randomly": the file follows
                model = open_clip.create_model(name, pretrained=None, **random_init)
            load_into_open_clip(model, pretrained, name)
            return model
        tags = open_clip.list_pretrained_tags_by_model(name)
        clean = lambda tag: tag.lower().replace("-", "_")  # noqa: E731 -- open_clip's own tag normalisation
        if clean(pretrained) not in [clean(t) for t in tags]:
            known = f"its tags: {tags}" if tags else "it has no open_clip pretrained tags"
            raise UnknownPretrainedError(f"unknown pretrained tag {pretrained!r} for model {name!r}; {known}",
                                         "or pass a local checkpoint file, or None for random init")
        try:
            return open_clip.create_model(name, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as e:
            raise WeightsFetchError(f"could not fetch the weights of {name!r} pretrained={pretrained!r} "
                                    f"({str(e).splitlines()[0][:300]})",
                                    "without network access, download the checkpoint elsewhere and pass its "
                                    "local path as pretrained=<file>") from e

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
        texts = list(texts)
        # Each distinct text is tokenized once (CLIP's BPE is Python: ~0.4 ms a caption, a fifth of a
        # tiny CLIP's training step, and an epoch repeats every caption); the rows are the tokenizer's own.
        rows = self._token_rows
        new = [t for t in dict.fromkeys(texts) if t not in rows]
        if new:
            if len(rows) + len(new) > _TOKEN_CACHE_TEXTS:
                rows.clear()
            needed = token_counts(new, self.context_length, self.tokenizer.encode)
            for text, ids, n in zip(new, self.tokenizer(new), needed):
                rows[text] = (ids, n)
        # a text cut to the context is counted (one warning per run, then a summary), never silent
        note_cut_texts(texts, self.context_length, self.tokenizer.encode, what="texts",
                       counts=[rows[t][1] for t in texts])
        return torch.stack([rows[t][0] for t in texts])

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
        """Raw projected text features (B, D); the padding after the batch's last end token is not run."""
        cut = self.trim_padding(tokens)
        if cut.shape[1] == tokens.shape[1]:
            return self.model.encode_text(tokens)
        return self._pool_project_text(self._text_token_features(cut), cut)

    def trim_padding(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids without the padding after the batch's last end token (same pooled features).

        Exact for a causal text tower that pools at the end token: no position attends to a later
        one, so the cut positions never reach the output. Captions of 10-40 tokens then run 10-40
        positions instead of the context's 77 (the text tower was most of a small CLIP's step).
        A tower that sees the whole sequence (no causal mask, other pooling) is left as it is.
        """
        parts = self._text_parts()
        if parts is None or parts.attn_mask is None or parts.pool_type not in ("argmax", "eos") or tokens.dim() != 2:
            return tokens
        if parts.pool_type == "argmax":
            end = tokens.argmax(dim=1)
        else:
            end = (tokens == parts.eos_id).int().argmax(dim=1)
        return tokens[:, : int(end.max()) + 1]

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

    def text_token_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token text features (B, L, text width) after ln_final, before pooling and projection."""
        return self._text_token_features(tokens)

    def vision_transformer(self, what: str = "this method") -> VisionTransformer:
        """The open_clip VisionTransformer image tower; a clear error for ResNets and attention-pooled ViTs."""
        return self._require_vit(what)

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
        tokens = self.trim_padding(tokens)
        replace = replace[:, : tokens.shape[1]]   # placeholders lie before the end token: none is cut
        x = self._text_token_features(tokens, replace, pseudo)
        return self._pool_project_text(x, tokens)

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
        if self._lora_towers:
            raise RuntimeError(f"LoRA is already applied to {sorted(self._lora_towers)}; apply it once")
        towers = [towers] if isinstance(towers, str) else list(towers)
        bad = [t for t in towers if t not in ("image", "text")]
        if bad or not towers:
            raise ValueError(f"LoRA towers must be a non-empty subset of ['image', 'text'], got {towers}")
        where: dict[str, _lora.LoraTower] = {}
        for tower in towers:
            if tower == "image":
                vit = self._require_vit("LoRA on the image tower")
                where[tower] = _lora.LoraTower("visual.transformer", vit.transformer, self.image_parameters())
            else:
                t = self._require_text("LoRA on the text tower")
                where[tower] = _lora.LoraTower(t.prefix, t.transformer, self.text_parameters())
        self.lora_config = _lora.apply_lora(self.model, where, r=r, alpha=alpha, dropout=dropout,
                                            blocks=blocks, mlp=mlp)
        self._lora_towers = set(towers)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's open_clip-format state dict with LoRA deltas merged in (loadable via pretrained=<file>)."""
        return _lora.merged_state_dict(self.model)

    # ------------------------------------------------------------------ identity
    def fingerprint(self) -> str:
        """sha1 over the model name and every state-dict tensor (sorted keys): the feature-cache key."""
        h = hashlib.sha1(self.model_name.encode())
        hash_state(h, self.model.state_dict())
        return h.hexdigest()

    def extra_repr(self) -> str:
        return (f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, embed_dim={self.embed_dim}, "
                f"token_dim={self.token_dim}, image_size={self.image_size}, lora={self.lora_config}")
