"""Request migration: what a request has streamed so far, to continue it elsewhere (pure).

Used by the router (a worker that fails mid-stream) and by a frontend that sends its requests to
a router service (a router that fails mid-stream).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from commutator.common.errors import Unavailable
from commutator.common.prompt import prompt_len, to_le_bytes
from commutator.v1 import common_pb2

__all__ = ["Progress"]


class Progress:
    """What a migratable request has streamed so far, to continue it on another worker.

    Migration sends the prompt plus every token streamed so far as the new prompt, with the
    token budget (``max_tokens``, ``min_tokens``) reduced by what was streamed, under the same
    request id (an engine that seeds its sampling by id or by ``sampling.seed`` keeps that seed).
    The consumer must see one request: the new worker's prompt counts (``prompt_tokens``,
    ``cached_prompt_tokens``) are those of the longer prompt, so they are replaced by the original
    prompt's length, or cleared where the first worker already reported them.
    """

    __slots__ = ("generated", "max_tokens", "migrations", "min_tokens", "prompt_len", "prompt_seen", "started")

    def __init__(self, request: common_pb2.GenerateRequest) -> None:
        self.prompt_len = prompt_len(request)
        self.max_tokens = request.stop.max_tokens
        self.min_tokens = request.stop.min_tokens
        self.generated: list[int] = []
        self.migrations = 0
        self.prompt_seen = False
        self.started = False  # a response reached the consumer

    def take(self, resp: common_pb2.GenerateResponse) -> None:
        """``resp`` goes to the consumer: count its tokens, and make its prompt counts the original's."""
        self.started = True
        if resp.prompt_tokens:
            if self.migrations:
                if self.prompt_seen:
                    resp.prompt_tokens = 0
                    resp.cached_prompt_tokens = 0
                else:
                    resp.prompt_tokens = self.prompt_len
                    resp.cached_prompt_tokens = min(resp.cached_prompt_tokens, self.prompt_len)
            self.prompt_seen = True
        if resp.token_ids:
            self.generated.extend(resp.token_ids)

    def counting(
        self, sink: Callable[[common_pb2.GenerateResponse], bool]
    ) -> Callable[[common_pb2.GenerateResponse], bool]:
        """``sink``, with every response it is handed taken first (push mode)."""
        take = self.take

        def counted(resp: common_pb2.GenerateResponse) -> bool:
            take(resp)
            return sink(resp)

        return counted

    def migrate(self, request: common_pb2.GenerateRequest) -> common_pb2.GenerateRequest:
        """The request to send another worker: the original prompt (``request`` as first sent, or as last
        migrated) continued by the tokens streamed so far."""
        self.migrations += 1
        new = common_pb2.GenerateRequest()
        new.CopyFrom(request)
        n = len(self.generated)
        if new.token_bytes:
            new.token_bytes = new.token_bytes[: self.prompt_len * 4] + to_le_bytes(self.generated)
        else:
            del new.token_ids[self.prompt_len :]
            new.token_ids.extend(self.generated)
        if self.max_tokens:
            new.stop.max_tokens = max(0, self.max_tokens - n)
        new.stop.min_tokens = max(0, self.min_tokens - n)
        new.ClearField("dp_rank")
        return new

    def migrate_or_raise(
        self, request: common_pb2.GenerateRequest, failure: Exception, limit: int, counter: Any
    ) -> common_pb2.GenerateRequest:
        """:meth:`migrate`, counted in ``counter`` (a counter with an ``outcome`` label); past ``limit``
        migrations, ``Unavailable`` saying so instead."""
        if self.migrations >= limit:
            counter.labels("limit").inc()
            raise Unavailable(
                f"{failure} (request {request.request_id} migrated {self.migrations} times already: "
                f"--migration-limit {limit})"
            )
        counter.labels("migrated").inc()
        return self.migrate(request)

    @property
    def done(self) -> bool:
        """Every token the request may generate has been streamed (only its end was lost)."""
        return bool(self.max_tokens) and len(self.generated) >= self.max_tokens

    def final(self) -> common_pb2.GenerateResponse:
        """The end the failed worker did not send: the request hit its token limit."""
        return common_pb2.GenerateResponse(finish_reason=common_pb2.FINISH_REASON_LENGTH)
