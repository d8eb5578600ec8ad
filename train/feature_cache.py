"""Features of frozen encoders, computed once and stored under the run directory.

Keyed by (model fingerprint, transform, item id): a different backbone or transform lands in a
different folder, so a stale cache is never read. Reused across epochs and across runs that
share the folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file


def autocast_tag(device_type: str) -> str:
    """"-bfloat16"/"-float16" while autocast is on for this device, else "": features computed in
    reduced precision are kept apart from full-precision ones, so neither run reads the other's."""
    if not torch.is_autocast_enabled(device_type):
        return ""
    return "-" + str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")


def transform_key(transform: object) -> str:
    """A short stable key for a transform (its repr lists every parameter in torchvision)."""
    return hashlib.sha1(repr(transform).encode()).hexdigest()[:10]


class FeatureCache:
    """An id -> feature-vector table on disk (safetensors + ids.json), loaded fully into memory."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, space: str) -> None:
        # space names what was encoded and how, e.g. "image-<transform key>" or "text"
        self.dir = Path(root) / f"{fingerprint[:16]}-{space}"
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        self.features: Optional[torch.Tensor] = None
        self._pending_ids: list[str] = []
        self._pending: list[torch.Tensor] = []
        self._load()

    def _load(self) -> None:
        fid, ffeat = self.dir / "ids.json", self.dir / "features.safetensors"
        if fid.is_file() and ffeat.is_file():
            self.ids = json.loads(fid.read_text())
            self.features = load_file(str(ffeat))["features"]
            if self.features.shape[0] != len(self.ids):
                raise RuntimeError(f"feature cache {self.dir} is corrupt ({len(self.ids)} ids, "
                                   f"{self.features.shape[0]} rows): delete the folder to rebuild it")
            self.pos = {k: i for i, k in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids) + len(self._pending_ids)

    def __contains__(self, key: str) -> bool:
        return key in self.pos

    def missing(self, ids: Iterable[str]) -> list[str]:
        """Ids not cached yet, each once, in first-seen order."""
        return [i for i in dict.fromkeys(ids) if i not in self.pos]

    def add(self, ids: Sequence[str], feats: torch.Tensor) -> None:
        feats = feats.detach().float().cpu()
        for i, key in enumerate(ids):
            if key in self.pos:
                continue
            self.pos[key] = len(self.ids) + len(self._pending_ids)
            self._pending_ids.append(key)
            self._pending.append(feats[i])

    def _flush(self) -> None:
        if not self._pending_ids:
            return
        new = torch.stack(self._pending)
        self.features = new if self.features is None else torch.cat([self.features, new])
        self.ids.extend(self._pending_ids)
        self._pending_ids, self._pending = [], []

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        """Cached features of these ids (every one must be cached)."""
        self._flush()
        try:
            rows = [self.pos[i] for i in ids]
        except KeyError as e:
            raise KeyError(f"{e.args[0]!r} is not in the feature cache {self.dir}; fill the cache first") from None
        return self.features[rows]

    def save(self) -> None:
        self._flush()
        if self.features is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "features.safetensors.tmp"
        save_file({"features": self.features.contiguous()}, str(tmp))
        os.replace(tmp, self.dir / "features.safetensors")
        (self.dir / "ids.json").write_text(json.dumps(self.ids))

    def fill(self, ids: Sequence[str], encode: Callable[[list[str]], torch.Tensor], batch_size: int = 256) -> int:
        """Encode the ids not cached yet (encode receives a list of ids); returns how many were new."""
        todo = self.missing(ids)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            self.add(chunk, encode(chunk))
        return len(todo)
