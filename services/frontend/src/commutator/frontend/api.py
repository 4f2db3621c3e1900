"""The OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

A request is validated, templated and tokenized, routed, and its worker's
token stream is detokenized (stop strings applied) into SSE chunks or one JSON
body. Errors before the first token get their HTTP status (400, 404, 413,
429 too many requests in flight here, 503 no worker, 529 all busy; 429 and 529
with ``Retry-After``); a stream that fails after it started ends with an error
event and ``[DONE]``, never a silent cut. A client that goes away cancels the
worker stream (aiohttp cancels the handler), which frees the worker's blocks
and the router's accounting.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

import orjson
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionResetError
from aiohttp.http_writer import StreamWriter
from commutator.common import metrics, tracing
from commutator.common.errors import (
    Cancelled,
    CommutatorError,
    DeadlineExceeded,
    InvalidRequest,
    NoInstances,
    Overloaded,
    Unavailable,
)
from commutator.common.prompt import TokenArray, token_array
from commutator.engines.vocab import first_outside
from commutator.frontend.choice import Choice, chat_delta, logprobs_json, piece
from commutator.frontend.detokenize import TextStream
from commutator.frontend.models import ModelRegistry
from commutator.frontend.preprocess import PreprocessError, Preprocessor
from commutator.frontend.protocol import ApiError, RequestLimits, SamplingRequest, parse_chat, parse_completion
from commutator.frontend.wire import generate_requests
from commutator.router.mux import SinkFailed
from commutator.v1 import common_pb2

__all__ = ["Backend", "OpenAIApi", "error_response"]

log = logging.getLogger(__name__)

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_DONE = b"data: [DONE]\n\n"
_RETRIES_BEFORE_FIRST_TOKEN = 2
_PUSH_BUFFER_LIMIT = 1 << 20  # bytes a pushed stream may leave unsent before its client counts as gone
_RETRY_AFTER_S = 1  # on 429, 503 and 529: a stream ends, a prefill finishes, a part restarts in about a second


class Backend(Protocol):
    """Where token-level requests go: the embedded router, or a router service."""

    def generate(
        self,
        request: common_pb2.GenerateRequest,
        metadata: Sequence[tuple[str, str]],
        prompt: Sequence[int] | None = None,
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        """``prompt``: the request's prompt (``token_bytes``) as the ``array('I')`` it was built from, for
        a backend that reads it (reading it back from the message would cost a conversion)."""
        ...


def error_response(err: ApiError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after_s)} if err.retry_after_s is not None else None
    return web.Response(
        status=err.status, body=orjson.dumps(err.body()), content_type="application/json", headers=headers
    )


def _api_error(exc: CommutatorError, model: str) -> ApiError:
    if isinstance(exc, NoInstances):
        return ApiError(
            503, f"no worker is serving model '{model}' right now", type="service_unavailable", code="no_workers"
        )
    if isinstance(exc, Overloaded):
        return ApiError(
            529, "all workers are busy; retry later", type="overloaded", code="overloaded", retry_after_s=_RETRY_AFTER_S
        )
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc).split(": ", 1)[-1])
    if isinstance(exc, DeadlineExceeded):
        return ApiError(504, "the request timed out", type="timeout")
    if isinstance(exc, Unavailable):
        return ApiError(
            503,
            "a worker or router serving this request went away; retry",
            type="service_unavailable",
            retry_after_s=_RETRY_AFTER_S,
        )
    # The detail (peer addresses, an engine's traceback line) goes to the log, not to the client.
    log.warning("request for %s failed: %s", model, exc)
    return ApiError(500, "the worker failed the request", type="internal_error")


class OpenAIApi:
    """The endpoints of one frontend process.

    ``limits`` caps the worker streams one request opens (400 past them).
    ``max_inflight_requests`` caps the generation requests served at once: one more
    gets 429 with ``Retry-After`` before its body is read. The count is exact: taken
    and released on the event loop around the whole handler (streams included), so a
    request that fails, or whose client goes away (the handler is cancelled), frees
    its slot at once.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        backend: Backend,
        *,
        limits: RequestLimits,
        max_inflight_requests: int,
        body_timeout_s: float = 60.0,
    ) -> None:
        if max_inflight_requests < 1:
            raise ValueError(f"max_inflight_requests must be at least 1, got {max_inflight_requests}")
        self.registry = registry
        self.backend = backend
        self.limits = limits
        self.max_inflight_requests = max_inflight_requests
        self.body_timeout_s = body_timeout_s
        """How long a request's body may take to arrive (then 408)."""
        self.inflight_requests = 0
        """Generation requests being served now (what the cap is checked against)."""
        self._inflight = metrics.FRONTEND_INFLIGHT
        self._ttft = metrics.FRONTEND_TTFT_SECONDS
        self._chunk = metrics.FRONTEND_CHUNK_SECONDS
        self._tok_prompt = metrics.FRONTEND_TOKENS.labels("prompt")
        self._tok_cached = metrics.FRONTEND_TOKENS.labels("cached")
        self._tok_completion = metrics.FRONTEND_TOKENS.labels("completion")

    # -- endpoints ------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": e.name, "object": "model", "created": e.created, "owned_by": "commutator"}
            for e in self.registry.names()
        ]
        return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        if self.inflight_requests >= self.max_inflight_requests:
            metrics.FRONTEND_REQUESTS.labels(endpoint, "429").inc()
            return error_response(
                ApiError(
                    429,
                    f"this frontend is serving its limit of {self.max_inflight_requests} requests; retry later",
                    type="rate_limit_exceeded",
                    code="too_many_requests",
                    retry_after_s=_RETRY_AFTER_S,
                )
            )
        # Taken with no await since the check, released in the finally below (errors and cancellation too).
        self.inflight_requests += 1
        t0 = time.perf_counter()
        self._inflight.inc()
        status = 200
        try:
            try:
                body = await _read_json(request, self.body_timeout_s)
                resp = await (self._chat(request, body, t0) if chat else self._completion(request, body, t0))
                status = resp.status
                return resp
            except ApiError as err:
                status = err.status
                resp = error_response(err)
                if err.close:
                    resp.force_close()
                return resp
        finally:
            self.inflight_requests -= 1
            self._inflight.dec()
            metrics.FRONTEND_REQUESTS.labels(endpoint, str(status)).inc()

    # -- chat -------------------------------------------------------------------------------
    async def _chat(self, request: web.Request, body: Any, t0: float) -> web.StreamResponse:
        req = parse_chat(body, self.limits)
        pre = await self.registry.preprocessor(req.model)
        try:
            text = pre.render_chat(req.messages, add_generation_prompt=req.add_generation_prompt, tools=req.tools)
        except PreprocessError as exc:
            raise ApiError.bad(str(exc), "messages") from None
        if pre.over_context(text):
            raise _over_context(pre, "messages")
        tokens = token_array(pre.encode(text))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        return await self._generate(request, t0, rid, req.model, pre, [tokens], req.sampling, chat=True)

    async def _completion(self, request: web.Request, body: Any, t0: float) -> web.StreamResponse:
        req = parse_completion(body, self.limits)
        pre = await self.registry.preprocessor(req.model)
        if any(isinstance(p, str) and pre.over_context(p) for p in req.prompts):
            raise _over_context(pre, "prompt")
        prompts = [token_array(pre.encode(p)) if isinstance(p, str) else p for p in req.prompts]
        vocab = pre.tokenizer.get_vocab_size(with_added_tokens=True)
        for p in prompts:
            if not p:
                raise ApiError.bad("the prompt tokenizes to nothing", "prompt")
            bad = first_outside(p, vocab)  # numpy over the uint32 ids (a prompt has thousands)
            if bad is not None:
                raise ApiError.bad(f"token id {bad} is outside the vocabulary [0, {vocab})", "prompt")
        echo = [p if isinstance(p, str) else pre.decode(p) for p in req.prompts] if req.echo else None
        rid = f"cmpl-{uuid.uuid4().hex}"
        return await self._generate(request, t0, rid, req.model, pre, prompts, req.sampling, chat=False, echo=echo)

    # -- generation -------------------------------------------------------------------------
    async def _open(
        self,
        greq: common_pb2.GenerateRequest,
        model: str,
        pre: Preprocessor,
        stop: list[str],
        index: int,
        md: Sequence[tuple[str, str]],
        prompt: TokenArray,
    ) -> tuple[Choice, common_pb2.GenerateResponse | None]:
        """Start one choice and wait for its first message (so that errors still have an HTTP status);
        ``prompt``: its token ids (``greq.token_bytes``) as an ``array('I')``."""
        for attempt in range(_RETRIES_BEFORE_FIRST_TOKEN + 1):
            agen = self.backend.generate(greq, md, prompt)
            choice = Choice(index, agen, TextStream(pre.tokenizer, stop))
            try:
                first = await agen.__anext__()
                return choice, first
            except StopAsyncIteration:
                return choice, None
            except (Unavailable, Cancelled) as exc:
                # The worker went away, or refused the call because it is draining: route again.
                await choice.close()
                if attempt == _RETRIES_BEFORE_FIRST_TOKEN:
                    raise _api_error(exc, model) from None
                log.warning("worker unavailable before the first token of %s; routing again", greq.request_id)
                await asyncio.sleep(0.05 * (attempt + 1))
            except CommutatorError as exc:
                await choice.close()
                raise _api_error(exc, model) from None
        raise AssertionError("unreachable")

    async def _generate(
        self,
        request: web.Request,
        t0: float,
        rid: str,
        model: str,
        pre: Preprocessor,
        prompts: list[TokenArray],
        s: SamplingRequest,
        *,
        chat: bool,
        echo: list[str] | None = None,
    ) -> web.StreamResponse:
        """Serve ``len(prompts) * s.n`` choices; ``echo``: per prompt, text that goes before its choices' text."""
        greqs = generate_requests(
            rid, model, prompts, s, pre.context_length, prompt_param="messages" if chat else "prompt"
        )
        # The client's W3C trace context (if any) continues into the router and the workers.
        with tracing.server_span(f"POST {request.path}", request.headers.items(), request_id=rid) as span:
            return await self._generate_traced(
                request, t0, rid, model, pre, greqs, prompts, s, chat, tracing.inject_metadata(span=span), echo
            )

    async def _generate_traced(
        self,
        request: web.Request,
        t0: float,
        rid: str,
        model: str,
        pre: Preprocessor,
        greqs: list[common_pb2.GenerateRequest],
        prompts: list[TokenArray],
        s: SamplingRequest,
        chat: bool,
        md: list[tuple[str, str]],
        echo: list[str] | None,
    ) -> web.StreamResponse:
        """``greqs``: prompt-major, ``s.n`` per prompt of ``prompts`` (see :func:`generate_requests`)."""
        opened: list[tuple[Choice, common_pb2.GenerateResponse | None]] = []
        try:
            if len(greqs) == 1:
                opened.append(await self._open(greqs[0], model, pre, s.stop, 0, md, prompts[0]))
            else:
                results = await asyncio.gather(
                    *(self._open(g, model, pre, s.stop, i, md, prompts[i // s.n]) for i, g in enumerate(greqs)),
                    return_exceptions=True,
                )
                errors = [r for r in results if isinstance(r, BaseException)]
                opened = [r for r in results if not isinstance(r, BaseException)]  # type: ignore[misc]
                if errors:
                    raise errors[0]
            if echo is not None:
                for choice, _ in opened:
                    choice.echo = echo[choice.index // s.n]
            self._ttft.observe(time.perf_counter() - t0)
            created = int(time.time())
            if s.stream:
                return await self._stream(request, rid, model, created, pre, opened, s, chat)
            return await self._collect(rid, model, created, pre, opened, s, chat)
        finally:
            for choice, _ in opened:
                await choice.close()

    async def _push_rest(
        self,
        request: web.Request,
        writer: StreamWriter,
        choice: Choice,
        head: bytes,
        chat: bool,
        s: SamplingRequest,
        pre: Preprocessor,
        closing: Callable[[], bytes],
    ) -> common_pb2.GenerateResponse | None:
        """Write the rest of ``choice`` as its messages arrive; None once it has ended, or the next
        message when its stream cannot push (then the caller reads on). The last message's event
        leaves with ``closing()`` (the usage event if asked, ``[DONE]``) and the end of the chunked
        body, in one write from the message's own turn: the client has the whole response without
        waiting for the handler's task to be scheduled, and ``writer`` then counts as ended."""
        writer.send_headers()  # before any body bytes go straight to the transport
        transport = request.transport
        want_logprobs = s.logprobs is not None
        choice.chunks = 0

        def sink(msg: common_pb2.GenerateResponse) -> bool:
            text = choice.take(msg)
            if text or msg.token_ids or choice.finish is not None or (want_logprobs and choice.logprobs):
                if transport is None or transport.is_closing():
                    raise ClientConnectionResetError("the client went away")  # what aiohttp's writer raises
                data = b"data: " + head + piece(chat, choice, text, s, pre) + b"]}\n\n"
                choice.chunks += 1
                if choice.finish is not None:
                    data += closing()
                    transport.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data))  # the last chunk, then the end
                    writer._eof = True  # aiohttp's own write_eof then writes nothing (the end is out)
                    return True
                transport.write(b"%x\r\n%b\r\n" % (len(data), data))  # one HTTP/1.1 chunk
                if transport.get_write_buffer_size() > _PUSH_BUFFER_LIMIT:
                    raise ClientConnectionResetError(f"the client left {_PUSH_BUFFER_LIMIT} bytes unread")
            return choice.finish is not None

        try:
            return await choice.agen.asend(sink)  # type: ignore[attr-defined]
        except SinkFailed as exc:
            raise exc.original from None  # the client's connection: as a failed write would

    async def _collect(
        self,
        rid: str,
        model: str,
        created: int,
        pre: Preprocessor,
        opened: list[tuple[Choice, common_pb2.GenerateResponse | None]],
        s: SamplingRequest,
        chat: bool,
    ) -> web.Response:
        async def run(choice: Choice, first: common_pb2.GenerateResponse | None) -> str:
            parts = [choice.echo]
            if first is not None:
                parts.append(choice.take(first))
            while choice.finish is None:
                try:
                    resp = await choice.agen.__anext__()
                except StopAsyncIteration:
                    choice.finish = choice.finish or "stop"
                    break
                parts.append(choice.take(resp))
            return "".join(parts)

        try:
            texts = await asyncio.gather(*(run(c, f) for c, f in opened))
        except CommutatorError as exc:
            raise _api_error(exc, model) from None
        choices = []
        for (choice, _), text in zip(opened, texts, strict=True):
            lp = logprobs_json(pre, choice.logprobs, chat) if s.logprobs is not None else None
            if chat:
                choices.append(
                    {
                        "index": choice.index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": lp,
                        "finish_reason": choice.finish,
                    }
                )
            else:
                choices.append({"index": choice.index, "text": text, "logprobs": lp, "finish_reason": choice.finish})
        body = {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": self._usage([c for c, _ in opened], s.n),
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    def _usage(self, choices: list[Choice], n: int) -> dict[str, Any]:
        # Prompt tokens count once per prompt, not once per choice.
        prompt = sum(c.prompt_tokens for c in choices[::n])
        cached = sum(c.cached for c in choices[::n])
        completion = sum(c.completion_tokens for c in choices)
        self._tok_prompt.inc(prompt)
        self._tok_cached.inc(cached)
        self._tok_completion.inc(completion)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        model: str,
        created: int,
        pre: Preprocessor,
        opened: list[tuple[Choice, common_pb2.GenerateResponse | None]],
        s: SamplingRequest,
        chat: bool,
    ) -> web.StreamResponse:
        resp = _EventStream(headers=_SSE_HEADERS)
        writer = await resp.prepare(request)  # the headers wait for the first write (see _EventStream)
        obj = "chat.completion.chunk" if chat else "text_completion"
        head = orjson.dumps({"id": rid, "object": obj, "created": created, "model": model})[:-1] + b',"choices":['
        write = resp.write
        chunk_hist = self._chunk
        last = time.perf_counter()
        chunks = 0
        # The events that open the stream (the role, the echoed prompt, the first token's) leave in one
        # write with the headers: one system call, and the client woken once for all of them.
        lead: list[bytes] = []
        if chat:
            for choice, _ in opened:
                lead.append(
                    b"data: "
                    + head
                    + chat_delta(choice.index, {"role": "assistant", "content": ""}, None, None)
                    + b"]}\n\n"
                )
        for choice, _ in opened:
            if choice.echo:  # the prompt comes first (completions with echo)
                lead.append(b"data: " + head + piece(chat, choice, choice.echo, s, pre) + b"]}\n\n")
        queue: asyncio.Queue[tuple[Choice, common_pb2.GenerateResponse | BaseException | None]] | None = None
        readers: list[asyncio.Task[None]] = []
        closed = False  # the usage event and [DONE] are written (closing() was called)
        want_logprobs = s.logprobs is not None

        def closing() -> bytes:
            """The stream's last events: the usage (when asked) and ``[DONE]``; counts the usage once."""
            nonlocal closed
            closed = True
            usage = self._usage([c for c, _ in opened], s.n)
            if s.include_usage:
                return b"data: " + head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n" + _DONE
            return _DONE

        try:
            if len(opened) == 1:
                choice, first = opened[0]
                if first is not None:
                    text = choice.take(first)
                    # Every message with tokens gets its event, with empty text while the detokenizer holds
                    # bytes back (as vLLM streams them): a client sees each engine step.
                    if text or first.token_ids or choice.finish is not None or (want_logprobs and choice.logprobs):
                        lead.append(b"data: " + head + piece(chat, choice, text, s, pre) + b"]}\n\n")
                        chunks += 1
                if choice.finish is not None:  # the first message ended it: the whole response in one write
                    lead.append(closing())
                    await resp.write_eof(b"".join(lead))
                    return resp
                if lead:
                    await write(b"".join(lead))
                # After the first message, the rest are written from the worker stream's reader as they
                # arrive (push), with no task woken per token; HTTP/1.1 chunked responses only.
                push_to = (
                    writer if isinstance(writer, StreamWriter) and writer.chunked and not resp.compression else None
                )
                if not hasattr(choice.agen, "asend"):
                    push_to = None
                while choice.finish is None:
                    if push_to is not None:
                        pw, push_to = push_to, None
                        try:
                            nxt = await self._push_rest(request, pw, choice, head, chat, s, pre, closing)
                        except StopAsyncIteration:
                            nxt = None
                        if nxt is None:  # pushed to the end
                            chunks += choice.chunks
                            if choice.finish is None:
                                choice.finish = "stop"
                                await write(b"data: " + head + piece(chat, choice, "", s, pre) + b"]}\n\n")
                            break
                        msg = nxt  # no push on this stream: go on reading
                    else:
                        try:
                            msg = await choice.agen.__anext__()
                        except StopAsyncIteration:
                            if choice.finish is None:
                                choice.finish = "stop"
                                await write(b"data: " + head + piece(chat, choice, "", s, pre) + b"]}\n\n")
                            break
                    text = choice.take(msg)
                    if text or msg.token_ids or choice.finish is not None or (want_logprobs and choice.logprobs):
                        await write(b"data: " + head + piece(chat, choice, text, s, pre) + b"]}\n\n")
                        chunks += 1
                    if choice.finish is not None:
                        break
                if chunks > 1:  # one observation per request: the mean gap (per-chunk ones cost more than they tell)
                    chunk_hist.observe((time.perf_counter() - last) / (chunks - 1))
            else:
                if lead:
                    await write(b"".join(lead))
                queue = asyncio.Queue(maxsize=64 * len(opened))

                async def pump(choice: Choice, first: common_pb2.GenerateResponse | None) -> None:
                    """Owns its choice's worker stream: reads it into the queue, closes it when done."""
                    assert queue is not None
                    try:
                        if first is not None:
                            await queue.put((choice, first))
                        async for m in choice.agen:
                            await queue.put((choice, m))
                        await queue.put((choice, None))
                    except CommutatorError as exc:
                        await queue.put((choice, exc))
                    finally:
                        await choice.close()

                loop = asyncio.get_running_loop()
                pumps = {id(c): loop.create_task(pump(c, f)) for c, f in opened}
                readers = list(pumps.values())
                remaining = len(opened)
                while remaining:
                    choice, item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if choice.finish is not None:
                        continue
                    text = "" if item is None else choice.take(item)
                    if item is None and choice.finish is None:
                        choice.finish = "stop"
                    if text or choice.finish is not None or (item is not None and item.token_ids):
                        await write(b"data: " + head + piece(chat, choice, text, s, pre) + b"]}\n\n")
                    if choice.finish is not None:
                        remaining -= 1
                        pumps[id(choice)].cancel()  # a stop string ends it early: stop its worker
            if not closed:
                await resp.write_eof(closing())
        except CommutatorError as exc:
            err = _api_error(exc, model)
            log.warning("stream %s failed after it started: %s", rid, exc)
            await write(b"data: " + orjson.dumps(err.body()) + b"\n\n")
        finally:
            for t in readers:
                t.cancel()
            if readers:
                await asyncio.gather(*readers, return_exceptions=True)
        # [DONE] and the end of the chunked body leave in one write (above; after an error, here): a client
        # that stops reading at [DONE] finds the connection at a clean end, ready for its next request.
        await resp.write_eof(_DONE)
        return resp


class _EventStream(web.StreamResponse):
    """An SSE response whose headers leave with its first write rather than in a write of their own
    (aiohttp's ``StreamResponse`` sends them from ``prepare``): the stream's first token then costs one
    system call, and the client one wake-up. ``Response`` holds its headers the same way."""

    _send_headers_immediately = False


def _over_context(pre: Preprocessor, param: str) -> ApiError:
    return ApiError.bad(f"the prompt has more tokens than this model's context of {pre.context_length} tokens", param)


async def _read_json(request: web.Request, timeout_s: float) -> Any:
    """The body as JSON: 415 for a compressed one (the server does not inflate bodies, so a compression
    bomb costs nothing); 413 past the application's size limit, from ``Content-Length`` before any byte is
    read (aiohttp then reads and drops the rest for a while, so that the client, still sending, gets the
    answer) or while reading; 408 when it takes over ``timeout_s`` (the connection is then closed)."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415,
            f"Content-Encoding {encoding[:40]!r} is not supported: send the body uncompressed",
            code="unsupported_content_encoding",
        )
    limit = request._client_max_size  # the application's configured limit
    too_large = ApiError(
        413, f"the request body is larger than {limit} bytes", type="invalid_request_error", code="request_too_large"
    )
    length = request.content_length
    if length is not None and length > limit:
        raise too_large
    try:
        async with asyncio.timeout(timeout_s):
            data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout", close=True
        ) from None
    except web.RequestPayloadError as exc:  # a malformed chunked body
        raise ApiError(400, f"the request body cannot be read: {exc}".replace("\n", " "), close=True) from None
    if not data:
        raise ApiError.bad("the request body is empty")
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ApiError.bad(f"the request body is not valid JSON: {exc}") from None
