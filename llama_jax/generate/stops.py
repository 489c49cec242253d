"""Stop strings over one sequence's detokenised completion, checked incrementally as tokens arrive.

`StopMatcher` is the one piece every text-level caller shares (Generator, the harness LM, the
server's batcher): feed it a sequence's new tokens so far, and it says how many of them to keep
once a stop string has been completed, where that stop starts in the text (the stop text itself
is never returned), and which text is safe to stream (never half a UTF-8 character, never the
start of what may become a stop string).

Decoding is incremental (`TextDecoder`), as vLLM's detokenizer does it: the text grows by
decode(tokens[start:n])[len(decode(tokens[start:mark])):], so SentencePiece's leading-space rule
applies the same way to both strings and each token costs two short decodes, not a decode of the
whole completion; where the known prefix decodes to nothing (a lone space piece, whose space
SentencePiece drops at the start of a text) the whole sequence is decoded once instead. A token
that ends inside a multi-byte character (byte-fallback pieces) renders as U+FFFD; trailing U+FFFDs
are held back until a complete character follows them (or the sequence ends), so the text given
out is always a prefix of decode(all tokens). Stops are searched only in new text plus the last
(longest stop - 1) characters, so a stop that spans token boundaries is found in the token that
completes it, exactly where Hugging Face's `stop_strings` criterion stops generating.
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
        self.tokens: list[int] = []  # the tokens taken so far (up to the one that completed a stop)
        self.kept: int | None = None  # tokens kept once stopped
        self.stop_at: int | None = None  # index in the text where the stop string starts
        self._render = TextDecoder(decode)
        self._searched = 0  # characters of the text already searched for stops
        self._shown = 0  # characters handed out by take()

    @property
    def stopped(self) -> bool:
        return self.stop_at is not None

    @property
    def text(self) -> str:
        """The completion so far (complete characters), cut where the stop string starts."""
        text = self._render.text
        return text if self.stop_at is None else text[:self.stop_at]

    def update(self, tokens: Sequence[int]) -> int | None:
        """All new tokens so far -> None (go on) or the number of tokens to keep (a stop completed)."""
        if self.stopped:
            return self.kept
        if len(tokens) < len(self.tokens):
            raise ValueError(f"update() needs all new tokens so far: got {len(tokens)} after {len(self.tokens)}")
        for token in tokens[len(self.tokens):]:
            self.tokens.append(int(token))
            if self._render.add(token) and self._search():
                self.kept = len(self.tokens)
                return self.kept
        return None

    def _search(self) -> bool:
        """Look for the earliest stop string that ends in text added since the last search."""
        if not self.stops:
            return False
        text = self._render.text
        begin = max(0, self._searched - self.longest + 1)
        found = [i for i in (text.find(s, begin) for s in self.stops) if i >= 0]
        self._searched = len(text)
        if found:
            self.stop_at = min(found)
        return bool(found)

    def take(self) -> str:
        """Text that became safe to show since the last call: complete characters, and not a tail
        that may still grow into a stop string."""
        text = self._render.text
        end = self.stop_at if self.stopped else len(text) - self._held(text)
        piece = text[self._shown:end]
        self._shown = max(self._shown, end)
        return piece

    def _held(self, text: str) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for k in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0

    def finish(self) -> str:
        """The sequence has ended: render what was held back (a character left incomplete renders
        as U+FFFD, as decode does), search it, and return the text not yet taken."""
        if not self.stopped and self._render.finish() and self._search():
            self.kept = len(self.tokens)
        if self.stopped:
            return self.take()
        piece = self._render.text[self._shown:]
        self._shown = len(self._render.text)
        return piece
