"""The mocker engine shell on virtual time: the pass durations reach the clock,
outputs stream and coalesce, closing a stream aborts, KV events flow out."""

from __future__ import annotations

import asyncio

import pytest
from commutator.common.clock import VirtualClock
from commutator.engines.base import EngineOutput, EngineRequest, FinishReason, KvStored, StopParams
from commutator.engines.mocker import MockerConfig, MockerEngine, decode_ms, prefill_ms

pytestmark = pytest.mark.unit


async def started(config: MockerConfig) -> tuple[MockerEngine, VirtualClock]:
    clock = VirtualClock()
    engine = MockerEngine(config, vocab_size=32000, context_length=32768, clock=clock, engine_salt=3)
    await engine.start()
    return engine, clock


async def test_ttft_and_inter_token_time_on_the_virtual_clock() -> None:
    engine, clock = await started(MockerConfig(watermark=0.0))
    times: list[float] = []

    async def consume() -> list[EngineOutput]:
        outs = []
        async for out in engine.generate(EngineRequest("r", list(range(512)), stop=StopParams(max_tokens=3))):
            times.append(clock.monotonic())
            outs.append(out)
        return outs

    task = asyncio.create_task(consume())
    for _ in range(200):
        await clock.advance(0.0005)
        if task.done():
            break
    outs = task.result()
    assert [len(o.token_ids) for o in outs] == [1, 1, 1]
    assert outs[0].prompt_tokens == 512 and outs[0].cached_prompt_tokens == 0
    assert outs[-1].finish_reason is FinishReason.STOP or outs[-1].finish_reason is FinishReason.LENGTH
    assert times[0] * 1000 == pytest.approx(prefill_ms(512), abs=0.6)  # 24.4 ms, within a clock step
    itl = (times[1] - times[0]) * 1000
    assert itl == pytest.approx(decode_ms(9 / 16384), abs=0.6)
    await engine.shutdown()


async def test_slow_reader_gets_coalesced_tokens() -> None:
    engine, _ = await started(MockerConfig(speedup_ratio=0.0))
    it = engine.generate(EngineRequest("slow", list(range(64)), stop=StopParams(max_tokens=40, ignore_eos=True)))
    first = await it.__anext__()
    assert len(first.token_ids) == 1
    for _ in range(100):  # the engine keeps running while the reader does nothing
        await asyncio.sleep(0)
    rest = [o async for o in it]
    assert sum(len(o.token_ids) for o in rest) == 39
    assert len(rest) < 39  # several tokens per message
    assert rest[-1].finish_reason is FinishReason.LENGTH
    await engine.shutdown()


async def test_closing_the_stream_aborts_and_frees_blocks() -> None:
    engine, _ = await started(MockerConfig(speedup_ratio=0.0))
    it = engine.generate(EngineRequest("c", list(range(1000)), stop=StopParams(max_tokens=10_000, ignore_eos=True)))
    await it.__anext__()
    assert engine.stats()[0].kv_blocks_used == 16
    await it.aclose()
    stats = engine.stats()[0]
    assert (stats.running_requests, stats.kv_blocks_used) == (0, 0)
    await engine.shutdown()


async def test_abort_by_id_ends_the_stream_with_abort() -> None:
    engine, _ = await started(MockerConfig(speedup_ratio=0.0))
    it = engine.generate(EngineRequest("x", [1, 2, 3], stop=StopParams(max_tokens=10_000, ignore_eos=True)))
    await it.__anext__()
    assert await engine.abort("x") is True
    outs = [o async for o in it]
    assert outs[-1].finish_reason is FinishReason.ABORT
    assert await engine.abort("x") is False
    await engine.shutdown()


async def test_kv_events_are_delivered_in_order() -> None:
    engine, _ = await started(MockerConfig(speedup_ratio=0.0, block_size=16))
    outs = [o async for o in engine.generate(EngineRequest("k", list(range(64)), stop=StopParams(max_tokens=20)))]
    assert outs
    events = await asyncio.wait_for(engine.kv_events(), 1)
    assert [e.event_id for e in events] == list(range(len(events)))
    assert isinstance(events[0].data, KvStored) and len(events[0].data.blocks) == 4
    await engine.shutdown()


async def test_many_concurrent_requests_all_finish() -> None:
    engine, _ = await started(MockerConfig(speedup_ratio=0.0, max_num_seqs=16))

    async def one(i: int) -> int:
        n = 0
        async for o in engine.generate(
            EngineRequest(f"r{i}", list(range(i, i + 100)), stop=StopParams(max_tokens=25, ignore_eos=True))
        ):
            n += len(o.token_ids)
        return n

    counts = await asyncio.gather(*(one(i) for i in range(50)))
    assert counts == [25] * 50
    assert engine.stats()[0].kv_blocks_used == 0
    await engine.shutdown()


async def test_bad_request_raises_before_anything_runs() -> None:
    engine, _ = await started(MockerConfig(speedup_ratio=0.0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        async for _ in engine.generate(EngineRequest("bad", [99_999_999])):
            pass
    assert engine.stats()[0].waiting_requests == 0
    await engine.shutdown()


async def test_a_tiny_cache_refuses_what_it_cannot_hold_and_never_stalls() -> None:
    # 8 blocks of 16 tokens, 2 kept free at admission: sequences of at most 97 tokens.
    engine, _ = await started(MockerConfig(speedup_ratio=0.0, block_size=16, num_blocks=8, watermark=0.25))

    async def run(rid: str, n: int, max_tokens: int = 0) -> tuple[int, FinishReason | None]:
        req = EngineRequest(rid, list(range(n)), stop=StopParams(max_tokens=max_tokens, ignore_eos=True))
        count, reason = 0, None
        async for out in engine.generate(req):
            count += len(out.token_ids)
            reason = out.finish_reason
        return count, reason

    with pytest.raises(ValueError, match="KV cache"):
        await asyncio.wait_for(run("too-long", 200), 5)
    # A long generation and the requests queued behind it all finish (no max_tokens: up to the limit).
    results = await asyncio.wait_for(
        asyncio.gather(run("grow", 10), run("at-limit", 96), *(run(f"short{i}", 20, 5) for i in range(4))), 10
    )
    assert results == [(87, FinishReason.LENGTH), (1, FinishReason.LENGTH)] + [(5, FinishReason.LENGTH)] * 4
    assert engine.stats()[0].kv_blocks_used == 0
    assert engine.capacity.context_length == 97  # what the worker advertises in its model card
    await engine.shutdown()


async def test_with_the_models_tokenizer_every_generated_token_has_text_of_its_own() -> None:
    # Random ids over the tiny model's byte-level vocabulary are about 3% single bytes of multi-byte
    # characters and special tokens; the mocker built for the model draws from the ids whose text stands
    # alone (and its EOS ids), so a stream decodes token by token, with no U+FFFD.
    from commutator.engines.mocker.tokens import text_token_ids
    from commutator.engines.model_info import ModelInfo
    from commutator.engines.tiny_model import ensure_tiny_model
    from tokenizers import Tokenizer
    from tokenizers.decoders import DecodeStream

    model = ensure_tiny_model()
    info = ModelInfo.load(model)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    table = text_token_ids(model / "tokenizer.json", info.vocab_size, keep=info.eos_token_ids)
    specials = set(tok.get_added_tokens_decoder())
    assert set(info.eos_token_ids) <= set(table) and len(table) < info.vocab_size - len(specials)
    assert all(i in info.eos_token_ids or i not in specials for i in table)

    engine = MockerEngine.for_model(MockerConfig(watermark=0.0, speedup_ratio=0.0), model, engine_salt=3)
    await engine.start()
    try:
        ids: list[int] = []
        for k in range(20):
            req = EngineRequest(f"r{k}", list(range(100, 116)), stop=StopParams(max_tokens=50, ignore_eos=True))
            async for out in engine.generate(req):
                ids.extend(out.token_ids)
    finally:
        await engine.shutdown()
    assert len(ids) == 1000 and set(ids) <= set(table)
    stream = DecodeStream(skip_special_tokens=True)
    pieces = [(t, stream.step(tok, t)) for t in ids]
    # Only an EOS id (kept, so that a request without ignore_eos can end on it: 2 ids in 3,965) is silent.
    assert all((p and "\ufffd" not in p) or t in info.eos_token_ids for t, p in pieces)
    assert sum(t in info.eos_token_ids for t in ids) < 5
    # An explicit vocabulary size keeps the whole range (what tests of the wire use).
    whole = MockerEngine.for_model(MockerConfig(vocab_size=4096), model)
    assert whole.scheduler.output_ids is None
