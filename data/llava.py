"""Convert LLaVA visual-instruction data (e.g. llava_v1_5_mix665k.json) into instruction shards.

Layout read: one JSON array of ``{"id", "image": "<path under images>", "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}``. Every (human, gpt) turn
becomes one instruction sample (image, instruction, answer) with id ``<id>-t<turn>``; the ``<image>``
marker is removed. An answer longer than the CLIP text context is cut to the words that fit and
counted (``answers_cut``). Skipped and reported as ``file:line: reason`` (the line where the entry
starts), never dropped silently: entries without an image (text-only conversations), missing or
unreadable images, malformed entries and turns. ``strict=True`` raises on the first one.
Each turn stores its image (a conversation's turns repeat it): plan disk for turns x image size.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from cirlab.data.convert import BadRowError, ConvertError, MissingInputError
from cirlab.data.images import ImageDecodeError, image_for_shard
from cirlab.data.shards import ShardIndex, write_shards

NO_IMAGE, MISSING_IMAGE, BAD_IMAGE = "no image", "missing image", "bad image"
MALFORMED, BAD_TURN = "malformed entry", "bad turn"
_IMAGE_MARK = re.compile(r"\s*<image>\s*")


@dataclass
class LlavaReport:
    """What the conversion wrote and skipped; `problems` holds one ``file:line: reason`` per skip."""

    entries: int = 0
    written: int = 0
    skipped: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    answers_cut: int = 0
    problems: list[str] = field(default_factory=list)
    index: ShardIndex | None = None

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped_by_reason.items())) or "none"
        return (f"{self.entries} entries -> wrote {self.written} instruction samples; "
                f"{self.answers_cut} answers cut to the text context; skipped {self.skipped} ({reasons})")


def _entries(path: Path) -> Iterator[tuple[int, Any]]:
    """(line where it starts, decoded object) for each element of the top-level JSON array."""
    text = path.read_text(encoding="utf-8-sig")
    decoder = json.JSONDecoder()
    pos, line = 0, 1

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos >= len(text) or text[pos] != "[":
        raise ConvertError(f"{path}: not a LLaVA file (expected a JSON array of conversations)",
                           "pass the .json file itself, e.g. llava_v1_5_mix665k.json")
    pos, last = skip(pos + 1), 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", last, pos)
        last = pos
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ConvertError(f"{path}:{e.lineno}: invalid JSON ({e.msg})", "fix or re-download the file") from None
        yield line, obj
        pos = skip(end)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)


class _Cutter:
    """Cut answers to the CLIP text context (SOT and EOT take two of its tokens), counting BPE tokens."""

    def __init__(self, context_length: int) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.bpe = SimpleTokenizer()
        self.room = context_length - 2

    def __call__(self, text: str) -> tuple[str, bool]:
        if len(self.bpe.encode(text)) <= self.room:
            return text, False
        words = text.split()
        lo, hi = 0, len(words)  # the longest word prefix that fits
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.bpe.encode(" ".join(words[:mid]))) <= self.room:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo]), True


def convert_llava(json_path: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike,
                  maxcount: int = 1000, strict: bool = False, context_length: int = 77) -> LlavaReport:
    """Write one instruction sample per (human, gpt) turn of a LLaVA JSON file into shards at `out`."""
    json_path, root = Path(json_path), Path(images)
    if not json_path.is_file():
        raise MissingInputError(f"LLaVA file not found: {json_path}", "pass the path of the .json file")
    if not root.is_dir():
        raise MissingInputError(f"image folder not found: {root}",
                                "pass the folder the entries' 'image' paths are relative to")
    report = LlavaReport()
    cut = _Cutter(context_length)

    def bad(line: int, reason: str, detail: str) -> None:
        msg = f"{json_path}:{line}: {reason}: {detail}"
        if strict:
            raise BadRowError(msg, "fix the entry, or run without strict to skip and report it")
        report.skipped += 1
        report.skipped_by_reason[reason] = report.skipped_by_reason.get(reason, 0) + 1
        report.problems.append(msg)

    def samples() -> Iterator[dict[str, Any]]:
        for line, entry in _entries(json_path):
            report.entries += 1
            if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
                bad(line, MALFORMED, "expected an object with a 'conversations' list")
                continue
            eid = str(entry.get("id", f"line{line}"))
            if not entry.get("image"):
                bad(line, NO_IMAGE, f"entry {eid!r} has no 'image' (a text-only conversation)")
                continue
            path = root / str(entry["image"])
            try:
                image = image_for_shard(path.read_bytes())
            except FileNotFoundError:
                bad(line, MISSING_IMAGE, f"entry {eid!r}: {path} does not exist")
                continue
            except (OSError, ImageDecodeError) as e:
                bad(line, BAD_IMAGE, f"entry {eid!r}: {path} ({type(e).__name__})")
                continue
            turns = entry["conversations"]
            for t in range(0, len(turns) - 1, 2):
                human, gpt = turns[t], turns[t + 1]
                ok = (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human"
                      and gpt.get("from") == "gpt" and isinstance(human.get("value"), str)
                      and isinstance(gpt.get("value"), str))
                instruction = _IMAGE_MARK.sub(" ", human["value"]).strip() if ok else ""
                answer = gpt["value"].strip() if ok else ""
                if not ok or not instruction or not answer:
                    bad(line, BAD_TURN, f"entry {eid!r} turn {t // 2}: expected a non-empty human message "
                        "followed by a non-empty gpt answer")
                    continue
                answer, was_cut = cut(answer)
                report.answers_cut += was_cut
                yield {"id": f"{eid}-t{t // 2}", "image": image, "instruction": instruction, "answer": answer,
                       "image_path": str(entry["image"]), "turn": t // 2}
                report.written += 1
            if len(turns) % 2:
                bad(line, BAD_TURN, f"entry {eid!r}: {len(turns)} messages, the last one has no answer")

    report.index = write_shards(samples(), out, "instruction", maxcount=maxcount)
    return report
