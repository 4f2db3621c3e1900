"""What an engine shell keeps between its passes and its readers (asyncio, no engine logic).

Shared by the engines that run the pure scheduler (mocker, hf):

- :class:`OutputChannel`: the tokens of one request that its reader has not
  taken yet, coalesced into one :class:`EngineOutput` per read, so a slow
  reader never holds more than its request's own output;
- :class:`~commutator.engines.kv_buffer.KvEventBuffer`: KV events waiting for
  the publisher, bounded (re-exported here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from commutator.engines.base import EngineOutput, FinishReason, TokenLogprob
from commutator.engines.kv_buffer import KV_EVENT_BUFFER_LIMIT, KvEventBuffer

__all__ = ["KV_EVENT_BUFFER_LIMIT", "KvEventBuffer", "OutputChannel"]

log = logging.getLogger(__name__)


class OutputChannel:
    """Tokens of one request not yet taken by its reader: coalesced, never more than the request's own output.

    A reader either awaits :meth:`take`, or (``notify`` given) is called back on every push and
    takes what is there with :meth:`take_now` when it suits it (no task waits per request).
    """

    __slots__ = ("error", "finish", "logprobs", "notify", "ready", "tokens")

    def __init__(self, notify: Callable[[], None] | None = None) -> None:
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] | None = None
        self.finish: FinishReason | None = None
        self.error: str | None = None
        self.notify = notify
        self.ready = asyncio.Event()

    def push(self, token: int, logprob: TokenLogprob | None, reason: FinishReason | None) -> None:
        """One more token (ignored once the request has finished, e.g. aborted while its pass ran)."""
        if self.finish is not None:
            return
        self.tokens.append(token)
        if logprob is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.append(logprob)
        if reason is not None:
            self.finish = reason
        if self.notify is not None:
            self.notify()
        else:
            self.ready.set()

    def close(self, reason: FinishReason, error: str | None = None) -> None:
        """Finish the request with ``reason`` unless it has finished already."""
        if self.finish is None:
            self.finish = reason
            self.error = error
            if self.notify is not None:
                self.notify()
            else:
                self.ready.set()

    async def take(self) -> EngineOutput:
        """Wait for news, then everything since the last call (the last one carries the finish reason)."""
        await self.ready.wait()
        self.ready.clear()
        return self.take_now()

    def take_now(self) -> EngineOutput:
        """Everything since the last take (no tokens and no finish reason: nothing new)."""
        tokens, self.tokens = self.tokens, []
        logprobs, self.logprobs = self.logprobs, None
        return EngineOutput(tokens, self.finish, logprobs=logprobs, error=self.error)
