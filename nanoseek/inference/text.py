"""The text side of generation, outside the engine (which speaks token ids): stop strings and streaming.

    stop = StopStrings(tokenizer.decode, ["\\n\\n", "###"])
    engine.submit(ids, params, stop=stop)          # ends the request once its text contains a stop string
    text = stop.truncate(tokenizer.decode(tokens)) # the text before the first stop string

    printer = TextStream(tokenizer, stop_strings=["###"])
    for tokens in request: print(printer.push(tokens), end="")
    print(printer.finish())
"""

from __future__ import annotations

from typing import Callable


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
        # a string of L characters spans at most L tokens, plus a few for a multi-byte character cut in two
        self.window = max(len(s) for s in strings) + 4

    def __call__(self, tokens: list[int]) -> bool:
        tail = self.decode(tokens[-self.window :])
        return any(s in tail for s in self.strings)

    def truncate(self, text: str) -> str:
        cut = min((i for s in self.strings if (i := text.find(s)) >= 0), default=len(text))
        return text[:cut]


class TextStream:
    """Turns streamed token ids into printable text: whole characters only, and text that may be the
    start of a stop string held back until it is known not to be one."""

    def __init__(self, tokenizer, stop_strings: list[str] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.stop = StopStrings(tokenizer.decode, stop_strings) if stop_strings else None
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.shown = 0  # characters of the decoded text already returned

    def _text(self) -> str:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=self.skip_special_tokens)
        return self.stop.truncate(text) if self.stop else text

    def push(self, tokens: list[int]) -> str:
        """New text to show after these tokens ('' when nothing can be shown yet)."""
        self.tokens += tokens
        text = self._text()
        if text.endswith("\ufffd"):  # a multi-byte character still incomplete
            text = text[:-1]
        safe = len(text)
        if self.stop:
            hold = max(len(s) for s in self.stop.strings) - 1
            safe = max(self.shown, len(text) - hold)
        piece = text[self.shown : safe]
        self.shown += len(piece)
        return piece

    def finish(self) -> str:
        """The rest of the text, up to the first stop string."""
        text = self._text()
        piece, self.shown = text[self.shown :], len(text)
        return piece
