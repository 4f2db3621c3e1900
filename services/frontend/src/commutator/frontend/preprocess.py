"""Prompts to token ids: the model's chat template and tokenizer.

The template is rendered exactly as ``transformers``' ``apply_chat_template``
renders it (a sandboxed Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the loop-controls extension, its ``tojson``,
``raise_exception`` and ``strftime_now``, and the tokenizer's special tokens
as variables), then tokenized without adding special tokens. Routing depends
on this: the same conversation must give the same token ids as the engine's
own tokenizer, or prefix-cache hits are lost. The parity is tested against
``transformers``.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from commutator.frontend.fast_bpe import FastBpe, fast_bpe, tokenizer_spec
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

__all__ = ["ChatTemplate", "ChunkedEncoder", "PreprocessError", "Preprocessor"]

log = logging.getLogger(__name__)

_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class PreprocessError(ValueError):
    """The conversation cannot be rendered or tokenized (the client's fault: HTTP 400).

    Any failure of the chat template on a conversation is one (the template runs over client data).
    """


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template with the tokenizer's special tokens bound."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self._template = env.from_string(source)
        self._special = special_tokens

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special,
                **kwargs,
            )
        except jinja2.exceptions.TemplateError as exc:
            raise PreprocessError(f"the chat template rejected the conversation: {exc}") from None
        except Exception as exc:
            # The template is the model's code run over whatever the client sent (tool calls, extra
            # message keys of any type): its TypeError on a number where it expects a list is a bad request.
            raise PreprocessError(
                f"the chat template failed on this conversation: {type(exc).__name__}: {exc}"
            ) from None


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# A cut goes after a newline between two non-spaces, or before a space that a non-space precedes
# (one-line prompts: long instructions, documents pasted without line breaks). Never after a run of
# whitespace: at the end of a piece such a run is one pre-token, inside the text it is two.
_CUT = re.compile(r"(?<=\S)\n(?=\S)|(?<=\S)(?= )")


def _self_check_text() -> str:
    """Text with every kind of boundary a cut may meet: words, digits, punctuation, runs of spaces,
    tabs, newlines, non-ASCII letters, symbols and emoji, contractions, code."""
    rng = random.Random(12345)
    words = [
        "line", "value", "näive", "Über", "日本語", "🌍", "x", "42", "3.14", "1,000", "it's", "we'll",
        "(call)", "a_b", "--flag", "#", "=", "don't", "URL:", "http://x.y/z?q=1", "é", "ß", "\\t", "…",
    ]  # fmt: skip
    seps = [" ", " ", " ", "  ", "   ", "\t", " \t ", "\n", "\n    ", "\n\n", ", ", ". "]
    parts = []
    for i in range(1500):
        parts.append(rng.choice(words))
        parts.append(rng.choice(seps))
        if i % 97 == 0:
            parts.append(f"def f{i}(x):\n    return x * {i}  # näive 🌍\n")
    return "".join(parts)


class ChunkedEncoder:
    """Tokenization with a cache of recurring text chunks (system prompts, conversation history).

    Text is cut into chunks of at least ``min_chunk_chars``, each cut after a
    newline between two non-space characters, or before a space that a
    non-space character precedes, whichever comes first; cutting from the start
    the same way every time, two prompts that share a prefix share its chunks.
    For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen and alike, with no
    prefix space added) such a cut is a pre-tokenization boundary (no
    pre-token ends in a space that follows a non-space), so tokenizing the
    chunks separately gives exactly the ids of the whole. That is checked when
    the encoder is built, on text with every kind of boundary cut at every
    point, and on a sample of requests afterwards; any difference turns the
    cache off. Chunks not in the cache are tokenized together in one batch call.

    With ``fast``, tiktoken tokenizes (chunks and whole texts) where :func:`fast_bpe` finds it exact for
    this tokenizer; the same sampled check compares its result with ``tokenizers``' and any difference
    turns off both it and the cache.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        min_chunk_chars: int = 256,
        max_entries: int = 8192,
        verify_every: int = 512,
        fast: bool = True,
    ) -> None:
        self._tok = tokenizer
        self._min = min_chunk_chars
        self._max = max_entries
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._verify_every = verify_every
        self._calls = 0
        check = _self_check_text()
        spec = tokenizer_spec(tokenizer)  # a large vocabulary's JSON is megabytes: parsed once
        self.fast: FastBpe | None = fast_bpe(tokenizer, check, spec) if fast else None
        """tiktoken standing in for ``tokenizers`` (:mod:`commutator.frontend.fast_bpe`); None: not used."""
        self.byte_level = _byte_level_without_prefix_space(spec)
        """Byte-level BPE with no prefix space: what the chunk cache and ``Preprocessor.max_token_chars`` need."""
        self.enabled = self.byte_level
        self.hits = 0
        self.misses = 0
        if self.enabled:
            self.enabled = self._self_check(check)

    def _self_check(self, text: str) -> bool:
        """Whether chunks tokenize exactly as the whole: ``text`` cut at every possible cut, in pieces
        of 1 to 40 cuts, and through :meth:`_chunked` as requests are."""
        whole = self._whole(text)
        cuts = [m.end() for m in _CUT.finditer(text)]
        rng = random.Random(7)
        pieces, start, i = [], 0, 0
        while i < len(cuts):
            i += rng.randint(1, 40)
            end = cuts[i] if i < len(cuts) else len(text)
            pieces.append(text[start:end])
            start = end
        if start < len(text):
            pieces.append(text[start:])
        ids = [t for enc in self._tok.encode_batch_fast(pieces, add_special_tokens=False) for t in enc.ids]
        ok = ids == whole and self._chunked(text) == whole
        self._cache.clear()
        return ok

    def _whole(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _one(self, text: str) -> list[int]:
        """``text`` tokenized whole, through tiktoken where it stands in, else ``tokenizers``."""
        if self.fast is not None:
            return self.fast.encode(text)
        # The batch call of one text: tokenizers then skips the offsets (57 against 75 µs for 80 tokens).
        return self._tok.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def _many(self, texts: list[str]) -> list[list[int]]:
        if self.fast is not None:
            encode = self.fast.encode
            return [encode(t) for t in texts]
        return [enc.ids for enc in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        chunked = self.enabled and len(text) >= 2 * self._min
        if not chunked and self.fast is None:
            return self._one(text)
        ids = self._chunked(text) if chunked else self._one(text)
        self._calls += 1
        if self._calls % self._verify_every == 0 and ids != (whole := self._whole(text)):
            log.warning(
                "tokenization through %s differs from tokenizers' own on a request's text; %s off",
                "the chunk cache" if self.fast is None else "tiktoken and the chunk cache",
                "it is" if self.fast is None else "both are",
            )
            self.enabled = False
            self.fast = None
            self._cache.clear()
            return whole
        return ids

    def _chunked(self, text: str) -> list[int]:
        chunks: list[str] = []
        start = 0
        search = _CUT.search
        least = max(self._min, 1)
        while (m := search(text, start + least)) is not None:
            end = m.end()
            chunks.append(text[start:end])
            start = end
        chunks.append(text[start:])
        cache = self._cache
        missing = [c for c in chunks if c not in cache]
        if missing:
            self.misses += len(missing)
            unique = list(dict.fromkeys(missing))
            for c, ids in zip(unique, self._many(unique), strict=True):
                cache[c] = ids
            while len(cache) > self._max:
                cache.popitem(last=False)
        out: list[int] = []
        for c in chunks:
            ids = cache[c]
            cache.move_to_end(c)
            out += ids
        self.hits += len(chunks) - len(missing)
        return out


def _byte_level_without_prefix_space(tokenizer_json: dict[str, Any]) -> bool:
    spec = tokenizer_json.get("pre_tokenizer") or {}
    parts = spec.get("pretokenizers", [spec]) if spec.get("type") == "Sequence" else [spec]
    kinds = [p.get("type") for p in parts]
    if not kinds or kinds[-1] != "ByteLevel" or any(k not in ("ByteLevel", "Split") for k in kinds):
        return False
    return not any(p.get("add_prefix_space") for p in parts if p.get("type") == "ByteLevel")


@dataclass(slots=True)
class Preprocessor:
    """Tokenizer, chat template and stop tokens of one model."""

    tokenizer: Tokenizer
    template: ChatTemplate | None
    eos_token_ids: tuple[int, ...]
    context_length: int
    encoder: ChunkedEncoder | None = None
    max_token_chars: int = 0
    """The most characters one token stands for, where that bounds a text's token count from below
    (byte-level tokenizers with no normalizer: every character is at least one byte, and no byte is
    dropped); 0 where it does not. See :meth:`over_context`."""

    def __post_init__(self) -> None:
        if self.encoder is None:
            self.encoder = ChunkedEncoder(self.tokenizer)
        if not self.max_token_chars and self.tokenizer.normalizer is None:
            if self.encoder.byte_level:
                self.max_token_chars = max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=0)

    def over_context(self, text: str) -> bool:
        """Whether ``text`` has more tokens than the context for certain, told from its length alone: a
        client's megabytes of text are refused before they are tokenized (which costs far more memory
        and time than the text itself)."""
        bound = self.context_length * self.max_token_chars
        return bound > 0 and len(text) > bound

    @classmethod
    def load(
        cls,
        folder: str | Path,
        *,
        chat_template: str | None = None,
        eos_token_ids: Sequence[int] = (),
        context_length: int = 0,
        tiktoken: bool = True,
    ) -> Preprocessor:
        """From a folder holding tokenizer.json (and tokenizer_config.json); ``tiktoken``: let it stand in
        for ``tokenizers`` where it is exact (:mod:`commutator.frontend.fast_bpe`)."""
        path = Path(folder)
        tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        config: dict[str, Any] = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text())
        special = {k: v for k in _SPECIAL_KEYS if (v := _token_content(config.get(k))) is not None}
        source = chat_template or (
            config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
        )
        if source is None and (path / "chat_template.jinja").is_file():
            source = (path / "chat_template.jinja").read_text()
        eos = tuple(eos_token_ids)
        if not eos and "eos_token" in special:
            tid = tokenizer.token_to_id(special["eos_token"])
            eos = (tid,) if tid is not None else ()
        return cls(
            tokenizer,
            ChatTemplate(source, special) if source else None,
            eos,
            context_length or int(config.get("model_max_length", 0) or 0),
            ChunkedEncoder(tokenizer, fast=tiktoken),
        )

    def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self.template is None:
            raise PreprocessError("this model has no chat template; use /v1/completions")
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens added (as apply_chat_template does)."""
        assert self.encoder is not None
        return self.encoder.encode(text)

    def chat_token_ids(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools))

    def decode(self, token_ids: Sequence[int]) -> str:
        """The text of ``token_ids`` as the model saw them (special tokens kept), e.g. an echoed prompt."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        """A single token as text (for logprobs)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
