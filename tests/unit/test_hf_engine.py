"""The hf engine on the tiny model (CPU): tokens equal transformers' own ``generate``, batched or not,
chunked or preempted; the prefix cache with its exact KV events; KV export/import between two engines;
sampling options; bad input.

Needs torch (``make test`` / ``make test-unit`` install the CPU build). Each engine uses one torch
thread: on this shared 2-core machine more threads contend and run tiny matmuls 50x slower.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="the hf engine needs torch: make torch")
transformers = pytest.importorskip("transformers")

from commutator.common.hashing import block_hash_seed, local_block_hashes, sequence_hashes  # noqa: E402
from commutator.engines.base import (  # noqa: E402
    EngineOutput,
    EngineRequest,
    FinishReason,
    KvEventRecord,
    KvImport,
    KvStored,
    SamplingParams,
    StopParams,
)
from commutator.engines.hf.engine import HfEngine  # noqa: E402
from commutator.engines.registry import EngineError, EngineSpec, make_engine  # noqa: E402
from commutator.engines.tiny_model import ensure_tiny_model  # noqa: E402

pytestmark = pytest.mark.unit

BASE_ARGS = ("--device", "cpu", "--threads", "1")


@pytest.fixture(scope="module")
def model_path() -> Path:
    return ensure_tiny_model()


@pytest.fixture(scope="module")
def reference(model_path: Path) -> Iterator[Any]:
    """transformers' own model (its default attention), the source of expected tokens."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    yield model
    torch.set_num_threads(threads)


def generate_reference(model: Any, prompt: list[int], max_new_tokens: int, **kw: Any) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, **kw
        )
    return [int(t) for t in out[0, len(prompt) :]]


def prompt(n: int, salt: int = 0) -> list[int]:
    """``n`` token ids of the tiny vocabulary (ids 10..4009, away from the special tokens)."""
    return [10 + (salt * 7919 + k * 131 + k * k) % 4000 for k in range(n)]


@asynccontextmanager
async def hf_engine(model_path: Path, *args: str) -> AsyncIterator[HfEngine]:
    engine = make_engine("hf", EngineSpec(model_path, "tiny", (*BASE_ARGS, *args)))
    assert isinstance(engine, HfEngine)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def run(engine: HfEngine, request: EngineRequest) -> tuple[list[int], list[EngineOutput]]:
    outs = [o async for o in engine.generate(request)]
    return [t for o in outs for t in o.token_ids], outs


def greedy(rid: str, tokens: list[int], max_tokens: int, **kw: Any) -> EngineRequest:
    return EngineRequest(rid, tokens, stop=StopParams(max_tokens=max_tokens), **kw)


# -- greedy output equals transformers' generate ------------------------------------------------------------
async def test_greedy_single_request_equals_transformers_generate(model_path: Path, reference: Any) -> None:
    p = prompt(41)
    expected = generate_reference(reference, p, 24)
    async with hf_engine(model_path) as engine:
        tokens, outs = await run(engine, greedy("one", p, 24))
    assert tokens == expected
    assert outs[0].prompt_tokens == 41 and outs[0].cached_prompt_tokens == 0
    assert outs[-1].finish_reason is (FinishReason.LENGTH if len(tokens) == 24 else FinishReason.STOP)
    assert sum(len(o.token_ids) for o in outs) == len(outs)  # a reader that keeps up gets one token per output


async def test_eight_concurrent_requests_are_batched_and_each_equals_generate(model_path: Path, reference: Any) -> None:
    prompts = [prompt(5 + 13 * i, salt=i) for i in range(8)]  # 5 .. 96 tokens
    lengths = [20 - i for i in range(8)]  # and different output lengths: sequences leave the batch one by one
    expected = [generate_reference(reference, p, n) for p, n in zip(prompts, lengths, strict=True)]
    async with hf_engine(model_path) as engine:
        results = await asyncio.gather(
            *(run(engine, greedy(f"r{i}", p, n)) for i, (p, n) in enumerate(zip(prompts, lengths, strict=True)))
        )
        assert [tokens for tokens, _ in results] == expected
        # All eight were prefilled in the first pass and decoded together after it: one pass per token of the
        # longest output.
        assert engine.largest_batch == 8
        assert engine.passes == max(len(tokens) for tokens in expected)
        assert engine.stats()[0].kv_blocks_used == 0


@pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("qwen2", {"tie_word_embeddings": True}),  # biases on q/k/v; the LM head is the embedding
        ("mistral", {"sliding_window": 64}),  # attention over the whole sequence: context capped at the window
        ("qwen3", {}),  # q/k norms inside the attention module, before the attention function
    ],
)
async def test_other_llama_like_architectures_equal_generate(
    model_type: str, extra: dict[str, Any], tmp_path: Path
) -> None:
    config = transformers.AutoConfig.for_model(
        model_type,
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=1,
        **{"sliding_window": None, "tie_word_embeddings": False, **extra},
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # larger weights than the initialiser's, so that tokens depend on every layer
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.1)
    model.eval()
    model.save_pretrained(tmp_path)
    p = [2 + (k * 37) % 500 for k in range(30)]
    expected = generate_reference(model, p, 12)
    async with hf_engine(tmp_path, "--block-size", "4", "--max-batched-tokens", "8") as engine:
        assert engine.plan.architecture == config.architectures[0]
        assert engine.capacity.context_length == (64 if "sliding_window" in extra else 256)
        tokens, _ = await run(engine, greedy("x", p, 12))
    assert tokens == expected


# -- the prefix cache ------------------------------------------------------------------------------------------
async def test_a_repeated_prompt_reuses_cached_blocks_with_exact_kv_events(model_path: Path, reference: Any) -> None:
    bs = 16
    p = prompt(40)  # two full blocks and 8 tokens
    local = local_block_hashes(p, bs)
    seq = sequence_hashes(local)
    stop = StopParams(max_tokens=4, ignore_eos=True)  # 40 + 3 computed tokens: no third full block
    async with hf_engine(model_path, "--block-size", str(bs), "--num-blocks", "64") as engine:
        e = engine.scheduler.pool.engine_hash
        first, outs1 = await run(engine, EngineRequest("a", p, stop=stop))
        assert outs1[0].cached_prompt_tokens == 0 and engine.prompt_tokens_computed == 40
        assert await engine.kv_events() == [
            KvEventRecord(0, KvStored(None, ((e(seq[0]), local[0]), (e(seq[1]), local[1]))))
        ]

        again, outs2 = await run(engine, EngineRequest("b", p, stop=stop))
        expected = generate_reference(reference, p, 4)  # ends early only at an EOS, which ignore_eos keeps
        assert again == first and first[: len(expected)] == expected
        assert outs2[0].cached_prompt_tokens == 32  # both full blocks from the cache; the rest computed
        assert engine.prompt_tokens_computed == 40 + 8

        # A prompt sharing the first block stores only its second one, under the cached parent; no event came
        # from the repeat (event ids are consecutive).
        q = p[:16] + prompt(24, salt=5)
        local_q = local_block_hashes(q, bs)
        seq_q = sequence_hashes(local_q)
        _, outs3 = await run(engine, EngineRequest("c", q, stop=stop))
        assert outs3[0].cached_prompt_tokens == 16
        assert await engine.kv_events() == [KvEventRecord(1, KvStored(e(seq[0]), ((e(seq_q[1]), local_q[1]),)))]

        # A cache salt is another tenant: no hit, and local hashes seeded with the salt (DESIGN.md 4.1).
        salted, outs4 = await run(engine, EngineRequest("d", p, stop=stop, cache_salt="tenant-7"))
        assert salted == first and outs4[0].cached_prompt_tokens == 0
        local_s = local_block_hashes(p, bs, block_hash_seed(cache_salt="tenant-7"))
        seq_s = sequence_hashes(local_s)
        assert await engine.kv_events() == [
            KvEventRecord(2, KvStored(None, ((e(seq_s[0]), local_s[0]), (e(seq_s[1]), local_s[1]))))
        ]

        blocks, watermarks = engine.kv_dump()
        assert sorted(b[2] for b in blocks) == sorted([seq[0], seq[1], seq_q[1], seq_s[0], seq_s[1]])
        assert watermarks == {0: 3}


# -- chunked prefill and preemption ------------------------------------------------------------------------
async def test_chunked_prefill_gives_the_same_greedy_output(model_path: Path, reference: Any) -> None:
    p = prompt(70, salt=3)
    expected = generate_reference(reference, p, 12)
    async with hf_engine(model_path, "--max-batched-tokens", "16") as engine:
        tokens, _ = await run(engine, greedy("chunked", p, 12))
        assert tokens == expected
        assert engine.prompt_tokens_computed == 70
        assert engine.passes == 5 + len(tokens) - 1  # 16+16+16+16+6 prompt tokens, then one pass per token


async def test_preemption_recomputes_and_gives_the_same_greedy_output(model_path: Path, reference: Any) -> None:
    # 10 blocks of 4 tokens; two 16-token prompts growing by 16 tokens each need 16 blocks together.
    prompts = [prompt(16, salt=11), prompt(16, salt=12)]
    expected = [generate_reference(reference, p, 16) for p in prompts]
    args = ("--block-size", "4", "--num-blocks", "10", "--watermark", "0")
    async with hf_engine(model_path, *args) as engine:
        results = await asyncio.gather(*(run(engine, greedy(f"p{i}", p, 16)) for i, p in enumerate(prompts)))
        assert [tokens for tokens, _ in results] == expected
        assert engine.scheduler.total_preemptions >= 1
        assert engine.stats()[0].kv_blocks_used == 0


# -- disaggregation: prefill on A, decode on B -----------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "elem_bytes"), [("float32", 4), ("bfloat16", 2)])
async def test_kv_export_import_between_engines_is_byte_exact_and_decodes_the_same(
    model_path: Path, reference: Any, dtype: str, elem_bytes: int
) -> None:
    p = prompt(37, salt=21)  # 2 full blocks of 16 and a partial third
    args = ("--block-size", "16", "--num-blocks", "32", "--dtype", dtype)
    async with hf_engine(model_path, *args) as a, hf_engine(model_path, *args) as b:
        alone, _ = await run(a, greedy("alone", p, 12))
        if dtype == "float32":
            assert alone == generate_reference(reference, p, 12)

        first, outs = await run(a, greedy("x", p, 12, prefill_only=True))
        assert first == alone[:1] and outs[-1].finish_reason is FinishReason.STOP
        held = a.prefill_blocks("x")
        assert held is not None and len(held) == 3
        data = await a.kv_export(held)
        # 3 blocks x 2 layers x (K, V) x 16 tokens x 2 KV heads x 32 dims
        assert len(data) == 3 * a.kv_bytes_per_block == 3 * 2 * 2 * 16 * 2 * 32 * elem_bytes
        assert a.release_prefill("x") is True and a.prefill_blocks("x") is None

        request = greedy("x", p, 12, kv_import=KvImport(first_token_id=first[0]))
        reserved = b.reserve_import(request)
        assert reserved is not None and len(reserved) == 3
        await b.kv_import(reserved, data)
        assert await b.kv_export(reserved) == data  # B's blocks are byte-identical to A's
        request = dataclasses.replace(request, kv_import=KvImport(first[0], reserved))
        decoded, outs = await run(b, request)
        assert decoded == alone
        assert b.prompt_tokens_computed == 0  # B computed no prompt token, it decoded from the imported KV
        local = local_block_hashes(p, 16)
        seq = sequence_hashes(local)
        e = b.scheduler.pool.engine_hash
        events = await b.kv_events()
        assert events[0] == KvEventRecord(0, KvStored(None, ((e(seq[0]), local[0]), (e(seq[1]), local[1]))))

        # Sampling with a seed continues on B exactly as on A alone (draws depend on seed and position only).
        hot = SamplingParams(temperature=1.0, seed=42)
        sampled_alone, _ = await run(a, greedy("hot-alone", p, 12, sampling=hot))
        first, _ = await run(a, greedy("y", p, 12, sampling=hot, prefill_only=True))
        request = greedy("y", p, 12, sampling=hot, kv_import=KvImport(first_token_id=first[0]))
        reserved = b.reserve_import(request)
        assert reserved is not None and a.prefill_blocks("y") is not None
        await b.kv_import(reserved, await a.kv_export(a.prefill_blocks("y") or ()))
        a.release_prefill("y")
        decoded, _ = await run(b, dataclasses.replace(request, kv_import=KvImport(first[0], reserved)))
        assert decoded == sampled_alone != alone


async def test_kv_import_refuses_blocks_not_reserved_and_data_of_another_shape(model_path: Path) -> None:
    async with hf_engine(model_path, "--num-blocks", "16") as engine:
        request = greedy("r", prompt(20), 4, kv_import=KvImport(first_token_id=5))
        reserved = engine.reserve_import(request)
        assert reserved is not None
        free = next(i for i in range(16) if i not in reserved)
        with pytest.raises(ValueError, match="not reserved"):
            await engine.kv_import([free], b"\0" * engine.kv_bytes_per_block)
        with pytest.raises(ValueError, match="bytes per block"):
            await engine.kv_import(reserved, b"\0" * 10)
        engine.release_import("r")
        assert engine.stats()[0].kv_blocks_used == 0


async def test_unexported_prefill_blocks_are_released_after_the_hold(model_path: Path) -> None:
    async with hf_engine(model_path, "--num-blocks", "16", "--export-hold-s", "0") as engine:
        await run(engine, greedy("x", prompt(20), 4, prefill_only=True))
        await run(engine, greedy("y", prompt(5), 2))  # a pass later the hold has expired
        assert engine.prefill_blocks("x") is None and engine.stats()[0].kv_blocks_used == 0


# -- sampling ------------------------------------------------------------------------------------------------
async def test_sampling_options(model_path: Path, reference: Any) -> None:
    p = prompt(30, salt=31)
    greedy_tokens = generate_reference(reference, p, 10)
    with torch.no_grad():
        first_logits = reference(torch.tensor([p])).logits[0, -1].float()
    first_logprobs = torch.log_softmax(first_logits, dim=-1)

    def sampled(rid: str, **kw: Any) -> EngineRequest:
        return EngineRequest(rid, p, sampling=SamplingParams(**kw), stop=StopParams(max_tokens=10))

    async with hf_engine(model_path) as engine:
        # Logprobs of the model's distribution: the chosen token and the N most likely, best first.
        tokens, outs = await run(engine, greedy("lp", p, 10, logprobs=3))
        assert tokens == greedy_tokens
        lps = [lp for o in outs for lp in o.logprobs or []]
        assert [lp.token_id for lp in lps] == tokens
        assert lps[0].logprob == pytest.approx(float(first_logprobs[tokens[0]]), abs=1e-4)
        top = torch.topk(first_logprobs, 3)
        assert [t for t, _ in lps[0].top] == top.indices.tolist()
        assert all(lp.top[0][0] == lp.token_id and len(lp.top) == 3 for lp in lps)  # greedy picks the best

        # A seed makes sampling repeatable; different seeds differ; top_k=1 is greedy at any temperature.
        hot = [(await run(engine, sampled(f"s{i}", temperature=1.5, seed=seed)))[0] for i, seed in enumerate((7, 7, 8))]
        assert hot[0] == hot[1] != hot[2] and hot[0] != greedy_tokens
        topk1, _ = await run(engine, sampled("k1", temperature=2.0, top_k=1, seed=3))
        assert topk1 == greedy_tokens
        tiny_p, _ = await run(engine, sampled("p", temperature=2.0, top_p=1e-6, seed=3))
        assert tiny_p == greedy_tokens

        # Repetition penalty: the same as transformers' processor, greedy.
        rep, _ = await run(engine, sampled("rep", repetition_penalty=1.3))
        assert rep == generate_reference(reference, p, 10, repetition_penalty=1.3)

        # A stop token id ends the output with it; before min_tokens it is masked out (and so is EOS).
        stop_at = greedy_tokens[3]
        k = greedy_tokens.index(stop_at)
        stop = StopParams(max_tokens=10, stop_token_ids=(stop_at,))
        stopped, outs = await run(engine, EngineRequest("st", p, stop=stop))
        assert stopped == greedy_tokens[: k + 1] and outs[-1].finish_reason is FinishReason.STOP
        late, _ = await run(engine, EngineRequest("mt", p, stop=dataclasses.replace(stop, min_tokens=k + 2)))
        assert late[:k] == greedy_tokens[:k] and late[k] != stop_at and len(late) >= k + 2


def test_frequency_and_presence_penalties_on_logits() -> None:
    from commutator.engines.hf.sampling import SampleSpec, sample

    logits = torch.tensor([[0.0, 1.0, 2.5, 2.0]])
    assert sample(logits, [SampleSpec()])[0][0] == 2
    # Token 2 was output twice: 2.5 - 2 * 0.4 = 1.7 < 2.0.
    assert sample(logits, [SampleSpec(frequency_penalty=0.4, output_tokens=(2, 2))])[0][0] == 3
    # Presence counts once: 2.5 - 0.4 = 2.1 > 2.0; with 0.6: 1.9 < 2.0.
    assert sample(logits, [SampleSpec(presence_penalty=0.4, output_tokens=(2, 2))])[0][0] == 2
    assert sample(logits, [SampleSpec(presence_penalty=0.6, output_tokens=(2, 2))])[0][0] == 3
    assert sample(logits, [SampleSpec(banned=(2, 3))])[0][0] == 1
    # The logprob reported is the model's, before any penalty.
    ((_, lp),) = sample(logits, [SampleSpec(frequency_penalty=0.4, output_tokens=(2, 2), logprobs=1)])
    assert lp is not None and lp.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[0, 3]))


# -- abort -----------------------------------------------------------------------------------------------------
async def test_abort_and_closing_the_stream_free_the_blocks(model_path: Path) -> None:
    async with hf_engine(model_path, "--num-blocks", "64") as engine:
        long = StopParams(max_tokens=2000, ignore_eos=True)
        stream = engine.generate(EngineRequest("ab", prompt(40), stop=long))
        await stream.__anext__()
        assert await engine.abort("ab") is True
        rest = [o async for o in stream]
        assert rest[-1].finish_reason is FinishReason.ABORT

        stream = engine.generate(EngineRequest("cl", prompt(40), stop=long))
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):  # an abort during a pass frees the blocks when the pass ends
            if engine.stats()[0].kv_blocks_used == 0:
                break
            await asyncio.sleep(0.01)
        stats = engine.stats()[0]
        assert (stats.running_requests, stats.waiting_requests, stats.kv_blocks_used) == (0, 0, 0)
        assert await engine.abort("ab") is False


# -- bad input -------------------------------------------------------------------------------------------------
def test_refused_engine_arguments_and_unusable_model_folders(model_path: Path, tmp_path: Path) -> None:
    def refused(path: Path, *args: str) -> str:
        with pytest.raises(EngineError) as info:
            make_engine("hf", EngineSpec(path, "m", args))
        message = str(info.value)
        assert "\n" not in message  # the worker prints it as one line and exits 1
        return message

    assert "refused --engine-args '--bogus 1'" in refused(model_path, "--bogus", "1")
    assert "float64" in refused(model_path, "--dtype", "float64")
    assert "--device 'tpu'" in refused(model_path, "--device", "tpu")
    assert "not a model folder" in refused(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "transformers cannot read" in refused(broken)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert "unsupported architecture GPT2LMHeadModel" in refused(gpt2)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((model_path / "config.json").read_text())
    assert "no weights" in refused(no_weights)


async def test_requests_the_engine_cannot_run_raise_value_error(model_path: Path) -> None:
    async with hf_engine(model_path, "--num-blocks", "16") as engine:
        bad = [
            (EngineRequest("v", [1, 99_999]), "outside the vocabulary"),
            (EngineRequest("l", [1, 2], lora_name="adapter"), "LoRA"),
            (EngineRequest("t", [1, 2], sampling=SamplingParams(top_p=0.0)), "top_p"),
            (EngineRequest("n", [1, 2], logprobs=50), "logprobs"),
            (EngineRequest("c", list(range(16 * 16 + 1))), "KV cache"),
        ]
        for request, match in bad:
            with pytest.raises(ValueError, match=match):
                await run(engine, request)
        assert engine.stats()[0].waiting_requests == 0
