"""Chat templates render as transformers renders them (routing depends on identical token ids),
and detokenization never breaks characters and applies stop strings across tokens."""

from __future__ import annotations

import pytest
from commutator.engines.tiny_model import ensure_tiny_model
from commutator.frontend.detokenize import TextStream
from commutator.frontend.preprocess import ChatTemplate, PreprocessError, Preprocessor
from tokenizers import Tokenizer
from transformers import AutoTokenizer

pytestmark = pytest.mark.unit

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "  Be terse.  "},
        {"role": "user", "content": "def f(x):\n    return x * 2  # héllo 🌍"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "again"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}]}],
    [{"role": "user", "content": "tabs\tand\nnewlines\r\n and <|eot_id|> text that looks special"}],
]


@pytest.fixture(scope="module")
def tiny() -> Preprocessor:
    return Preprocessor.load(ensure_tiny_model())


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_token_ids_match_transformers(tiny: Preprocessor, conversation, add_generation_prompt: bool) -> None:  # type: ignore[no-untyped-def]
    hf = AutoTokenizer.from_pretrained(str(ensure_tiny_model()))
    want = hf.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert tiny.chat_token_ids(conversation, add_generation_prompt=add_generation_prompt) == want


def test_template_features_transformers_offers() -> None:
    src = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m | tojson }}|{% endfor %}{{ bos_token }}{% if add_generation_prompt %}>{% endif %}"
        "{% if messages | length > 5 %}{{ raise_exception('too many') }}{% endif %}"
    )
    t = ChatTemplate(src, {"bos_token": "<s>"})
    out = t.render([{"role": "user", "content": "é"}] * 3, add_generation_prompt=True)
    assert out == '{"role": "user", "content": "é"}|{"role": "user", "content": "é"}|<s>>'
    with pytest.raises(PreprocessError, match="too many"):
        t.render([{"role": "user", "content": "x"}] * 6)


def test_template_sandbox_refuses_escapes() -> None:
    t = ChatTemplate("{{ messages.__class__.__mro__ }}", {})
    with pytest.raises(Exception):  # noqa: B017 - jinja's SecurityError
        t.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": "", "tool_calls": 5},
        {"role": "assistant", "content": "", "tool_calls": [{"function": "f"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": {"deep": [1]}}}]},
    ],
)
def test_a_template_that_fails_on_client_data_is_a_preprocess_error(message: dict[str, object]) -> None:
    """Templates index into whatever the client sent (tool calls, extra keys): any failure is the client's 400."""
    t = ChatTemplate(
        "{% for m in messages %}{% for c in m.tool_calls %}{{ c.function.name + '(' }}"
        "{{ c.function.arguments | tojson }}{% endfor %}{% endfor %}",
        {},
    )
    with pytest.raises(PreprocessError):
        t.render([message])


def test_multibyte_characters_are_never_split(tiny: Preprocessor) -> None:
    text = "naïve café 🌍🚀 日本語 ok"
    ids = tiny.encode(text)
    stream = TextStream(tiny.tokenizer)
    pieces = [stream.push([t]) for t in ids]
    assert "".join(pieces) + stream.flush() == text
    assert all("\ufffd" not in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens carry only part of a character


@pytest.mark.parametrize("stop", ["STOP", "ST", "é🌍", "x"])
def test_stop_strings_across_token_boundaries_are_cut_and_not_returned(tiny: Preprocessor, stop: str) -> None:
    text = f"alpha beta {stop} gamma {stop} delta"
    ids = tiny.encode(text)
    stream = TextStream(tiny.tokenizer, stop=[stop, "never-there"])
    out = ""
    for t in ids:
        out += stream.push([t])
        if stream.stopped:
            break
    out += stream.flush()
    assert out == text[: text.index(stop)] and stream.stopped == stop
    assert stream.push(ids) == ""  # nothing after a stop


def test_text_that_only_looks_like_a_stop_prefix_is_released(tiny: Preprocessor) -> None:
    stream = TextStream(tiny.tokenizer, stop=["STOP!"])
    ids = tiny.encode("a STO b STOP")
    out = "".join(stream.push([t]) for t in ids) + stream.flush()
    assert out == "a STO b STOP"  # no full stop string: everything comes out at the end


def test_no_chat_template_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    src = ensure_tiny_model()
    (tmp_path / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    pre = Preprocessor.load(tmp_path)
    with pytest.raises(PreprocessError, match="no chat template"):
        pre.chat_token_ids([{"role": "user", "content": "x"}])
    assert isinstance(pre.tokenizer, Tokenizer)


# -- the chunk cache of prompt tokenization ------------------------------------------------------
def _random_text(rng, n_words: int) -> str:  # type: ignore[no-untyped-def]
    words = ["alpha", "Beta", "näive", "日本", "🌍", "7", "3.5", "it's", "(x)", "a_b", "--", "é", "ok.", "Über"]
    seps = [" ", " ", "  ", "\t", " \t", "\n", "\n  ", "\n\n", " \n", ", ", "   "]  # "\n\n": paragraphs
    return "".join(rng.choice(words) + rng.choice(seps) for _ in range(n_words))


def test_chunked_tokenization_equals_whole_text_tokenization(tiny: Preprocessor) -> None:
    import random

    enc = tiny.encoder
    assert enc is not None and enc.enabled  # byte-level BPE without a prefix space: cuts are exact
    rng = random.Random(3)
    shared = _random_text(rng, 400)
    for i in range(120):
        text = (shared if i % 2 else "") + _random_text(rng, rng.randrange(50, 700))
        if i % 3 == 0:
            text = text.replace("\n", " ")  # one-line prompts are cut at spaces
        assert enc.encode(text) == tiny.tokenizer.encode(text, add_special_tokens=False).ids, f"text {i}"


def test_one_line_prompts_sharing_a_prefix_share_its_chunks(tiny: Preprocessor) -> None:
    from commutator.frontend.preprocess import ChunkedEncoder

    enc = ChunkedEncoder(tiny.tokenizer)
    prefix = " ".join(f"word{i} and, more: {i * 3}" for i in range(300))  # one line, ~7,000 characters
    first = prefix + " then the first question?"
    second = prefix + " then another, different question!"
    assert enc.encode(first) == tiny.tokenizer.encode(first, add_special_tokens=False).ids
    hits, misses = enc.hits, enc.misses
    assert enc.encode(second) == tiny.tokenizer.encode(second, add_special_tokens=False).ids
    assert enc.hits - hits >= 20 and enc.misses - misses <= 2  # the prefix's chunks came from the cache


def test_a_tokenizer_whose_pieces_do_not_add_up_gets_no_cache() -> None:
    from commutator.frontend.preprocess import ChunkedEncoder
    from tokenizers import models, pre_tokenizers

    # Byte-level, but a space starts no new piece (whole text is one pre-token): cutting changes ids.
    tok = Tokenizer(models.BPE(vocab={chr(c): c for c in range(32, 127)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    assert not ChunkedEncoder(tok).enabled  # a prefix space is refused up front


def test_text_too_long_for_the_context_is_told_without_tokenizing(tiny: Preprocessor) -> None:
    from dataclasses import replace

    from tokenizers import models, normalizers

    pre = replace(tiny, context_length=64)
    assert pre.max_token_chars == max(map(len, tiny.tokenizer.get_vocab(with_added_tokens=True)))
    # The bound is a floor on the token count: text just inside it may fit, text past it cannot.
    for text in ("a" * pre.max_token_chars * 64, "é" * pre.max_token_chars * 64, "<|im_start|>" * 2000):
        if pre.over_context(text):
            assert len(tiny.encode(text)) > 64
    longest = max(tiny.tokenizer.get_vocab(with_added_tokens=True), key=len)
    past = "x" * (pre.max_token_chars * 64 + 1)
    assert pre.over_context(past) and len(tiny.encode(past)) > 64 and not pre.over_context(longest)
    assert not replace(tiny, context_length=0).over_context(past)  # unknown context: no bound
    # A normalizer may drop characters: then length says nothing, and nothing is refused on it.
    tok = Tokenizer(models.BPE(vocab={chr(c): c for c in range(32, 127)}, merges=[]))
    tok.normalizer = normalizers.Strip()
    other = Preprocessor(tok, None, (), context_length=4)
    assert other.max_token_chars == 0 and not other.over_context(" " * 10_000)
