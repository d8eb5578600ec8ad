"""Test helpers: read shard folders back independently of cirlab's own streaming code."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import webdataset as wds

from cirlab.data.shards import read_index


def samples(folder: Path) -> list[dict]:
    """All samples of a shard folder, decoded by webdataset itself, json fields merged in."""
    out = []
    for s in wds.WebDataset(read_index(folder).urls, shardshuffle=False).decode("pil"):
        meta = s.pop("json")
        out.append({**s, **meta})
    return out


def tar_contents_digest(root: Path) -> str:
    """Hash of every tar member (path + name + bytes) and every other file under root, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.suffix == ".tar":
            with tarfile.open(p) as t:
                for m in t.getmembers():
                    h.update(f"{p.relative_to(root)}/{m.name}".encode())
                    h.update(t.extractfile(m).read())
        elif p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()
