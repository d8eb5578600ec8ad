"""Pic2Word: a mapping network from an image feature to one pseudo word, trained on images alone
(METHODS.md "Pic2Word"; reference google-research/composed_image_retrieval).

Training step: f = the frozen image tower's raw feature; p = mapper(f) (dropout on); t = the frozen
text tower on "a photo of *" with p as the `*` embedding (the reference inserts p before the end
token of "a photo of": the same sequence); loss = symmetric InfoNCE between normalised f and t with
the backbone's own logit_scale.exp() (100 for OpenAI CLIP), never trained. Across ranks features
are gathered without gradient, the rank's own first, as the reference (`gather_with_grad` is the
option). Image features are recomputed every step from augmented crops (the reference), or read
from the feature cache (`cache_image_features: true`, deterministic crop): then the image tower
runs once per image for the whole run.
Zero-shot queries: the mapper (eval mode) on the raw reference feature, in a prompt chosen by the
protocol's text form (`PROMPTS`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from cirlab.data.evalset import Protocol
from cirlab.errors import CirlabError
from cirlab.losses import info_nce
from cirlab.models import DOLLAR_TOKEN_ID, STAR_TOKEN_ID, Pic2WordMapper
from cirlab.train.composed import ComposedRetrievalTask
from cirlab.train.config import BackboneConfig, EvalConfig, OptimizerConfig, SchedulerConfig
from cirlab.train.feature_cache import FeatureCache, transform_key

#: the training text; the mapper's output replaces `*`
TRAIN_PROMPT = "a photo of *"

#: zero-shot prompt per protocol text form. `{}` (plain, relative_clause, domain) takes the query's
#: one text; fashioniq's `{c1}`/`{c2}` its two captions, unstripped, the second first as the reference.
#: " * ," keeps `*` its own token ("*," is another BPE token).
PROMPTS: dict[str, str] = {
    "plain": "a photo of * , {}",                  # CIRR, the synthetic world
    "fashioniq": "a photo of * , {c2} and {c1}",   # FashionIQ
    "relative_clause": "a photo of $ that {}",     # CIRCO, as LinCIR/SEARLE evaluate Pic2Word
    "domain": "a {} of *",                         # ImageNet -> ImageNet-R domain conversion
}

#: file the released layout is written to, beside mapper.safetensors
RELEASED_NAME = "pic2word_released.pt"


def placeholder_of(template: str) -> int:
    """The token id the pseudo word replaces in a prompt: `*` (265) or `$` (259)."""
    words = template.replace("{", " ").replace("}", " ").split()
    if "*" in words:
        return STAR_TOKEN_ID
    if "$" in words:
        return DOLLAR_TOKEN_ID
    raise CirlabError(f"Pic2Word prompt {template!r} has no ' * ' or ' $ ' placeholder word",
                      "write the placeholder with spaces around it, e.g. 'a photo of * , {}'")


def format_prompt(template: str, texts: list[str], text_format: str) -> str:
    """One query's prompt from its texts (FashionIQ: two captions; every other form: one text)."""
    if text_format == "fashioniq":
        if len(texts) != 2:
            raise CirlabError(f"a fashioniq query needs two captions, got {len(texts)}: {texts!r}")
        return template.format(c1=texts[0], c2=texts[1])
    return template.format(texts[0])


def released_checkpoint(mapper_state: Mapping[str, torch.Tensor], clip_state: Mapping[str, torch.Tensor],
                        epoch: int = 0, name: str = "cirlab-pic2word") -> dict[str, Any]:
    """The reference's checkpoint dict: {'epoch', 'name', 'state_dict', 'state_dict_img2text'}, both
    state dicts with the `module.` prefix its DDP training leaves (its eval script strips it)."""
    def prefixed(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k if k.startswith("module.") else f"module.{k}": v.detach().cpu().contiguous() for k, v in sd.items()}

    return {"epoch": int(epoch), "name": name, "state_dict": prefixed(clip_state),
            "state_dict_img2text": prefixed(mapper_state)}


def write_released_checkpoint(path: str | Path, mapper_state: Mapping[str, torch.Tensor],
                              clip_state: Mapping[str, torch.Tensor], epoch: int = 0) -> Path:
    """Save the reference's layout (torch file) so the authors' scripts load our mapper."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(released_checkpoint(mapper_state, clip_state, epoch), str(path))
    return path


def released_from_export(export_dir: str | Path, out: Optional[str | Path] = None,
                         model_name: Optional[str] = None) -> Path:
    """The released layout from a run's export folder (mapper.safetensors + the backbone it names):
    what `cirlab export --kind pic2word` calls. `model_name` is needed only when the export holds
    the backbone's weights (a random or trained backbone) rather than backbone.json."""
    import json

    from safetensors.torch import load_file

    from cirlab.models import Backbone
    from cirlab.train.base import exported_backbone

    export_dir = Path(export_dir)
    mapper_file = export_dir / "mapper.safetensors"
    if not mapper_file.is_file():
        raise CirlabError(f"no mapper.safetensors in {export_dir}", "pass the export/ folder of a Pic2Word run")
    meta = export_dir / "backbone.json"
    if meta.is_file():
        model_name = json.loads(meta.read_text())["model_name"]
    elif model_name is None:
        raise CirlabError(f"{export_dir} holds backbone.safetensors without its model name",
                          "pass the open_clip model name it was trained with (e.g. ViT-L-14)")
    clip = Backbone(model_name, exported_backbone(export_dir)).merged_state_dict()
    return write_released_checkpoint(out or export_dir / RELEASED_NAME, load_file(str(mapper_file)), clip)


class Pic2WordTask(ComposedRetrievalTask):
    """Pic2Word: frozen CLIP, a mapper trained from images alone (see the module docstring)."""

    backbone_eval_mode = True  # the reference keeps CLIP in eval mode; the mapper trains with dropout

    def __init__(self, mapper_hidden_dim: int = 512, mapper_layers: int = 2, mapper_dropout: float = 0.1,
                 cache_image_features: bool = False, cache_dir: Optional[str] = None,
                 gather_with_grad: bool = False, prompts: Optional[dict[str, str]] = None,
                 export_released: bool = True, backbone: Optional[BackboneConfig] = None,
                 optimizer: Optional[OptimizerConfig] = None, scheduler: Optional[SchedulerConfig] = None,
                 evaluation: Optional[EvalConfig] = None) -> None:
        self.mapper_hidden_dim = mapper_hidden_dim
        self.mapper_layers = mapper_layers
        self.mapper_dropout = mapper_dropout
        self.cache_image_features = cache_image_features
        self.cache_dir = cache_dir
        self.gather_with_grad = gather_with_grad
        unknown = sorted(set(prompts or {}) - set(PROMPTS))
        if unknown:
            raise CirlabError(f"Pic2Word prompts for unknown text forms {unknown}",
                              f"the text forms are {sorted(PROMPTS)}")
        self.prompts = {**PROMPTS, **(prompts or {})}
        for template in self.prompts.values():
            placeholder_of(template)  # fail at construction on a prompt without placeholder
        self.export_released = export_released
        super().__init__(backbone, optimizer, scheduler, evaluation)

    # ------------------------------------------------------------------ reference settings
    def default_backbone(self) -> BackboneConfig:
        # RandomResizedCrop(scale 0.9-1, bicubic) in training, as the reference
        return BackboneConfig(train_scale=[0.9, 1.0])

    def default_optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(name="adamw", lr=1e-4, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.1,
                               no_decay_on_bias_and_norm=True)

    def default_scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(name="cosine", warmup_steps=10000)

    def configure_models(self) -> None:
        super().configure_models()
        self.backbone.set_trainable(image=False, text=False)
        self.backbone.model.logit_scale.requires_grad_(False)  # the temperature is CLIP's, never trained
        self.mapper = Pic2WordMapper(self.backbone.embed_dim, self.mapper_hidden_dim, self.backbone.token_dim,
                                     dropout=self.mapper_dropout, num_layers=self.mapper_layers)
        self._image_cache: Optional[FeatureCache] = None
        self._train_tokens: Optional[torch.Tensor] = None

    def export_modules(self) -> dict[str, nn.Module]:
        return {"mapper": self.mapper}

    def export(self, out_dir: str | Path) -> dict[str, Path]:
        """mapper.safetensors (+ the backbone, see BaseTask.export) and the reference's layout."""
        written = super().export(out_dir)
        if self.export_released:
            epoch = self.current_epoch + 1 if self._trainer is not None else 0
            written["released"] = write_released_checkpoint(
                Path(out_dir) / RELEASED_NAME, self.mapper.state_dict(), self.backbone.merged_state_dict(), epoch)
        return written

    # ------------------------------------------------------------------ image features
    def _cache_root(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir)
        return Path(self.trainer.default_root_dir) / "feature_cache"

    def configure_datamodule(self, dm: Any) -> None:
        if self.cache_image_features and hasattr(dm, "decode_images"):
            dm.decode_images = False  # features come from the cache: training batches need the ids only

    def on_fit_start(self) -> None:
        if self.cache_image_features:
            self.fill_image_cache()

    @torch.no_grad()
    def fill_image_cache(self) -> None:
        """Encode every training image once (deterministic crop) into the feature cache; later runs
        sharing `cache_dir` reuse it. Under DDP each rank encodes its share, then all read all parts."""
        from tqdm.auto import tqdm

        dm = self.trainer.datamodule
        if not hasattr(dm, "triplet_samples"):
            raise CirlabError("cache_image_features needs cirlab.data.retrieval.RetrievalDataModule as the data "
                              "module (it reads the training shards once)", "or set cache_image_features: false")
        tf = self.image_transform(train=False)
        space = f"image-{transform_key(tf)}"
        fp = self.backbone.fingerprint()
        self._image_cache = FeatureCache(self._cache_root(), fp, space)
        world, rank = self.trainer.world_size, self.trainer.global_rank
        was_training = self.training
        self.eval()
        pending: dict[str, torch.Tensor] = {}
        new = 0
        for sample in tqdm(dm.triplet_samples(transform=tf, rank=rank, world_size=world), desc="image features",
                           unit="image", disable=not self.trainer.is_global_zero, mininterval=2.0):
            if sample["id"] not in self._image_cache and sample["id"] not in pending:
                pending[sample["id"]] = sample["image"]
            if len(pending) >= self.eval_cfg.batch_size:
                new += self._encode_pending(pending)
        new += self._encode_pending(pending)
        self._image_cache.save()
        if world > 1:
            self.trainer.strategy.barrier("pic2word-image-cache")
            self._image_cache = FeatureCache(self._cache_root(), fp, space)
        self.train(was_training)
        self.print(f"feature cache: {len(self._image_cache)} images ({new} new) in {self._image_cache.dir}")

    def _encode_pending(self, pending: dict[str, torch.Tensor]) -> int:
        if not pending:
            return 0
        ids = list(pending)
        self._image_cache.add(ids, self.backbone.encode_image(torch.stack([pending[i] for i in ids]).to(self.device)))
        pending.clear()
        return len(ids)

    def image_features(self, batch: dict[str, Any]) -> torch.Tensor:
        """Raw image features of a training batch: from the cache, or the frozen tower on the crops."""
        if self.cache_image_features:
            if self._image_cache is None:
                raise RuntimeError("the image feature cache is empty: fill_image_cache() runs at fit start")
            return self._image_cache.get(list(batch["id"])).to(self.device)
        with torch.no_grad():
            return self.backbone.encode_image(batch["image"])

    # ------------------------------------------------------------------ training
    def trim_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Drop the padding after the batch's last end token ("a photo of *" runs 6 positions, not 77)."""
        return self.backbone.trim_padding(tokens)

    def pseudo_text_features(self, image_features: torch.Tensor) -> torch.Tensor:
        """Raw text features of "a photo of *" with mapper(image feature) as `*`."""
        if self._train_tokens is None or self._train_tokens.device != image_features.device:
            self._train_tokens = self.trim_tokens(self.backbone.tokenize([TRAIN_PROMPT]).to(image_features.device))
        tokens = self._train_tokens.expand(image_features.shape[0], -1)
        pseudo = self.mapper(image_features.to(self._mapper_dtype()))
        return self.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, STAR_TOKEN_ID, first_only=True)

    def _mapper_dtype(self) -> torch.dtype:
        return next(self.mapper.parameters()).dtype

    def logit_scale(self) -> torch.Tensor:
        """CLIP's own temperature, exp(logit_scale); frozen."""
        return self.backbone.model.logit_scale.detach().exp().float()

    def pic2word_loss(self, image_features: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between normalised image features and their pseudo-word text features."""
        text = self.pseudo_text_features(image_features)
        return info_nce(self.normalize(image_features.float()), self.normalize(text.float()), self.logit_scale(),
                        symmetric=True, gather=True, gather_with_grad=self.gather_with_grad)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        feats = self.image_features(batch)
        loss = self.pic2word_loss(feats)
        self.log("train/loss", loss, prog_bar=True, batch_size=feats.shape[0])
        return loss

    # ------------------------------------------------------------------ zero-shot query
    def prompt_for(self, protocol: Protocol) -> str:
        """This protocol's prompt template (by its text form, never by benchmark name)."""
        template = self.prompts.get(protocol.text_format)
        if template is None:
            raise CirlabError(f"Pic2Word has no prompt for text form {protocol.text_format!r} "
                              f"(evaluation set {protocol.name!r})",
                              f"add one under model.init_args.prompts; known forms: {sorted(self.prompts)}")
        return template

    def query_features(self, ref_features: torch.Tensor, texts: list[list[str]], protocol: Protocol) -> torch.Tensor:
        template = self.prompt_for(protocol)
        prompts = [format_prompt(template, list(t), protocol.text_format) for t in texts]
        tokens = self.trim_tokens(self.backbone.tokenize(prompts).to(self.device))
        pseudo = self.mapper(ref_features.to(self.device, self._mapper_dtype()))
        return self.backbone.encode_text_with_pseudo_tokens(tokens, pseudo, placeholder_of(template), first_only=True)
