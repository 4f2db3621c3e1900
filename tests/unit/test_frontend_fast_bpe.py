"""tiktoken stands in for ``tokenizers`` only where it gives the same ids, and steps aside on a difference.

Two tokenizer shapes are exercised: the tiny model's (GPT-2's: ByteLevel with its own split) and one
trained here offline on the repository's docs with Llama 3's shape (a Split by Llama 3's regex, then
ByteLevel without its split, special tokens added).
"""

from __future__ import annotations

import json
import logging
import random
import unicodedata
from pathlib import Path

import pytest
from commutator.engines.tiny_model import ensure_tiny_model
from commutator.frontend.fast_bpe import _build, fast_bpe, tokenizer_spec
from commutator.frontend.preprocess import ChunkedEncoder, Preprocessor, _self_check_text
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _texts(seed: int, n: int) -> list[str]:
    """Varied text: words of the docs, digits, punctuation, runs of spaces and newlines, tabs, non-ASCII,
    emoji, contractions in any case, special tokens."""
    rng = random.Random(seed)
    words = (REPO / "README.md").read_text().split()[:4000]
    extra = ["näive", "ÜBER", "日本語", "🌍🙂", "12345678", "3.14", "IT'S", "we'LL", "\u00a0", "…", "<|eot_id|>"]
    seps = [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", ", ", ""]
    out = []
    for _ in range(n):
        k = rng.randrange(1, 120)
        out.append("".join(rng.choice(words if rng.random() < 0.8 else extra) + rng.choice(seps) for _ in range(k)))
    return out


@pytest.fixture(scope="module")
def llama3_shaped() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS
    )
    lines = [line for p in sorted((REPO / "docs").glob("*.md")) for line in p.read_text().splitlines()]
    tok.train_from_iterator(lines, trainer)
    return tok


def _with(tok: Tokenizer, edit) -> Tokenizer:  # type: ignore[no-untyped-def]
    spec = json.loads(tok.to_str())
    edit(spec)
    return Tokenizer.from_str(json.dumps(spec))


def test_the_tiny_models_tokenizer_is_taken_and_agrees_on_every_text() -> None:
    pre = Preprocessor.load(ensure_tiny_model())
    assert pre.encoder is not None and pre.encoder.fast is not None
    for i, text in enumerate(_texts(1, 300)):
        want = pre.tokenizer.encode(text, add_special_tokens=False).ids
        assert pre.encoder.fast.encode(text) == want, f"text {i}"
        assert pre.encode(text) == want, f"text {i}"  # through the chunk cache where it is long


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_a_llama3_shaped_tokenizer_is_taken_and_agrees_on_every_text(
    llama3_shaped: Tokenizer, ignore_merges: bool
) -> None:
    tok = _with(llama3_shaped, lambda s: s["model"].update(ignore_merges=ignore_merges))
    fast = fast_bpe(tok, _self_check_text())
    assert fast is not None
    texts = [*_texts(2, 300), "".join(SPECIALS) + "user" + SPECIALS[2] + "\n\nhi" + SPECIALS[3]]
    for i, text in enumerate(texts):
        assert fast.encode(text) == tok.encode(text, add_special_tokens=False).ids, f"text {i}"
    special_ids = {tok.token_to_id(s) for s in SPECIALS}
    assert special_ids <= set(fast.encode(texts[-1]))  # added tokens in the text are recognised


def test_an_nfc_normalizer_is_applied_first_as_tokenizers_does(llama3_shaped: Tokenizer) -> None:
    tok = _with(llama3_shaped, lambda s: s.update(normalizer={"type": "NFC"}))  # Qwen's normalizer
    fast = fast_bpe(tok, _self_check_text())
    assert fast is not None
    texts = [unicodedata.normalize("NFD", t) for t in _texts(4, 100)]
    texts += ["cafe\u0301 A\u030astro\u0308m", "e\u0301" * 50, SPECIALS[0] + "\u0301x"]
    for i, text in enumerate(texts):
        assert fast.encode(text) == tok.encode(text, add_special_tokens=False).ids, f"text {i}"
    assert fast.encode("cafe\u0301") == fast.encode("café")


def test_shapes_tiktoken_cannot_express_are_left_to_tokenizers(llama3_shaped: Tokenizer) -> None:
    check = _self_check_text()
    tiny = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    assert fast_bpe(tiny, check) is not None

    nfkc = Tokenizer.from_str(tiny.to_str())
    nfkc.normalizer = normalizers.NFKC()
    assert fast_bpe(nfkc, check) is None  # a normalizer other than NFC

    prefix_space = _with(tiny, lambda s: s["pre_tokenizer"].update(add_prefix_space=True))
    assert fast_bpe(prefix_space, check) is None

    def lstrip(spec):  # type: ignore[no-untyped-def]
        spec["added_tokens"][0]["lstrip"] = True

    assert fast_bpe(_with(tiny, lstrip), check) is None

    def prefix_of_another(spec):  # type: ignore[no-untyped-def]
        first = spec["added_tokens"][0]
        spec["added_tokens"].append({**first, "id": len(spec["model"]["vocab"]), "content": first["content"] + "x"})

    assert fast_bpe(_with(tiny, prefix_of_another), check) is None

    def merges_out_of_order(spec):  # type: ignore[no-untyped-def]
        merges = spec["model"]["merges"]
        merges[10], merges[500] = merges[500], merges[10]

    assert fast_bpe(_with(tiny, merges_out_of_order), check) is None

    two_splits = _with(
        llama3_shaped,
        lambda s: s["pre_tokenizer"]["pretokenizers"].insert(0, s["pre_tokenizer"]["pretokenizers"][0]),
    )
    assert fast_bpe(two_splits, check) is None


@pytest.mark.parametrize("ignore_merges", [False, True])
def test_a_vocabulary_entry_no_merge_makes_is_left_to_tokenizers(llama3_shaped: Tokenizer, ignore_merges: bool) -> None:
    """tiktoken joins any neighbours whose bytes are an entry, and looks a whole word up first;
    tokenizers joins only the pairs its merges list, and looks up only with ``ignore_merges``. An entry
    that no merge makes comes out of tiktoken where tokenizers never makes it: inside a longer word
    (" thethes": " the" and "the" joined), and without ``ignore_merges`` as a word of its own (" zqxj").
    A check on texts would have to contain those words to see it; the check of every entry does."""
    alone = "Ġzqxj"

    def unmade_entries(spec):  # type: ignore[no-untyped-def]
        spec["model"]["ignore_merges"] = ignore_merges
        vocab = spec["model"]["vocab"]
        assert "Ġthe" in vocab and "the" in vocab
        for entry in ("Ġthethe", alone):
            vocab[entry] = len(vocab)

    tok = _with(llama3_shaped, unmade_entries)
    unchecked = _build(tokenizer_spec(tok))
    assert not isinstance(unchecked, str)
    cases = [(" thethes is", tok.token_to_id("Ġthethe"))]
    if not ignore_merges:
        cases.append((" zqxj", tok.token_to_id(alone)))
    for text, unmade in cases:
        assert unmade not in tok.encode(text, add_special_tokens=False).ids
        assert unmade in unchecked.encode(text)  # tiktoken unchecked would differ here
        assert text.strip() not in _self_check_text()
    assert fast_bpe(tok, _self_check_text()) is None
    assert fast_bpe(_with(llama3_shaped, lambda s: s["model"].update(ignore_merges=ignore_merges)), _self_check_text())


def test_a_check_that_cannot_run_keeps_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    import commutator.frontend.fast_bpe as fast_bpe_module

    def broken(*_args: object) -> None:
        raise ValueError("a merge names an entry the vocabulary lacks")

    monkeypatch.setattr(fast_bpe_module, "_entries_differ", broken)
    tiny = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    assert fast_bpe(tiny, _self_check_text()) is None  # not an exception out of the model's load
    pre = Preprocessor.load(ensure_tiny_model())
    assert pre.encoder is not None and pre.encoder.fast is None
    assert pre.encode("still tokenized") == pre.tokenizer.encode("still tokenized", add_special_tokens=False).ids


def test_a_difference_on_a_request_turns_tiktoken_and_the_cache_off(caplog: pytest.LogCaptureFixture) -> None:
    tiny = Tokenizer.from_file(str(ensure_tiny_model() / "tokenizer.json"))
    enc = ChunkedEncoder(tiny, verify_every=1)
    assert enc.fast is not None and enc.enabled

    class Off:
        """A stand-in that drops the last token: what a subtle disagreement looks like."""

        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner = inner

        def encode(self, text: str) -> list[int]:
            return self.inner.encode(text)[:-1]

    enc.fast = Off(enc.fast)  # type: ignore[assignment]
    text = "a short prompt, tokenized whole"
    with caplog.at_level(logging.WARNING, logger="commutator.frontend.preprocess"):
        assert enc.encode(text) == tiny.encode(text, add_special_tokens=False).ids
    assert enc.fast is None and not enc.enabled
    assert "tiktoken and the chunk cache" in caplog.text
    assert enc.encode(text * 40) == tiny.encode(text * 40, add_special_tokens=False).ids


def test_no_tiktoken_keeps_tokenizers() -> None:
    pre = Preprocessor.load(ensure_tiny_model(), tiktoken=False)
    assert pre.encoder is not None and pre.encoder.fast is None and pre.encoder.enabled
    text = _texts(3, 1)[0]
    assert pre.encode(text) == pre.tokenizer.encode(text, add_special_tokens=False).ids
