"""Incremental detokenization with stop strings.

Tokens become text through the tokenizer's own streaming decoder
(``tokenizers.decoders.DecodeStream``), which holds bytes back until they form
whole UTF-8 characters: a multi-byte character split across tokens is never
emitted broken. Stop strings may span token boundaries: text that could still
turn out to be the start of a stop string is held back until it cannot, and
a stop string found is cut off together with everything after it.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

__all__ = ["TextStream"]


class TextStream:
    """Text for one choice, as tokens arrive."""

    __slots__ = ("_decoder", "_hold", "_max_stop", "_pending", "_stops", "_tokenizer", "stopped")

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._decoder = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._stops = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._pending = ""
        self._hold = self._max_stop > 0
        self.stopped: str | None = None
        """The stop string that ended the text, once one did."""

    def push(self, token_ids: Sequence[int]) -> str:
        """Text that is final after these tokens ('' if none yet). After a stop string, always ''."""
        if self.stopped is not None:
            return ""
        step = self._decoder.step
        tok = self._tokenizer
        new = ""
        for t in token_ids:
            piece = step(tok, t)
            if piece:
                new += piece
        if not self._hold:
            return new
        text = self._pending + new
        cut = -1
        for s in self._stops:
            i = text.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut, self.stopped = i, s
        if cut != -1:
            self._pending = ""
            return text[:cut]
        # Keep the longest tail that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._max_stop - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                keep = n
                break
        self._pending = text[-keep:] if keep else ""
        return text[:-keep] if keep else text

    def flush(self) -> str:
        """The held-back text, at the end of generation (no stop string came)."""
        out, self._pending = self._pending, ""
        return "" if self.stopped is not None else out
