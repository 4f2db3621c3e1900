"""Byte-level BPE through tiktoken, for tokenizers where it gives exactly the ids of tokenizer.json.

``tokenizers`` takes about 0.7 µs a token on this machine's cores for the byte-level BPE of GPT-2,
Llama 3, Qwen and alike; tiktoken's BPE, the same algorithm in a tighter loop, about 0.25 µs. On a
chat request the prompt's tokenization was the largest single cost of the frontend's way in (docs/
hot-path.md, "The way in: tokenization"). tiktoken is used only where the model's tokenizer.json has
a shape it can express, and only after the two agree on a text with every kind of boundary
(:func:`fast_bpe`); :class:`~commutator.frontend.preprocess.ChunkedEncoder` keeps checking a sample
of requests against ``tokenizers`` and turns it off on any difference.

The shapes taken: a BPE model (no dropout, no subword prefix or word suffix, no byte fallback); no
normalizer, or NFC (Qwen's; done with ``unicodedata`` first, on text that is not NFC already); as
pre-tokenizer either ``ByteLevel`` with its own (GPT-2) split, or one ``Split`` by a regex (behaviour
``Isolated``) followed by ``ByteLevel`` without its split; no prefix space added. The merges must rank
their results in id order (tiktoken ranks a merge by the id of what it makes), every byte must have a
token, and added tokens must match as plain strings (no ``lstrip``, ``rstrip`` or ``single_word``;
none the prefix of another, since tiktoken matches the first alternative where ``tokenizers`` matches
the longest).

The two BPEs differ in one way the shape does not show: tiktoken joins any two neighbouring pieces whose
bytes are a token, where ``tokenizers`` joins only the pairs its merges list (and, without
``ignore_merges``, never looks a whole word up). A vocabulary entry that no merge makes, or that its
merges do not reach from its own bytes, comes out of tiktoken and never out of ``tokenizers``. So
every entry is also split alone by both rules (:func:`_entries_differ`) before any text is
tokenized.
"""

from __future__ import annotations

import itertools
import json
import logging
import unicodedata
from typing import Any

import tiktoken
from tokenizers import Tokenizer, models

__all__ = ["FastBpe", "fast_bpe", "tokenizer_spec"]

log = logging.getLogger(__name__)

# The split that tokenizers' ByteLevel pre-tokenizer does with use_regex (GPT-2's).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_alphabet() -> dict[str, int]:
    """The characters byte-level BPE writes bytes as (GPT-2's table), to the bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            out[chr(256 + extra)] = b
            extra += 1
    return out


class FastBpe:
    """A tiktoken encoding equal to a tokenizer.json's (as checked by :func:`fast_bpe`)."""

    __slots__ = ("_encoding", "_nfc", "_specials")

    def __init__(self, encoding: tiktoken.Encoding, specials: frozenset[str], nfc: bool) -> None:
        self._encoding = encoding
        self._specials = specials
        self._nfc = nfc

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with added tokens in it recognised, no special tokens added."""
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return self._encoding.encode(text, allowed_special=self._specials, disallowed_special=())


def _split_pattern(pre: dict[str, Any] | None) -> str | None:
    """The regex that splits text into pre-tokens, where the pre-tokenizer is one tiktoken can do."""
    if not pre:
        return None
    if pre.get("type") == "ByteLevel":
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return None
        return _GPT2_SPLIT
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2:
        return None
    split, level = parts
    if split.get("type") != "Split" or level.get("type") != "ByteLevel":
        return None
    if level.get("add_prefix_space") or level.get("use_regex", True):
        return None
    pattern = split.get("pattern") or {}
    if split.get("behavior") != "Isolated" or split.get("invert") or "Regex" not in pattern:
        return None
    return str(pattern["Regex"])


def _why_not(spec: dict[str, Any]) -> str | None:
    """Why tiktoken cannot stand in for this tokenizer.json (None: it may, subject to the check)."""
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        return "not a BPE model"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "BPE with dropout, a subword prefix or a word suffix"
    if model.get("byte_fallback"):
        return "BPE with byte fallback"
    normalizer = spec.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        return "a normalizer other than NFC"
    if _split_pattern(spec.get("pre_tokenizer")) is None:
        return "a pre-tokenizer other than (Split then) ByteLevel without a prefix space"
    for added in spec.get("added_tokens") or []:
        if added.get("lstrip") or added.get("rstrip") or added.get("single_word"):
            return f"added token {added.get('content')!r} strips spaces or matches single words"
    return None


def _build(spec: dict[str, Any]) -> FastBpe | str:
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {a["content"]: int(a["id"]) for a in spec.get("added_tokens") or []}
    nfc = spec.get("normalizer") is not None
    if nfc and any(not unicodedata.is_normalized("NFC", content) for content in added):
        return "an added token that NFC would change"
    contents = sorted(added)
    for a, b in itertools.pairwise(contents):
        if b.startswith(a):
            return f"added token {a!r} is the prefix of {b!r}"
    added_ids = set(added.values())
    alphabet = _byte_alphabet()
    ranks: dict[bytes, int] = {}
    for token, tid in vocab.items():
        if tid in added_ids:
            continue
        try:
            ranks[bytes(alphabet[ch] for ch in token)] = int(tid)
        except KeyError:
            return f"vocabulary entry {token!r} is not written in byte-level characters"
    if len(ranks) != len(vocab) - len(added_ids & set(vocab.values())):
        return "two vocabulary entries stand for the same bytes"
    if any(bytes([b]) not in ranks for b in range(256)):
        return "a byte has no token of its own"
    last = -1
    for merge in model.get("merges") or []:
        left, right = merge if isinstance(merge, list) else merge.split(" ", 1)
        made = vocab.get(left + right)
        if made is None:
            return f"merge {left!r} {right!r} makes a token that is not in the vocabulary"
        if made < last:
            return "the merges do not make tokens in id order"
        last = made
    try:
        encoding = tiktoken.Encoding(
            "commutator-fast-bpe",
            pat_str=_split_pattern(spec.get("pre_tokenizer")) or "",
            mergeable_ranks=ranks,
            special_tokens=added,
        )
    except Exception as exc:  # tiktoken's own refusal (a pattern its regex engine does not take, ...)
        return f"tiktoken refused it: {type(exc).__name__}: {exc}"
    return FastBpe(encoding, frozenset(added), nfc)


def _entries_differ(tokenizer: Tokenizer, spec: dict[str, Any]) -> str | None:
    """The first vocabulary entry that the two BPEs treat differently, or None.

    Each entry is tokenized alone, as one piece, by ``tokenizers``' merges and by tiktoken's rule
    (repeatedly join the two neighbours whose join is the entry of the lowest id), and the two must
    split it alike: that is what each does with the entry's bytes inside any longer word. Without
    ``ignore_merges`` the merges must also make the entry whole, since tiktoken looks a whole word up
    before merging. About 9 µs an entry (a 128k vocabulary: about 1.2 s, once per load)."""
    model = spec["model"]
    vocab: dict[str, int] = model["vocab"]
    added = {int(a["id"]) for a in spec.get("added_tokens") or []}
    ranks = {token: tid for token, tid in vocab.items() if tid not in added}
    bpe = tokenizer.model
    looks_up = bool(model.get("ignore_merges"))
    if looks_up:  # the same merges without the look-up, to see what they make of each entry
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model.get("merges") or []]
        bpe = models.BPE(vocab=vocab, merges=merges)
    rank = ranks.get
    for token, tid in ranks.items():
        if len(token) < 2:
            continue
        theirs = [t.id for t in bpe.tokenize(token)]
        if not looks_up and theirs != [tid]:
            return f"vocabulary entry {token!r} is not made whole by the merges ({theirs}), and tiktoken would take it"
        parts = list(token)
        while len(parts) > 1:
            best = at = -1
            for i in range(len(parts) - 1):
                r = rank(parts[i] + parts[i + 1])
                if r is not None and (best < 0 or r < best):
                    best, at = r, i
            if best < 0:
                break
            parts[at : at + 2] = [parts[at] + parts[at + 1]]
        if [ranks[p] for p in parts] != theirs:
            return f"vocabulary entry {token!r} is split {theirs} by the merges and otherwise by tiktoken's rule"
    return None


def tokenizer_spec(tokenizer: Tokenizer) -> dict[str, Any]:
    """The tokenizer's tokenizer.json, parsed ({} where it has none): read once per model load."""
    try:
        spec = json.loads(tokenizer.to_str())
    except (ValueError, AttributeError):
        return {}
    return spec if isinstance(spec, dict) else {}


def fast_bpe(tokenizer: Tokenizer, check_text: str, spec: dict[str, Any] | None = None) -> FastBpe | None:
    """A tiktoken stand-in for ``tokenizer``, or None where it is not one (logged at debug level).

    ``spec`` is its :func:`tokenizer_spec` (read here when not given). ``check_text`` must tokenize
    the same through both, whole, with every added token put into it at a few places, and cut into
    short pieces each tokenized alone; any difference means None.
    """
    if spec is None:
        spec = tokenizer_spec(tokenizer)
    if not spec:
        return None
    why = _why_not(spec)
    fast = _build(spec) if why is None else why
    if not isinstance(fast, str):
        try:
            fast = _entries_differ(tokenizer, spec) or fast
        except Exception as exc:  # a check that cannot run keeps tokenizers; it must not fail the load
            fast = f"the check of the vocabulary entries failed: {type(exc).__name__}: {exc}"
    if isinstance(fast, str):
        log.debug("tokenization through tokenizers, not tiktoken: %s", fast)
        return None
    texts = [check_text, *(check_text[i : i + 97] for i in range(0, len(check_text), 97))]
    texts.append(unicodedata.normalize("NFD", check_text[:3000]))  # accents as combining characters
    for i, content in enumerate(sorted(fast._specials)):
        at = (i * 7919) % max(1, len(check_text))
        # Text on both sides of it, not the whole check text before it: Llama 3 has 256 added tokens.
        texts.append(
            f"{check_text[max(0, at - 300) : at]}{content}{check_text[at : at + 200]} {content}\n{content}{content}x"
        )
    for text in texts:
        if fast.encode(text) != tokenizer.encode(text, add_special_tokens=False).ids:
            log.warning("tiktoken tokenizes a check text differently from tokenizers; tokenizers it is")
            return None
    return fast
