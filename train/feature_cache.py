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
    """An id -> feature-vector table on disk, loaded fully into memory.

    Rows live in fixed-size blocks (files ``block-NNNNN.safetensors`` + ``.json`` ids): adding a
    batch costs its own size, and saving rewrites only the blocks that changed. LinCIR adds and
    reads every training step over corpora of millions of captions; one table re-concatenated on
    every read (the first design) grew quadratically, a doubling buffer would copy GBs at a time.
    """

    block_rows = 65536

    def __init__(self, root: str | os.PathLike, fingerprint: str, space: str) -> None:
        # space names what was encoded and how, e.g. "image-<transform key>" or "text"
        self.dir = Path(root) / f"{fingerprint[:16]}-{space}"
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        self._blocks: list[torch.Tensor] = []
        self._clean_blocks = 0  # leading blocks already on disk as they are now
        self._load()

    def _load(self) -> None:
        files = sorted(self.dir.glob("block-*.safetensors"))
        for k, path in enumerate(files):
            ids = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else None
            feats = load_file(str(path))["features"]
            if path.name != f"block-{k:05d}.safetensors" or ids is None or len(ids) != feats.shape[0] or (
                    k < len(files) - 1 and len(ids) != self.block_rows):
                raise RuntimeError(f"feature cache {self.dir} is corrupt at {path.name}: delete the folder to rebuild it")
            self.add(ids, feats)
        self._clean_blocks = len(self._blocks)

    @property
    def features(self) -> Optional[torch.Tensor]:
        """All rows as one tensor (a copy), or None when empty."""
        return torch.cat(self._blocks)[: len(self.ids)] if self._blocks else None

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: str) -> bool:
        return key in self.pos

    def missing(self, ids: Iterable[str]) -> list[str]:
        """Ids not cached yet, each once, in first-seen order."""
        return [i for i in dict.fromkeys(ids) if i not in self.pos]

    def add(self, ids: Sequence[str], feats: torch.Tensor) -> None:
        """Cache these rows; ids already cached (or repeated in ``ids``) keep their first feature."""
        feats = feats.detach().float().cpu()
        new, seen = [], set()
        for i, key in enumerate(ids):
            if key not in self.pos and key not in seen:
                seen.add(key)
                new.append(i)
        if not new:
            return
        rows = feats[new] if len(new) < len(ids) else feats
        done, n = 0, len(self.ids)
        self._clean_blocks = min(self._clean_blocks, n // self.block_rows)
        while done < len(new):
            block, offset = divmod(n + done, self.block_rows)
            if block == len(self._blocks):
                self._blocks.append(torch.empty(self.block_rows, feats.shape[1]))
            take = min(len(new) - done, self.block_rows - offset)
            self._blocks[block][offset:offset + take] = rows[done:done + take]
            done += take
        for offset, i in enumerate(new):
            self.pos[ids[i]] = n + offset
            self.ids.append(ids[i])

    def get(self, ids: Sequence[str]) -> torch.Tensor:
        """Cached features of these ids (every one must be cached)."""
        try:
            rows = torch.tensor([self.pos[i] for i in ids], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"{e.args[0]!r} is not in the feature cache {self.dir}; fill the cache first") from None
        if len(self._blocks) == 1:
            return self._blocks[0][rows]
        block, offset = rows // self.block_rows, rows % self.block_rows
        out = torch.empty(len(rows), self._blocks[0].shape[1])
        for b in block.unique().tolist():
            sel = block == b
            out[sel] = self._blocks[b][offset[sel]]
        return out

    def save(self) -> None:
        """Write the blocks changed since the last save (each file replaced atomically)."""
        if not self.ids:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for k in range(self._clean_blocks, len(self._blocks)):
            n = min(self.block_rows, len(self.ids) - k * self.block_rows)
            path = self.dir / f"block-{k:05d}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file({"features": self._blocks[k][:n].contiguous()}, str(tmp))
            os.replace(tmp, path)
            tmp.write_text(json.dumps(self.ids[k * self.block_rows:k * self.block_rows + n]))
            os.replace(tmp, path.with_suffix(".json"))
        self._clean_blocks = len(self.ids) // self.block_rows  # a partial last block is rewritten next time

    def fill(self, ids: Sequence[str], encode: Callable[[list[str]], torch.Tensor], batch_size: int = 256) -> int:
        """Encode the ids not cached yet (encode receives a list of ids); returns how many were new."""
        todo = self.missing(ids)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            self.add(chunk, encode(chunk))
        return len(todo)
