"""Text as tokens arrive: incremental detokenisation (`TextDecoder`) and stop strings (`StopMatcher`).

`TextDecoder` turns one sequence's new tokens into text pieces that join to exactly
`decode(all tokens)`: each token costs two decodes of a short window (the tokens since the last
piece plus the ones before it), not a decode of the whole completion. SentencePiece drops the
leading space of a decoded sequence's first piece, so a window is only trusted when its known
prefix decodes to something; otherwise the whole sequence is decoded once. A token that ends
inside a multi-byte character (byte-fallback pieces) renders as U+FFFD; trailing U+FFFDs are held
back until a complete character follows them (or the sequence ends).

`StopMatcher` is fed those pieces and reports where the earliest stop string starts once one is
complete, and how much of the text is safe to show while streaming (never the start of what may
still become a stop string). A stop that spans tokens is found in the token that completes it.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT = "\ufffd"  # what decode gives for an incomplete UTF-8 sequence


def check_stops(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """The stop strings as a tuple: None -> (), one string -> (it,); each must be a non-empty str."""
    if stop is None:
        return ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)):
        raise TypeError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stops:
        if not isinstance(s, str) or s == "":
            raise ValueError(f"every stop string must be a non-empty str, got {s!r}")
    return tuple(stops)


class TextDecoder:
    """One sequence's text, piece by piece, as its tokens arrive (`add`), then the rest (`finish`)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.text = ""  # the text given out so far: always a prefix of decode(ids)
        self._start = 0  # the window ids[_start:] is decoded for each new token;
        self._mark = 0  # ids[:_mark] are rendered in the text up to _mark_len,
        self._mark_len = 0
        self._start_text = ""  # and decode(ids[_start:_mark]) is the window's known prefix
        self._given = 0  # characters of the text of ids[_mark:] already given out

    def add(self, token: int) -> str:
        """Take one token; return the new text it completes ("" while a character is incomplete)."""
        self.ids.append(int(token))
        window = self.decode(self.ids[self._start:])
        if self._start_text and window.startswith(self._start_text):
            new = window[len(self._start_text):]  # the text of ids[_mark:]
        else:  # the window's prefix renders empty (e.g. a lone space piece): decode it all
            new = self.decode(self.ids)[self._mark_len:]
        ready = new.rstrip(REPLACEMENT)  # a trailing U+FFFD may be a character still incomplete
        piece = ready[self._given:]
        self.text += piece
        if ready == new:  # all complete: move the window on
            self._start, self._mark, self._mark_len = self._mark, len(self.ids), len(self.text)
            self._start_text = self.decode(self.ids[self._start:self._mark])
            self._given = 0
        else:
            self._given = len(ready)
        return piece

    def finish(self) -> str:
        """The sequence has ended: the text not given out yet (an incomplete character as U+FFFD)."""
        piece = self.decode(self.ids)[len(self.text):]
        self.text += piece
        self._start = self._mark = len(self.ids)
        self._mark_len, self._start_text, self._given = len(self.text), "", 0
        return piece


class StopMatcher:
    """The earliest stop string in a text fed piece by piece.

    `feed(piece)` returns None to go on, or the index in the whole text where a stop string starts
    once one is complete (the text is cut there; later feeds change nothing). `safe_end()` is how
    much of the text may be shown now.
    """

    def __init__(self, stops: str | Sequence[str] | None) -> None:
        self.stops = check_stops(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.cut: int | None = None

    def feed(self, piece: str) -> int | None:
        if self.cut is not None or not piece:
            return self.cut
        begin = max(0, len(self.text) - self.longest + 1)  # a new stop must end in the new piece
        self.text += piece
        found = [i for i in (self.text.find(s, begin) for s in self.stops) if i >= 0]
        if found:
            self.cut = min(found)
        return self.cut

    def safe_end(self) -> int:
        """The cut once stopped; else the text's length less a tail that may still grow into a stop."""
        if self.cut is not None:
            return self.cut
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return len(self.text) - k
        return len(self.text)
