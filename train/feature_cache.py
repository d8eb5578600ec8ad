"""Features of frozen encoders, computed once and stored under the run directory.

Keyed by (model fingerprint, transform, item id): a different backbone or transform lands in a
different folder, so a stale cache is never read. Reused across epochs and across runs that
share the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


def autocast_tag(device_type: str) -> str:
    """"-bfloat16"/"-float16" while autocast is on for this device, else "": features computed in
    reduced precision are kept apart from full-precision ones, so neither run reads the other's."""
    if not torch.is_autocast_enabled(device_type):
        return ""
    return "-" + str(torch.get_autocast_dtype(device_type)).removeprefix("torch.")


def transform_key(transform: object) -> str:
    """A short key for a transform, the same in every process: its repr lists every parameter in
    torchvision, minus memory addresses (a plain function prints as "<function f at 0x…>", which
    differs between runs and between DDP ranks)."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))
    return hashlib.sha1(text.encode()).hexdigest()[:10]


class FeatureCache:
    """An id -> feature-vector table on disk, loaded fully into memory.

    In memory, rows live in fixed-size blocks: adding a batch costs its own size (LinCIR adds and
    reads every training step over corpora of millions of captions; one table re-concatenated on
    every read, the first design, grew quadratically). On disk, each cache object writes only the
    rows it computed, into its own part files (``part-<writer>-NNNNN.safetensors`` + ``.json`` ids),
    so runs and ranks sharing the folder never overwrite each other, and a save rewrites only the
    part that changed. Loading reads every part.
    """

    block_rows = 65536

    def __init__(self, root: str | os.PathLike, fingerprint: str, space: str) -> None:
        # space names what was encoded and how, e.g. "image-<transform key>" or "text"
        self.dir = Path(root) / f"{fingerprint[:16]}-{space}"
        self.ids: list[str] = []
        self.pos: dict[str, int] = {}
        self._blocks: list[torch.Tensor] = []
        self._writer = uuid.uuid4().hex[:12]
        self._load()
        self._loaded = len(self.ids)  # rows after these are this object's own, saved in its parts
        self._clean_parts = 0  # own parts written and full: never rewritten

    def _load(self) -> None:
        for path in sorted(self.dir.glob("*.safetensors")):
            ids_file = path.with_suffix(".json")
            try:
                ids = json.loads(ids_file.read_text())
                feats = load_file(str(path))["features"]
                if len(ids) != feats.shape[0]:
                    raise ValueError(f"{len(ids)} ids for {feats.shape[0]} rows")
            except (OSError, ValueError, KeyError, SafetensorError) as err:  # cut short: rows recomputed
                log.warning("feature cache %s: skipping %s (%s)", self.dir, path.name, err)
                continue
            self.add(ids, feats)

    @property
    def features(self) -> Optional[torch.Tensor]:
        """All rows as one tensor (a copy), or None when empty."""
        return self._rows(0, len(self.ids)) if self.ids else None

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        b = self.block_rows
        return torch.cat([self._blocks[k][max(start - k * b, 0):min(stop - k * b, b)]
                          for k in range(start // b, (stop - 1) // b + 1)])

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
        """Write the rows this object added since the last save (each file replaced atomically)."""
        own = len(self.ids) - self._loaded
        if own == 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        b = self.block_rows
        for k in range(self._clean_parts, (own - 1) // b + 1):
            start, stop = self._loaded + k * b, self._loaded + min((k + 1) * b, own)
            path = self.dir / f"part-{self._writer}-{k:05d}.safetensors"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.ids[start:stop]))
            os.replace(tmp, path.with_suffix(".json"))  # ids first: a part without its rows is skipped
            save_file({"features": self._rows(start, stop).contiguous()}, str(tmp))
            os.replace(tmp, path)
        self._clean_parts = own // b  # a partial last part is rewritten next time

    def fill(self, ids: Sequence[str], encode: Callable[[list[str]], torch.Tensor], batch_size: int = 256) -> int:
        """Encode the ids not cached yet (encode receives a list of ids); returns how many were new."""
        todo = self.missing(ids)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            self.add(chunk, encode(chunk))
        return len(todo)
