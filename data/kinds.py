"""Sample kinds: which fields each kind carries and how they map to tar members.

One sample = the tar members that share a key. Keys are sequential and contain no dots;
the real id (which may contain dots) lives in the json member.
"""

from __future__ import annotations

from cirlab.errors import CirlabError

# field name -> tar member extension, for the image and text fields of each kind.
# Every other field of a sample goes into the json member.
IMAGE_FIELDS: dict[str, dict[str, str]] = {
    "pair": {"image": "jpg"},
    "image": {"image": "jpg"},
    "text": {},
    "triplet": {"ref": "ref.jpg", "tgt": "tgt.jpg"},
    "instruction": {"image": "jpg"},
    "query": {"ref": "ref.jpg"},
}
TEXT_FIELDS: dict[str, dict[str, str]] = {
    "pair": {"text": "txt"},
    "image": {},
    "text": {"text": "txt"},
    "triplet": {},
    "instruction": {},
    "query": {},
}
# json fields every sample of a kind must have (besides "id").
REQUIRED_JSON: dict[str, tuple[str, ...]] = {
    "pair": (),
    "image": (),
    "text": (),
    "triplet": ("ref_id", "tgt_id", "texts"),
    "instruction": ("instruction", "answer"),
    "query": ("ref_id", "texts"),
}
KINDS = tuple(IMAGE_FIELDS)


class UnknownKindError(CirlabError, ValueError):
    """A sample kind that does not exist (a ValueError too, for callers that catch those)."""


def check_kind(kind: str) -> str:
    """Return kind if known, else raise one clear error listing the known kinds."""
    if kind not in IMAGE_FIELDS:
        raise UnknownKindError(f"unknown sample kind {kind!r}", f"expected one of {', '.join(KINDS)}")
    return kind
