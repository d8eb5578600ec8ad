"""Texts longer than a text tower's context are cut by its tokenizer: say so, once per run, with a count.

CLIP's tokenizer keeps the first ``context_length - 2`` tokens (plus start and end) and drops the rest
without a word. :class:`ContextMonitor` counts the texts that lose tokens, warns the first time and
again only as a count (``summary()``); :func:`note_cut_texts` is the per-process monitor that
query-encoding code calls where it tokenises (``Backbone.tokenize``).
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

log = logging.getLogger(__name__)


class ContextMonitor:
    """Counts texts longer than ``context_length`` tokens; one warning for the first, then a count."""

    def __init__(self, context_length: int, encode: Callable[[str], list[int]], what: str = "texts") -> None:
        self.context_length, self.encode, self.what = context_length, encode, what
        self.cut = 0        # texts that lost tokens
        self.seen = 0       # texts checked
        self.longest = 0    # the most tokens one text had
        self.warned = False

    def tokens(self, text: str) -> int:
        """Tokens ``text`` needs, start and end included."""
        if len(text.encode("utf-8")) + 2 <= self.context_length:  # byte-level BPE: never more tokens than bytes
            return len(text.encode("utf-8")) + 2
        return len(self.encode(text)) + 2

    def check(self, texts: Sequence[str], counts: Sequence[int] | None = None) -> int:
        """Count the texts the tokenizer will cut; warn the first time this monitor sees one. Returns this
        batch's count. ``counts``: the tokens each text needs, when the caller knows them already."""
        cut = 0
        for i, text in enumerate(texts):
            n = self.tokens(text) if counts is None else counts[i]
            if n > self.context_length:
                cut += 1
                self.longest = max(self.longest, n)
                if not self.warned:
                    self.warned = True
                    words = len(text.split())
                    log.warning("a %s has %d words (%d tokens) and is cut to the text tower's %d-token context: "
                                "only its start counts (further cut %s are counted, see the summary)",
                                self.what.rstrip("s"), words, n, self.context_length, self.what)
        self.seen += len(texts)
        self.cut += cut
        return cut

    def summary(self) -> str | None:
        """'N of M texts were cut …' if any was, else None."""
        if not self.cut:
            return None
        return (f"{self.cut} of {self.seen} {self.what} were longer than the {self.context_length}-token context "
                f"and were cut (the longest had {self.longest} tokens)")


_MONITORS: dict[int, ContextMonitor] = {}  # one per context length


def note_cut_texts(texts: Sequence[str], context_length: int, encode: Callable[[str], list[int]],
                   what: str = "query texts", counts: Sequence[int] | None = None) -> int:
    """Check texts with this process's monitor for ``context_length``: warns once per run, counts always."""
    key = context_length
    monitor = _MONITORS.get(key)
    if monitor is None:
        monitor = _MONITORS[key] = ContextMonitor(context_length, encode, what)
    return monitor.check(texts, counts)


def token_counts(texts: Sequence[str], context_length: int, encode: Callable[[str], list[int]]) -> list[int]:
    """Tokens each text needs, start and end included (encoded only when it may not fit)."""
    probe = ContextMonitor(context_length, encode)
    return [probe.tokens(t) for t in texts]


def cut_text_summaries() -> list[str]:
    """The summary line of every monitor that saw a cut text (for the end of an evaluation or a run)."""
    return [s for s in (m.summary() for m in _MONITORS.values()) if s]


def reset_monitors() -> None:
    """Forget the counts (a new run in the same process)."""
    _MONITORS.clear()
