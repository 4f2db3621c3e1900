"""The independent load client (benchmarks/independent_client.py): its SSE parser, its prompts, and
how the harness reads its report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
from commutator.cli.independent import summary_from_report

pytestmark = pytest.mark.unit


def independent_client() -> ModuleType:
    path = Path(__file__).parents[2] / "benchmarks" / "independent_client.py"
    spec = importlib.util.spec_from_file_location("independent_client", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_the_sse_parser_handles_any_split_line_endings_and_multi_line_data() -> None:
    ic = independent_client()
    stream = (
        b'data: {"a": 1}\r\n\r\n'
        b": a comment\n"
        b"event: x\ndata: line one\ndata:line two\n\n"
        b"id: 7\n\n"  # no data: not dispatched
        b"data: caf\xc3\xa9\r\rdata: [DONE]\n\n"
    )
    want = ['{"a": 1}', "line one\nline two", "café", "[DONE]"]
    whole = ic.SseParser().feed(stream)
    assert whole == want
    for size in (1, 2, 3, 5, 7):
        parser = ic.SseParser()
        got = [e for i in range(0, len(stream), size) for e in parser.feed(stream[i : i + size])]
        assert got == want, size


def test_independent_prompts_have_exact_lengths_and_shared_prefixes(tmp_path: Path) -> None:
    ic = independent_client()
    p = ic.Prompts("completions", isl=100, osl=8, groups=3, prefix_ratio=0.75, seed=1)
    bodies = [p.next_body("m") for _ in range(30)]
    assert all(path == "/completions" and len(b["prompt"]) == 100 and b["max_tokens"] == 8 for path, b in bodies)
    assert len({tuple(b["prompt"][:75]) for _, b in bodies}) <= 3
    assert len({tuple(b["prompt"][75:]) for _, b in bodies}) == 30
    vocab = {f"Ġw{chr(97 + i % 26)}{i}": i for i in range(200)}
    vocab.update({f"Ġ{chr(97 + i)}{chr(97 + j)}": 1000 + 26 * i + j for i in range(26) for j in range(26)})
    tok = tmp_path / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"vocab": vocab}}))
    chat = ic.Prompts("chat", isl=50, osl=4, groups=2, prefix_ratio=0.5, seed=2, tokenizer=tok)
    path, body = chat.next_body("m")
    text = body["messages"][0]["content"]
    assert path == "/chat/completions" and text.startswith(" ") and len(text.split(" ")) == 51
    vocab.update({f"{chr(97 + i)}{chr(97 + j)}": 2000 + 26 * i + j for i in range(26) for j in range(26)})
    tok.write_text(json.dumps({"model": {"vocab": vocab}}))
    lines = ic.Prompts("chat", isl=50, osl=4, groups=2, prefix_ratio=0.5, seed=2, tokenizer=tok, lines=4)
    text = lines.next_body("m")[1]["messages"][0]["content"]
    # 10 lines of 4 words and a newline: a word with no space first (a chunk boundary for the frontend's
    # tokenizer cache), then words with one; 50 pieces, each one token
    rows = text.split("\n")
    assert len(rows) == 11 and rows[-1] == ""
    assert all(len(r) == 2 + 3 * 3 and r[0] != " " and len(r.split(" ")) == 4 for r in rows[:-1])


def test_the_independent_report_reads_as_a_summary() -> None:
    rep = {
        "requests": 100,
        "errors": {"http 500": 1},
        "wall_s": 2.0,
        "requests_per_s": 50.0,
        "output_tokens_per_req": 64.0,
        "ttft_ms": {"p50": 1.0, "p99": 2.0},
        "itl_ms": {"p50": 0.1, "p99": 0.2},
        "chunk_gap_ms": {"p50": 0.1, "p99": 0.3},
        "prompt_tokens_per_req": 1000.0,
    }
    s = summary_from_report(rep)
    assert s["output_tokens_per_s"] == 3200.0 and s["chunk_ms"] == rep["chunk_gap_ms"] and s["errors"] == rep["errors"]


# (choice as streamed, carries a generated token)
_CHUNKS = [
    ({"index": 0, "text": "Hi", "logprobs": None, "finish_reason": None}, True),
    ({"index": 0, "text": "", "logprobs": None, "finish_reason": None}, True),  # a token whose text is held back
    ({"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}, False),  # the closing chunk
    ({"index": 0, "text": "!", "logprobs": None, "finish_reason": "length"}, True),  # the last token, closing
    ({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}, False),  # the role
    ({"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}, True),
    ({"index": 0, "delta": {"content": ""}, "finish_reason": None}, True),
    ({"index": 0, "delta": {}, "finish_reason": "stop"}, False),
    ({"index": 0, "delta": {}, "finish_reason": None}, False),  # nothing in it
]


@pytest.mark.parametrize(("choice", "token"), _CHUNKS)
def test_both_clients_count_the_chunks_that_carry_a_token(choice: dict[str, object], token: bool) -> None:
    # Both stacks stream one chunk per generated token, with empty text while a character's bytes are
    # incomplete: gaps and TTFT are taken between those chunks, in the harness's client and in the
    # independent one alike.
    from commutator.cli.loadgen import carries_token

    assert carries_token(choice) is token
    assert independent_client()._has_token({"choices": [choice]}) is token
