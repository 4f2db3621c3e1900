"""One choice (one of ``n`` per prompt): its worker stream, its text, and how it renders.

A :class:`Choice` turns its worker's messages into text (stop strings applied)
and counts tokens; the functions below render its pieces as OpenAI JSON.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from commutator.common.errors import CommutatorError
from commutator.frontend.detokenize import TextStream
from commutator.frontend.preprocess import Preprocessor
from commutator.frontend.protocol import SamplingRequest
from commutator.v1 import common_pb2

__all__ = ["Choice", "chat_delta", "logprobs_json", "piece"]

_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


class Choice:
    """One generation (one of ``n``): the worker stream and its detokenized text."""

    __slots__ = (
        "agen",
        "cached",
        "chunks",
        "completion_tokens",
        "echo",
        "finish",
        "index",
        "logprobs",
        "prompt_tokens",
        "text",
    )

    def __init__(self, index: int, agen: AsyncIterator[common_pb2.GenerateResponse], text: TextStream) -> None:
        self.index = index
        self.agen = agen
        self.text = text
        self.completion_tokens = 0
        self.chunks = 0
        """Chunks written while the choice's messages were pushed."""
        self.prompt_tokens = 0
        self.cached = 0
        self.finish: str | None = None
        self.logprobs: list[Any] = []
        self.echo = ""
        """The prompt's text, which goes before the generated text (completions with ``echo``)."""

    def take(self, resp: common_pb2.GenerateResponse) -> str:
        """Text of one worker message; sets :attr:`finish` when the choice ends."""
        if resp.prompt_tokens:
            self.prompt_tokens = resp.prompt_tokens
            self.cached = resp.cached_prompt_tokens
        ids = resp.token_ids
        self.completion_tokens += len(ids)
        out = self.text.push(ids)
        if resp.logprobs:
            self.logprobs.extend(resp.logprobs)
        if self.text.stopped is not None:
            self.finish = "stop"
        elif resp.finish_reason:
            if resp.finish_reason == common_pb2.FINISH_REASON_ERROR:
                raise CommutatorError(resp.error_message or "the engine failed the request")
            out += self.text.flush()
            self.finish = _FINISH.get(resp.finish_reason, "stop")
        return out

    async def close(self) -> None:
        aclose = getattr(self.agen, "aclose", None)
        if aclose is not None:
            await aclose()


def chat_delta(index: int, delta: dict[str, Any], finish: str | None, logprobs: Any) -> bytes:
    """One chat choice's part of a ``chat.completion.chunk``."""
    return orjson.dumps({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})


def piece(chat: bool, choice: Choice, text: str, s: SamplingRequest, pre: Preprocessor) -> bytes:
    """One choice's part of a streamed chunk: ``text`` and the logprobs gathered since the last one."""
    lp = None
    if s.logprobs is not None and choice.logprobs:
        lp = logprobs_json(pre, choice.logprobs, chat)
        choice.logprobs = []
    if chat:
        # A token whose text is not out yet (bytes of a character still to come, a skipped special token)
        # still gets its chunk, with empty content; the chunk that ends the choice has an empty delta.
        return chat_delta(choice.index, {"content": text} if text or choice.finish is None else {}, choice.finish, lp)
    return orjson.dumps({"index": choice.index, "text": text, "logprobs": lp, "finish_reason": choice.finish})


def logprobs_json(pre: Preprocessor, entries: list[Any], chat: bool) -> dict[str, Any]:
    """Logprobs in OpenAI's chat (``content``) or completions (``tokens``, ``text_offset``) shape."""
    if chat:
        content = []
        for e in entries:
            tok = pre.token_text(e.token_id)
            content.append(
                {
                    "token": tok,
                    "logprob": e.logprob,
                    "bytes": list(tok.encode()),
                    "top_logprobs": [
                        {"token": (t := pre.token_text(a.token_id)), "logprob": a.logprob, "bytes": list(t.encode())}
                        for a in e.top
                    ],
                }
            )
        return {"content": content}
    tokens = [pre.token_text(e.token_id) for e in entries]
    offsets = []
    pos = 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{pre.token_text(a.token_id): a.logprob for a in e.top} for e in entries],
        "text_offset": offsets,
    }
