"""Request validation: every bad value is a 400 naming its field; unknown fields are ignored."""

from __future__ import annotations

from array import array
from typing import Any

import pytest
from commutator.frontend.protocol import ApiError, RequestLimits, parse_chat, parse_completion

pytestmark = pytest.mark.unit

MSG = [{"role": "user", "content": "hi"}]


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": MSG, **kw}


def test_fields_are_read() -> None:
    r = parse_chat(
        chat(
            max_completion_tokens=7,
            max_tokens=99,
            temperature=0.5,
            top_p=0.9,
            top_k=5,
            seed=1,
            n=2,
            stop="END",
            stream=True,
            stream_options={"include_usage": True},
            logprobs=True,
            top_logprobs=3,
            ignore_eos=True,
            min_tokens=2,
            stop_token_ids=[9],
            future_field=[1, 2],
        )
    )
    s = r.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.n) == (7, 0.5, 0.9, 5, 1, 2)
    assert (s.stop, s.stop_token_ids, s.stream, s.include_usage, s.logprobs) == (["END"], [9], True, True, 3)
    assert (s.ignore_eos, s.min_tokens) == (True, 2)
    assert parse_chat(chat(max_tokens=4)).sampling.max_tokens == 4
    assert parse_chat(chat()).sampling.logprobs is None
    assert parse_chat(chat(temperature=1)).sampling.temperature == 1.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": MSG}, "model"),
        ({"model": 3, "messages": MSG}, "model"),
        (chat(messages=[]), "messages"),
        (chat(messages="hi"), "messages"),
        (chat(messages=[{"content": "x"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), "messages[0].content"),
        (chat(max_tokens=-1), "max_tokens"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens="10"), "max_tokens"),
        (chat(max_tokens=True), "max_tokens"),
        (chat(temperature=-0.1), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=0), "top_p"),
        (chat(n=0), "n"),
        (chat(stop=5), "stop"),
        (chat(stop_token_ids=[-1]), "stop_token_ids"),
        (chat(stream="yes"), "stream"),
        (chat(stream_options=[]), "stream_options"),
        (chat(top_logprobs=2), "top_logprobs"),
        (chat(logprobs=True, top_logprobs=50), "top_logprobs"),
        (chat(min_tokens=5, max_tokens=2), "min_tokens"),
    ],
)
def test_bad_chat_values(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_chat(body)
    assert err.value.status == 400 and err.value.param == field
    assert err.value.body()["error"]["type"] == "invalid_request_error"


def test_completion_prompt_forms() -> None:
    assert parse_completion({"model": "m", "prompt": "x"}).prompts == ["x"]
    assert parse_completion({"model": "m", "prompt": ["a", "b"]}).prompts == ["a", "b"]
    # Token-id prompts come back as uint32 arrays (what token_bytes and the block hashes read).
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompts == [array("I", [1, 2, 3])]
    assert parse_completion({"model": "m", "prompt": [[1], [2, 3]]}).prompts == [array("I", [1]), array("I", [2, 3])]
    assert parse_completion({"model": "m", "prompt": [0, 1.0, 2**32 - 1]}).prompts == [array("I", [0, 1, 2**32 - 1])]
    assert parse_completion({"model": "m", "prompt": "x", "logprobs": 2}).sampling.logprobs == 2
    for bad in ("", [], [[]], [1, "a"], None, 5, [True], [5, 0, False, 9], [[2], [1, True]], [-1], [2**32], [1.5]):
        with pytest.raises(ApiError) as err:
            parse_completion({"model": "m", "prompt": bad})
        assert err.value.param == "prompt"


def test_long_token_prompt_checked_in_c() -> None:
    """A long prompt whose ids include 0 and 1 as ints is taken; JSON's false among them is not."""
    ids = [i % 50_000 for i in range(12_000)]  # 0 and 1 appear 240 times each
    (got,) = parse_completion({"model": "m", "prompt": ids}).prompts
    assert got == array("I", ids)
    with pytest.raises(ApiError, match="got False"):
        parse_completion({"model": "m", "prompt": [*ids[:7_000], False, *ids[7_000:]]})
    with pytest.raises(ApiError, match="JSON object"):
        parse_completion([1, 2])


def test_fan_out_is_capped_per_request() -> None:
    """Each prompt times ``n`` is one worker stream opened at once: the defaults cap all three."""
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": ["x"] * 10_000})
    assert (err.value.status, err.value.param) == (400, "prompt")
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": [[1]] * 10_000})
    assert (err.value.status, err.value.param) == (400, "prompt")
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": ["x"] * 200, "n": 100})
    assert (err.value.status, err.value.param) == (400, "n")
    with pytest.raises(ApiError) as err:
        parse_chat(chat(n=129))
    assert (err.value.status, err.value.param) == (400, "n")
    assert len(parse_completion({"model": "m", "prompt": ["x"] * 256}).prompts) == 256
    assert parse_completion({"model": "m", "prompt": ["x"] * 2, "n": 128}).sampling.n == 128


def test_limits_come_from_the_frontend_flags() -> None:
    limits = RequestLimits(max_prompts_per_request=3, max_n=4, max_choices_per_request=6)
    assert len(parse_completion({"model": "m", "prompt": ["a", "b", "c"], "n": 2}, limits).prompts) == 3
    assert parse_completion({"model": "m", "prompt": [1] * 50, "n": 4}, limits).sampling.n == 4  # one prompt
    for body, param in [
        ({"model": "m", "prompt": ["a"] * 4}, "prompt"),
        ({"model": "m", "prompt": [[1]] * 4}, "prompt"),
        ({"model": "m", "prompt": "a", "n": 5}, "n"),
        ({"model": "m", "prompt": ["a", "b"], "n": 4}, "n"),
    ]:
        with pytest.raises(ApiError) as err:
            parse_completion(body, limits)
        assert (err.value.status, err.value.param) == (400, param), body
    assert parse_chat(chat(n=4), limits).sampling.n == 4
    narrow = RequestLimits(max_prompts_per_request=3, max_n=8, max_choices_per_request=6)
    with pytest.raises(ApiError) as err:
        parse_chat(chat(n=7), narrow)
    assert (err.value.status, err.value.param) == (400, "n")
    with pytest.raises(ValueError):
        RequestLimits(max_n=0)


def test_echo_with_logprobs_is_refused() -> None:
    """We return no prompt logprobs, so echo with logprobs cannot be answered correctly."""
    assert parse_completion({"model": "m", "prompt": "x", "echo": True}).echo is True
    with pytest.raises(ApiError) as err:
        parse_completion({"model": "m", "prompt": "x", "echo": True, "logprobs": 1})
    assert (err.value.status, err.value.param) == (400, "echo")
