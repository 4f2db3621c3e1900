"""Hostile values for every field the parser reads: each is a 400 naming its field, never a 500.

Every body the parser accepts must also build the worker requests (protobuf) without an error other
than :class:`ApiError`: a value that fits the parser but not the wire type (``top_k`` beyond int32,
a negative stop token id into a uint32) would otherwise come back as a 500.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from commutator.engines.tiny_model import ensure_tiny_model
from commutator.frontend.preprocess import Preprocessor
from commutator.frontend.protocol import ApiError, SamplingRequest, parse_chat, parse_completion
from commutator.frontend.wire import generate_requests

pytestmark = pytest.mark.unit

MSG = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MSG}
COMPLETION = {"model": "m", "prompt": [1, 2, 3]}

WRONG_TYPES: list[Any] = ["1", True, [1], {"a": 1}, {"nested": {"deeper": [1, {"x": None}]}}]
NOT_FINITE: list[Any] = [math.nan, math.inf, -math.inf]
HUGE_INTS: list[Any] = [2**31, 2**32, 2**40, 2**63, 2**64, 10**30, 10**400]
HUGE_FLOATS: list[Any] = [1e308, -1e308, 1e39]  # 1e39 is beyond float32

UINT32_COUNT = [-1, 0.5, 2**32, 2**40, 10**30, 10**400, 1e308, *NOT_FINITE, *WRONG_TYPES]
PENALTY = [-2.1, 2.1, 10**30, 10**400, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]
BOOLS = ["yes", "true", 1, 0, [], {}, [True]]

# (field, value, the param the error must name). Both endpoints unless the field is endpoint-specific.
SHARED: list[tuple[str, Any, str]] = [
    *[("max_tokens", v, "max_tokens") for v in [0, *UINT32_COUNT]],
    *[("min_tokens", v, "min_tokens") for v in UINT32_COUNT],
    *[("temperature", v, "temperature") for v in [-0.1, 2.1, 10**30, 10**400, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]],
    *[("top_p", v, "top_p") for v in [0, -1, 1.1, 10**400, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]],
    *[("top_k", v, "top_k") for v in [-2, 0.5, *HUGE_INTS, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]],
    *[
        ("seed", v, "seed")
        for v in [2**64, -(2**63) - 1, 10**30, 10**400, 0.5, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]
    ],
    *[("frequency_penalty", v, "frequency_penalty") for v in PENALTY],
    *[("presence_penalty", v, "presence_penalty") for v in PENALTY],
    *[("repetition_penalty", v, "repetition_penalty") for v in [0, -1, 11, 10**400, *HUGE_FLOATS, *NOT_FINITE]],
    *[("repetition_penalty", v, "repetition_penalty") for v in WRONG_TYPES],
    *[("n", v, "n") for v in [0, -1, 129, 0.5, *HUGE_INTS, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]],
    *[("stream", v, "stream") for v in BOOLS],
    *[("ignore_eos", v, "ignore_eos") for v in BOOLS],
    *[
        ("stop", v, "stop")
        for v in [
            5,
            -1,
            True,
            {"a": 1},
            "",
            [""],
            ["a", ""],
            [-1],
            [2**32],
            [2**40],
            [10**30],
            [1.5],
            [math.nan],
            [True],
            [None],
            ["a", 1],
            [1, "a"],
            [["a"]],
            [{"a": 1}],
            ["x"] * 10_000,
            ["x" * 10_000],
            list(range(100_000)),
        ]
    ],
    *[
        ("stop_token_ids", v, "stop_token_ids")
        for v in [
            -1,
            "1",
            {"a": 1},
            [-1],
            [2**32],
            [2**40],
            [10**30],
            [1.5],
            ["1"],
            [True],
            [None],
            [[1]],
            [{"a": 1}],
            list(range(100_000)),
        ]
    ],
    *[("stream_options", v, "stream_options") for v in ["x", 1, True, [], [{"include_usage": True}]]],
    *[("stream_options", {"include_usage": v}, "stream_options.include_usage") for v in BOOLS],
]
CHAT_ONLY: list[tuple[str, Any, str]] = [
    *[("model", v, "model") for v in [None, 3, "", [], {}, True, ["m"]]],
    *[("messages", v, "messages") for v in [None, [], "hi", {}, 5, True]],
    *[("messages", v, "messages[0]") for v in [[1], [[]], ["hi"], [None]]],
    *[("messages", [{"role": r, "content": "x"}], "messages[0].role") for r in [None, "", 5, {}, []]],
    *[
        ("messages", [{"role": "user", "content": c}], "messages[0].content")
        for c in [None, 5, {}, True, [1], [{"type": "image_url", "image_url": {}}], [{"type": "text", "text": 5}]]
    ],
    *[("max_completion_tokens", v, "max_completion_tokens") for v in [0, *UINT32_COUNT]],
    *[("logprobs", v, "logprobs") for v in BOOLS],
    *[("top_logprobs", v, "top_logprobs") for v in [-1, 21, 0.5, *HUGE_INTS, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]],
    *[("tools", v, "tools") for v in ["x", {}, 5, True, [1], ["x"], [[1]]]],
    *[("add_generation_prompt", v, "add_generation_prompt") for v in BOOLS],
]
COMPLETION_ONLY: list[tuple[str, Any, str]] = [
    *[("model", v, "model") for v in [None, 3, "", [], {}, True]],
    *[
        ("prompt", v, "prompt")
        for v in [
            None,
            "",
            5,
            True,
            {"a": 1},
            [],
            [[]],
            [""],
            ["a", ""],
            [None],
            [True],
            [1.5],
            [1, "a"],
            ["a", 1],
            [-1],
            [2**32],
            [2**40],
            [10**30],
            [[-1]],
            [[2**40]],
            [[1], [2**32]],
            [[1, "a"]],
            [[True]],
            [{"a": 1}],
            ["a"] * 10_000,
            [[1]] * 10_000,
        ]
    ],
    *[("logprobs", v, "logprobs") for v in [-1, 21, 0.5, *HUGE_INTS, *HUGE_FLOATS, *NOT_FINITE, *WRONG_TYPES]],
    *[("echo", v, "echo") for v in BOOLS],
    ("echo", True, "echo"),  # with logprobs (below): prompt logprobs are not available
]

CASES = [("chat", f, v, p) for f, v, p in [*SHARED, *CHAT_ONLY]] + [
    ("completion", f, v, p) for f, v, p in [*SHARED, *COMPLETION_ONLY]
]


def _body(endpoint: str, field: str, value: Any) -> dict[str, Any]:
    body = dict(CHAT if endpoint == "chat" else COMPLETION)
    if value is None:
        body.pop(field, None)
    else:
        body[field] = value
    if endpoint == "chat" and field == "top_logprobs":
        body["logprobs"] = True
    if field == "echo" and value is True:
        body["logprobs"] = 1
    return body


def _parse(endpoint: str, body: Any) -> Any:
    return parse_chat(body) if endpoint == "chat" else parse_completion(body)


def _label(v: Any) -> str:
    s = repr(v)
    return s if len(s) < 40 else s[:37] + "..."


@pytest.mark.parametrize(
    ("endpoint", "field", "value", "param"), CASES, ids=[f"{e}-{f}-{_label(v)}" for e, f, v, _ in CASES]
)
def test_hostile_value_is_a_400_naming_the_field(endpoint: str, field: str, value: Any, param: str) -> None:
    with pytest.raises(ApiError) as err:
        _parse(endpoint, _body(endpoint, field, value))
    assert err.value.status == 400
    assert err.value.param == param, err.value.message
    assert err.value.body()["error"]["param"] == param


def test_the_table_covers_every_field_the_parser_reads() -> None:
    class Recording(dict):  # type: ignore[type-arg]
        """A body that records which fields the parser looks up."""

        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self.read: set[str] = set()

        def get(self, key: Any, default: Any = None) -> Any:
            self.read.add(key)
            return super().get(key, default)

        def __getitem__(self, key: Any) -> Any:
            self.read.add(key)
            return super().__getitem__(key)

    chat = Recording(CHAT, logprobs=True, max_tokens=5, stop=["x"], stream_options={"include_usage": True})
    parse_chat(chat)
    completion = Recording(COMPLETION, max_tokens=5, stop=["x"], stream_options={"include_usage": True})
    parse_completion(completion)
    assert chat.read <= {f for e, f, _, _ in CASES if e == "chat"}
    assert completion.read <= {f for e, f, _, _ in CASES if e == "completion"}


def _build(pre: Preprocessor, prompts: list[list[int]], s: SamplingRequest) -> None:
    generate_requests("cmpl-x", "m", prompts, s, pre.context_length, prompt_param="prompt")


@pytest.fixture(scope="module")
def tiny() -> Preprocessor:
    return Preprocessor.load(ensure_tiny_model())


@pytest.fixture(scope="module", params=["model-context", "unknown-context"])
def pre(request: pytest.FixtureRequest, tiny: Preprocessor) -> Preprocessor:
    if request.param == "model-context":
        return tiny
    return Preprocessor(tiny.tokenizer, tiny.template, tiny.eos_token_ids, 0, tiny.encoder)


# Values at (and just past) the edges of what the wire types hold, and everything from the hostile table.
EDGES: list[tuple[str, Any]] = [
    ("max_tokens", 2**32 - 1),
    ("max_tokens", 2**31),
    ("min_tokens", 2**32 - 1),
    ("min_tokens", 4000),
    ("top_k", 2**31 - 1),
    ("top_k", -1),
    ("seed", 2**64 - 1),
    ("seed", -(2**63)),
    ("seed", 1.8446744073709552e19),
    ("stop", [2**32 - 1]),
    ("stop", [0]),
    ("stop_token_ids", [2**32 - 1]),
    ("temperature", 2.0),
    ("temperature", 1e-300),
    ("top_p", 1e-300),
    ("repetition_penalty", 1e-300),
    ("frequency_penalty", -2.0),
    ("logprobs", 20),
    ("n", 128),
    *[(f, v) for _, f, v, _ in CASES],
]


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_every_accepted_body_builds_its_worker_requests(endpoint: str, pre: Preprocessor) -> None:
    accepted = 0
    for field, value in EDGES:
        for extra in ({}, {"n": 3, "seed": 2**64 - 1, "max_tokens": 4000}):
            body = {**_body(endpoint, field, value), **{k: v for k, v in extra.items() if k != field}}
            try:
                req = _parse(endpoint, body)
            except ApiError as err:
                assert err.status == 400 and err.param is not None
                continue
            accepted += 1
            prompts = [[1, 2, 3]] if endpoint == "chat" else [p if isinstance(p, list) else [5] for p in req.prompts]
            try:
                _build(pre, prompts, req.sampling)
            except ApiError as err:
                assert err.status == 400 and err.param is not None
    assert accepted > 20


def test_what_depends_on_the_model_is_a_400_naming_the_field(tiny: Preprocessor) -> None:
    """The context length is known only once the model is: checked when the worker requests are built."""
    s = parse_completion({"model": "m", "prompt": [1] * 100, "min_tokens": 4000}).sampling
    with pytest.raises(ApiError) as err:
        generate_requests("r", "m", [[1] * 100], s, tiny.context_length, prompt_param="prompt")
    assert (err.value.status, err.value.param) == (400, "min_tokens")
    s = parse_chat(CHAT).sampling
    for param in ("prompt", "messages"):
        with pytest.raises(ApiError) as err:
            generate_requests("r", "m", [[1] * tiny.context_length], s, tiny.context_length, prompt_param=param)
        assert (err.value.status, err.value.param) == (400, param)
    (g,) = generate_requests("r", "m", [[1] * 100], s, tiny.context_length, prompt_param="prompt")
    assert g.stop.max_tokens == tiny.context_length - 100
