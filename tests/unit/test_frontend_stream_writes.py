"""The writes a streamed response makes (issue 12): the last token's event, the usage, ``[DONE]`` and
the end of the chunked body leave in one write from the worker stream's push, so the client has the
whole response without waiting for the handler's task; a response whose first message ends it is one
write from its status line to its end. The worker stream is a hand-written fake of the push protocol
(``asend(sink)``, the sink called from a later turn of the loop, as the worker's frames call it) and
the connection a recording transport under aiohttp's own ``StreamWriter``."""

from __future__ import annotations

import asyncio
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request
from commutator.frontend.api import OpenAIApi
from commutator.frontend.choice import Choice
from commutator.frontend.detokenize import TextStream
from commutator.frontend.preprocess import Preprocessor
from commutator.frontend.protocol import RequestLimits, parse_completion
from commutator.v1 import common_pb2
from tokenizers import Tokenizer, decoders, models

pytestmark = pytest.mark.unit

MODEL = "m"


class RecordingTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        self.writes.append(b"".join(parts))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class PushedStream:
    """Fake of the worker stream's push protocol (``commutator.router.mux.MuxRequest``): the first
    message from ``__anext__``, the rest handed to ``asend``'s sink, one per turn of the loop, until
    the sink says the choice has ended."""

    def __init__(self, messages: list[common_pb2.GenerateResponse]) -> None:
        self.messages = list(messages)
        self.closed = False

    def __aiter__(self) -> PushedStream:
        return self

    async def __anext__(self) -> common_pb2.GenerateResponse:
        if not self.messages:
            raise StopAsyncIteration
        return self.messages.pop(0)

    async def asend(self, sink: Any) -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def push() -> None:
            if sink(self.messages.pop(0)):
                done.set_result(None)
            elif self.messages:
                loop.call_soon(push)
            else:
                done.set_exception(StopAsyncIteration())

        loop.call_soon(push)
        await done

    async def aclose(self) -> None:
        self.closed = True


def tokens(
    *ids: int, finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED, prompt: int = 0
) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(token_ids=list(ids), finish_reason=finish, prompt_tokens=prompt)


async def stream(
    messages: list[common_pb2.GenerateResponse], *, chat: bool = False, tokenizer: Tokenizer | None = None, **body: Any
) -> tuple[list[bytes], PushedStream]:
    transport = RecordingTransport()
    protocol = mock.Mock(transport=transport, _paused=False)
    writer = StreamWriter(protocol, asyncio.get_running_loop())
    request = make_mocked_request("POST", "/v1/completions", writer=writer, transport=transport, protocol=protocol)
    tok = tokenizer or Tokenizer(models.BPE(vocab={chr(c): c for c in range(32, 127)}, merges=[]))
    pre = Preprocessor(tok, None, (), context_length=4096)
    s = parse_completion({"model": MODEL, "prompt": [40, 41], "stream": True, **body}).sampling
    fake = PushedStream(messages)
    choice = Choice(0, fake, TextStream(tok, []))
    first = await fake.__anext__()
    api = OpenAIApi(None, None, limits=RequestLimits(), max_inflight_requests=1)  # type: ignore[arg-type]
    await api._stream(request, "cmpl-1", MODEL, 0, pre, [(choice, first)], s, chat)
    return transport.writes, fake


def events(data: bytes) -> list[Any]:
    lines = [line[6:] for line in data.split(b"\n") if line.startswith(b"data: ")]
    return ["[DONE]" if line == b"[DONE]" else orjson.loads(line) for line in lines]


@pytest.mark.parametrize("usage", [False, True])
async def test_the_last_event_usage_done_and_the_end_are_one_write(usage: bool) -> None:
    msgs = [tokens(72, prompt=2), tokens(73), tokens(74), tokens(75, finish=common_pb2.FINISH_REASON_LENGTH)]
    body = {"stream_options": {"include_usage": True}} if usage else {}
    writes, _ = await stream(msgs, max_tokens=4, **body)
    assert writes[0].startswith(b"HTTP/1.1 200 OK\r\n")  # the headers with the first token's event
    last = writes[-1]
    assert last.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert last.count(b"data: {") == (2 if usage else 1)  # the last token's event (and the usage) with it
    got = events(last)
    assert got[0]["choices"][0]["text"].strip() == "K" and got[0]["choices"][0]["finish_reason"] == "length"
    if usage:
        assert got[1]["usage"]["completion_tokens"] == 4 and got[1]["choices"] == [] and got[2] == "[DONE]"
    else:
        assert got[1:] == ["[DONE]"]
    # Every event in order, each token once, and nothing written after the end.
    texts = [e["choices"][0]["text"].strip() for w in writes for e in events(w) if e != "[DONE]" and e["choices"]]
    assert texts == ["H", "I", "J", "K"]
    assert b"".join(writes).count(b"0\r\n\r\n") == 1 and len(writes) == 4


@pytest.mark.parametrize("usage", [False, True])
async def test_a_response_its_first_message_ends_is_one_write(usage: bool) -> None:
    body = {"stream_options": {"include_usage": True}} if usage else {}
    writes, _ = await stream([tokens(72, prompt=2, finish=common_pb2.FINISH_REASON_LENGTH)], max_tokens=1, **body)
    assert len(writes) == 1
    (only,) = writes
    assert only.startswith(b"HTTP/1.1 200 OK\r\n") and only.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    got = events(only)
    assert got[0]["choices"][0]["text"].strip() == "H" and got[-1] == "[DONE]"
    assert ("usage" in got[1]) is usage


def _byte_level() -> Tokenizer:
    """A byte-level BPE (as Llama 3's and GPT-2's) with one token per byte: token ``b`` is byte ``b``."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(shifted)}
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.mark.parametrize("chat", [False, True])
async def test_a_token_whose_text_is_held_back_still_gets_its_event(chat: bool) -> None:
    # "é" is two bytes, C3 A9, so two tokens here: the first has no text of its own until the second comes.
    # Its event still goes out, with empty text (as vLLM streams it): a client sees every engine step, and
    # a gap between events is one step, not two.
    msgs = [
        tokens(ord("H"), prompt=2),
        tokens(0xC3),
        tokens(0xA9),
        tokens(ord("I"), finish=common_pb2.FINISH_REASON_LENGTH),
    ]
    writes, _ = await stream(msgs, max_tokens=4, chat=chat, tokenizer=_byte_level())
    got = [e["choices"][0] for w in writes for e in events(w) if e != "[DONE]" and e["choices"]]
    if chat:
        assert got[0]["delta"] == {"role": "assistant", "content": ""}
        got = got[1:]
        assert [c["delta"] for c in got] == [{"content": "H"}, {"content": ""}, {"content": "é"}, {"content": "I"}]
    else:
        assert [c["text"] for c in got] == ["H", "", "é", "I"]
    assert [c["finish_reason"] for c in got] == [None, None, None, "length"]


async def test_a_message_without_tokens_or_text_writes_no_event() -> None:
    msgs = [tokens(72, prompt=2), tokens(), tokens(73, finish=common_pb2.FINISH_REASON_LENGTH)]
    writes, _ = await stream(msgs, max_tokens=2)
    got = [e["choices"][0]["text"].strip() for w in writes for e in events(w) if e != "[DONE]" and e["choices"]]
    assert got == ["H", "I"]
