"""The text side of generation, outside the engine (which speaks token ids): stop strings and streaming.

    stop = StopStrings(tokenizer.decode, ["\\n\\n", "###"])   # stateless: one for any number of requests
    engine.submit(ids, params, stop=stop)          # ends the request once its text contains a stop string
    text = stop.truncate(tokenizer.decode(tokens)) # the text before the first stop string

    text = TextDecoder(tokenizer, ["###"])         # one per request: its stop callable and its text
    request = engine.submit(ids, params, stop=text)
    while engine.has_work:
        engine.step()
        print(text.take(), end="")                 # new text, never a stop string or a piece of one
    print(text.take(final=True))
"""

from __future__ import annotations

from typing import Callable

from ..tokenizer import Tokenizer


class StopStrings:
    """A `stop` callable for the engine: True once the decoded tokens contain one of the strings.

    Only the last few tokens are decoded each call (enough to hold the longest stop string), so
    checking stays cheap however long the output grows.
    """

    def __init__(self, decode: Callable[[list[int]], str], strings: list[str]):
        strings = [s for s in strings if s]
        if not strings:
            raise ValueError("StopStrings needs at least one non-empty string")
        self.decode, self.strings = decode, strings
        # a byte-level token holds at least one byte, so a string of B UTF-8 bytes spans at most B
        # tokens (counting characters is not enough: a 3-byte character may be 3 tokens), plus a few
        # for a multi-byte character cut in two
        self.window = max(len(s.encode("utf-8", "surrogatepass")) for s in strings) + 4

    def __call__(self, tokens: list[int]) -> bool:
        tail = self.decode(tokens[-self.window :])
        return any(s in tail for s in self.strings)

    def truncate(self, text: str) -> str:
        cut = min((i for s in self.strings if (i := text.find(s)) >= 0), default=len(text))
        return text[:cut]


class TextDecoder:
    """Incremental detokenization with stop strings; fed and read on the engine thread only."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.text = ""
        self.stopped_at: int | None = None  # where the first stop string begins, once one appeared
        self._decoder = tokenizer.decode_stream(skip_special_tokens=True)
        self._tokens = 0  # tokens decoded so far
        self._checked = 0  # text[:_checked] has been searched for stop strings
        self._sent = 0  # text[:_sent] has been handed out
        self._all_tokens: list[int] = []

    def __call__(self, tokens: list[int]) -> bool:
        """The engine's stop callable: decode the new tokens; True once a stop string appeared."""
        for token in tokens[self._tokens:]:
            piece = self._decoder.step(self.tokenizer.backend, token)
            if piece:
                self.text += piece
        self._tokens = len(tokens)
        self._all_tokens = tokens
        self._find_stop()
        return self.stopped_at is not None

    def _find_stop(self) -> None:
        """Search the text added since the last search for stop strings; set stopped_at at the first."""
        if self.stop and self.stopped_at is None:
            # a match may straddle old and new text, so search from just before the new text
            start = max(0, self._checked - max(map(len, self.stop)) + 1)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            self._checked = len(self.text)
            if hits:
                self.stopped_at = min(hits)

    def take(self, final: bool = False) -> str:
        """The text not yet handed out: all of it when final, else up to any possible stop-string start."""
        if final and self.stopped_at is None:
            # the stream decoder holds back bytes of an unfinished UTF-8 character; at the end they are
            # text too (replacement characters, as a one-shot decode gives them)
            whole = self.tokenizer.decode(self._all_tokens, skip_special_tokens=True)
            if len(whole) > len(self.text) and whole.startswith(self.text):
                self.text = whole
                self._find_stop()  # a stop string may hold replacement characters too: it must not leak now
        end = len(self.text) if self.stopped_at is None else self.stopped_at
        if not final and self.stopped_at is None:
            end -= self._held_back()
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string.

        Only the last len(s) - 1 characters can begin a piece of s, and only where s's first character
        is: find() jumps from one such place to the next, so a step costs about a scan of that tail
        rather than a comparison at every position in it.
        """
        longest = 0
        for s in self.stop:
            i = self.text.find(s[0], max(0, len(self.text) - len(s) + 1))
            while 0 <= i and len(self.text) - i > longest:
                if s.startswith(self.text[i:]):
                    longest = len(self.text) - i  # the earliest place is this stop string's longest piece
                    break
                i = self.text.find(s[0], i + 1)
        return longest
