"""Stop strings over one sequence's detokenised completion, checked incrementally as tokens arrive.

`StopMatcher` is the one piece every text-level caller shares (Generator, the harness LM, the
server): feed it a sequence's new tokens so far, and it says how many of them to keep once a stop
string has been completed, where that stop starts in the text (the stop text itself is never
returned), and which text is safe to stream (never half a UTF-8 character, never the start of
what may become a stop string).

Decoding is incremental, as vLLM's detokenizer does it: the text grows by
decode(tokens[anchor:n])[len(decode(tokens[anchor:read])):], so SentencePiece's leading-space rule
applies the same way to both strings and each token costs two short decodes, not a decode of the
whole completion. A token that ends inside a multi-byte character (byte-fallback pieces) renders
as U+FFFD; the text does not advance past it until the character completes. Stops are searched
only in new text plus the last (longest stop - 1) characters, so a stop that spans token
boundaries is found in the token that completes it, exactly where Hugging Face's `stop_strings`
criterion stops generating.
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


class StopMatcher:
    """One sequence's completion text as its tokens arrive, and the earliest stop string in it.

    `update(tokens)` takes all new tokens so far (the prompt excluded) and returns None to go on,
    or, once a stop string is complete, how many tokens to keep: up to and including the token
    that completed it. Afterwards `text` is the completion up to the stop's first character.
    `take()` gives the text that became safe to show since the last call (for streaming) and
    `finish()` the rest once the sequence has ended.
    """

    def __init__(self, stops: str | Sequence[str] | None, decode: Callable[[Sequence[int]], str]) -> None:
        self.stops = check_stops(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.decode = decode
        self.tokens: list[int] = []
        self.kept: int | None = None  # tokens kept once stopped
        self.stop_at: int | None = None  # index in the text where the stop string starts
        self._text = ""  # decode(tokens[:_read]), complete characters only
        self._anchor = self._read = 0
        self._anchor_len = 0  # len(decode(tokens[_anchor:_read]))
        self._searched = 0  # characters of _text already searched for stops
        self._shown = 0  # characters handed out by take()

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    @property
    def text(self) -> str:
        """The completion so far (complete characters), cut where the stop string starts."""
        return self._text if self.stop_at is None else self._text[:self.stop_at]

    def update(self, tokens: Sequence[int]) -> int | None:
        """All new tokens so far -> None (go on) or the number of tokens to keep (a stop completed)."""
        if self.stopped:
            return self.kept
        if len(tokens) < len(self.tokens):
            raise ValueError(f"update() needs all new tokens so far: got {len(tokens)} after {len(self.tokens)}")
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in tokens[start:])
        for n in range(start + 1, len(self.tokens) + 1):
            if self._extend(n) and self._search():
                self.kept = n
                return n
        return None

    def _extend(self, n: int) -> bool:
        """Render tokens[:n]; False while the last character may still be completed by the next
        byte (a UTF-8 character is at most 4 bytes; a longer run of U+FFFD is invalid bytes)."""
        window = self.decode(self.tokens[self._anchor:n])
        if window.endswith(REPLACEMENT) and n - self._read < 4:
            return False
        self._text += window[self._anchor_len:]
        self._anchor, self._read = self._read, n
        self._anchor_len = len(self.decode(self.tokens[self._anchor:n]))
        return True

    def _search(self) -> bool:
        """Look for the earliest stop string that ends in text added since the last search."""
        if not self.stops:
            return False
        begin = max(0, self._searched - self.longest + 1)
        found = [i for i in (self._text.find(s, begin) for s in self.stops) if i >= 0]
        self._searched = len(self._text)
        if found:
            self.stop_at = min(found)
        return bool(found)

    def take(self) -> str:
        """Text that became safe to show since the last call: complete characters, and not a tail
        that may still grow into a stop string."""
        end = self.stop_at if self.stopped else len(self._text) - self._held()
        piece = self._text[self._shown:end]
        self._shown = max(self._shown, end)
        return piece

    def _held(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(self._text)), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def finish(self) -> str:
        """The sequence has ended: render what was held back (a character left incomplete renders
        as U+FFFD, as decode does), search it, and return the text not yet taken."""
        if not self.stopped and self._read < len(self.tokens):
            self._text = self.decode(self.tokens)
            self._read = len(self.tokens)
            if self._search():
                self.kept = len(self.tokens)
        return self.take() if self.stopped else self._take_all()

    def _take_all(self) -> str:
        piece = self._text[self._shown:]
        self._shown = len(self._text)
        return piece
