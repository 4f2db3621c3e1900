"""The TensorRT-LLM adapter against hand-written FAKES of its documented LLM API (no tensorrt_llm installed).

The fakes mirror the real calls (checked against NVIDIA/TensorRT-LLM ``llmapi/llm.py`` 4c05a74,
``executor/result.py`` a678b91, ``_utils.py`` ``KVCacheEventSerializer`` ed53795,
``sampling_params.py`` a98a906, ``disaggregated_params.py`` 01009a3): ``generate_async``
returns a ``RequestOutput`` whose ``outputs[0].token_ids_diff`` grows step by step;
``get_kv_cache_events_async`` / ``get_stats_async`` yield the queued dicts and stop
after ``timeout``. Every test name says ``fake``: they prove the adapter's side only.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from commutator.common.hashing import block_hash_seed, local_block_hashes, sequence_hashes
from commutator.engines.base import (
    EngineRequest,
    FinishReason,
    KvCleared,
    KvImport,
    KvRemoved,
    KvStored,
    SamplingParams,
    StopParams,
)
from commutator.engines.registry import EngineError, EngineSpec, make_engine
from commutator.engines.trtllm import TrtllmEngine, TrtllmHandoff, build_engine, llm_kwargs
from commutator.engines.trtllm.args import EngineArgsError, parse_engine_args

pytestmark = pytest.mark.unit

TPB = 4
DEVICE_BLOCKS = 500
WINDOW = 4096


# ---------------------------------------------------------------------------------- fakes
@dataclass(kw_only=True)
class FakeSamplingParams:
    """tensorrt_llm.SamplingParams: the init fields the adapter may set (same names)."""

    end_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: int | None = None
    ignore_eos: bool = False
    detokenize: bool = True


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None


@dataclass
class FakeCompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    disaggregated_params: Any = None
    _last_token_ids_len: int = 0
    _last_logprobs_len: int = 0

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list[Any]:
        return self.logprobs[self._last_logprobs_len :]


@dataclass
class FakeDisaggregatedParams:
    request_type: str | None = None
    first_gen_tokens: list[int] | None = None
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: list[int] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None


@dataclass
class Plan:
    tokens: list[int] = field(default_factory=lambda: [31, 32, 33, 34, 35, 36])
    cached_tokens: int = 0
    chunk: int = 2


class FakeRequestOutput:
    """RequestOutput: ``async for`` runs one step per iteration; ``abort()`` cancels."""

    def __init__(self, llm: FakeLLM, request_id: int, prompt: list[int], sp: FakeSamplingParams, plan: Plan) -> None:
        self._llm = llm
        self.request_id = request_id
        self.prompt_token_ids = prompt
        self.outputs = [FakeCompletionOutput(0)]
        self.finished = False
        self.cached_tokens = 0
        self._sp = sp
        self._plan = plan
        self._aborted = False
        self.disaggregated_params: Any = None

    def abort(self) -> None:
        self._aborted = True
        self._llm.aborted.append(self.request_id)

    def __aiter__(self) -> FakeRequestOutput:
        return self

    async def __anext__(self) -> FakeRequestOutput:
        if self.finished:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        out = self.outputs[0]
        out._last_token_ids_len = len(out.token_ids)
        out._last_logprobs_len = len(out.logprobs)
        self.cached_tokens = self._plan.cached_tokens
        if self._aborted:
            out.finish_reason, self.finished = "cancelled", True
            return self
        for _ in range(self._plan.chunk):
            tok = self._plan.tokens[len(out.token_ids)]
            out.token_ids.append(tok)
            if self._sp.logprobs:
                out.logprobs.append({tok: FakeLogprob(-0.25, 1), 99: FakeLogprob(-2.0, 2)})
            ctx_only = (
                self.disaggregated_params is not None and self.disaggregated_params.request_type == "context_only"
            )
            if tok in (self._sp.stop_token_ids or ()):
                out.finish_reason = "stop"
            elif len(out.token_ids) >= self._sp.max_tokens:
                out.finish_reason = "not_finished" if ctx_only else "length"
            elif len(out.token_ids) == len(self._plan.tokens):
                out.finish_reason = "stop"  # the plan's last token is its end id
            if out.finish_reason:
                if ctx_only:
                    out.disaggregated_params = FakeDisaggregatedParams(
                        request_type="context_only",
                        first_gen_tokens=[tok],
                        ctx_request_id=self.request_id,
                        opaque_state=b"\x01state",
                    )
                self.finished = True
                break
        return self


class FakeIterationResult:
    """IterationResult: yields what is queued; after ``timeout`` with nothing it stops and stays
    stopped until ``mark_undone()`` (which the executor calls when a request is submitted)."""

    def __init__(self) -> None:
        self.queue: list[Any] = []
        self._done = False

    def set_timeout(self, timeout: float | None) -> None:
        pass

    def mark_undone(self) -> None:
        self._done = False

    def __aiter__(self) -> FakeIterationResult:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        if not self.queue:
            self._done = True
            raise StopAsyncIteration
        return self.queue.pop(0)


class EmptyIterable:
    def __aiter__(self) -> EmptyIterable:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration


class FakeLLM:
    """tensorrt_llm.LLM: generate_async, the event and stats queues, args, shutdown."""

    def __init__(
        self, model: str, kwargs: dict[str, Any], *, cache_salt: bool = True, created_events: bool = True
    ) -> None:
        self.model, self.kwargs = model, kwargs
        kv = kwargs.get("kv_cache_config") or {}
        self.args = SimpleNamespace(
            kv_cache_config=SimpleNamespace(tokens_per_block=kv.get("tokens_per_block", 32)),
            max_seq_len=kwargs.get("max_seq_len", 2048),
            max_batch_size=kwargs.get("max_batch_size", 2048),
            max_num_tokens=kwargs.get("max_num_tokens", 8192),
        )
        # The KV cache manager announces itself first (one per attention window); the LLM API
        # hands events out only once a request created its IterationResult.
        self._pending_events: list[dict[str, Any]] = [
            {"event_id": 0, "data": {"type": "created", "num_blocks_per_cache_level": [40, 0]}, "window_size": 128},
            {
                "event_id": 0,
                "data": {"type": "created", "num_blocks_per_cache_level": [DEVICE_BLOCKS, 0]},
                "window_size": WINDOW,
            },
        ]
        self._created_events = created_events
        self._events_result: FakeIterationResult | None = None
        self._stats_result: FakeIterationResult | None = None
        self.calls: list[dict[str, Any]] = []
        self.plans: list[Plan] = []
        self.aborted: list[int] = []
        self.shut_down = False
        self._next_id = 1
        if not cache_salt:
            self.generate_async = self._generate_async_no_salt  # type: ignore[method-assign,assignment]

    def generate_async(
        self,
        inputs: Any,
        sampling_params: FakeSamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        _postproc_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> FakeRequestOutput:
        call = {k: v for k, v in locals().items() if k != "self" and v is not None}
        self.calls.append(call)
        assert sampling_params is not None
        self._maybe_initialize_iteration_results()
        rid, self._next_id = self._next_id, self._next_id + 1
        result = FakeRequestOutput(
            self, rid, list(inputs), sampling_params, self.plans.pop(0) if self.plans else Plan()
        )
        result.disaggregated_params = disaggregated_params
        return result

    def _generate_async_no_salt(
        self,
        inputs: Any,
        sampling_params: FakeSamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
    ) -> FakeRequestOutput:
        """An older ``generate_async``: no ``cache_salt``."""
        return FakeLLM.generate_async(
            self, inputs, sampling_params, lora_request, streaming=streaming, disaggregated_params=disaggregated_params
        )

    def _maybe_initialize_iteration_results(self) -> None:
        if self._events_result is None:
            self._events_result, self._stats_result = FakeIterationResult(), FakeIterationResult()
            if self._created_events:
                self._events_result.queue += self._pending_events
            # The warm-up's iteration stats.
            self._stats_result.queue.append({"kvCacheStats": {"maxNumBlocks": 321, "usedNumBlocks": 1}})
        else:
            assert self._stats_result is not None
            self._events_result.mark_undone()
            self._stats_result.mark_undone()

    def push_events(self, *events: dict[str, Any]) -> None:
        assert self._events_result is not None
        self._events_result.queue += events

    def push_stats(self, *stats: dict[str, Any]) -> None:
        assert self._stats_result is not None
        self._stats_result.queue += stats

    def get_kv_cache_events_async(self, timeout: float | None = 2) -> FakeIterationResult:
        assert self._events_result is not None, "KV Event IterationResult is not properly instantiated."
        return self._events_result

    def get_stats_async(self, timeout: float | None = 2) -> Any:
        return self._stats_result if self._stats_result is not None else EmptyIterable()

    def shutdown(self) -> None:
        self.shut_down = True


LLM_FIELDS = {
    "tensor_parallel_size",
    "kv_cache_config",
    "enable_iter_perf_stats",
    "max_seq_len",
    "max_batch_size",
    "max_num_tokens",
    "cache_transceiver_config",
    "enable_attention_dp",
}


class FakeTrtllmApi:
    def __init__(self, *, cache_salt: bool = True, created_events: bool = True) -> None:
        self.validated: list[dict[str, Any]] = []
        self.llms: list[FakeLLM] = []
        self._cache_salt = cache_salt
        self._created_events = created_events

    def validate_args(self, model: str, kwargs: dict[str, Any]) -> None:
        unknown = sorted(set(kwargs) - LLM_FIELDS)
        if unknown:  # what BaseLLM says for a key that is not a TorchLlmArgs field
            raise ValueError(f"LLM got invalid argument: {unknown[0]}")
        self.validated.append(kwargs)

    def create_llm(self, model: str, kwargs: dict[str, Any]) -> FakeLLM:
        llm = FakeLLM(model, kwargs, cache_salt=self._cache_salt, created_events=self._created_events)
        self.llms.append(llm)
        return llm

    def sampling_params(self, **kwargs: Any) -> FakeSamplingParams:
        return FakeSamplingParams(**kwargs)

    def sampling_param_names(self) -> frozenset[str]:
        import dataclasses

        return frozenset(f.name for f in dataclasses.fields(FakeSamplingParams))

    def lora_request(self, name: str, int_id: int, path: str) -> Any:
        return SimpleNamespace(lora_name=name, lora_int_id=int_id, lora_path=path)

    def disaggregated_params(self, **kwargs: Any) -> FakeDisaggregatedParams:
        return FakeDisaggregatedParams(**kwargs)


# -------------------------------------------------------------------------------- helpers
def spec(tmp_path: Path, *args: str) -> EngineSpec:
    (tmp_path / "config.json").write_text('{"vocab_size": 128, "max_position_embeddings": 2048}')
    return EngineSpec(tmp_path, "tiny", tuple(args))


async def started(
    tmp_path: Path, *args: str, api: FakeTrtllmApi | None = None, stats_interval_s: float = 1000.0
) -> tuple[TrtllmEngine, FakeLLM]:
    api = api or FakeTrtllmApi()
    engine = build_engine(
        spec(tmp_path, "--kv_cache_config.tokens_per_block", str(TPB), *args),
        api,
        poll_interval_s=0.001,
        stats_interval_s=stats_interval_s,
    )
    await engine.start()
    llm = api.llms[-1]
    warm_up = llm.calls.pop(0)  # one token in, one out, before anything else
    assert (len(warm_up["inputs"]), warm_up["sampling_params"].max_tokens) == (1, 1)
    return engine, llm


def req(rid: str = "r1", tokens: list[int] | None = None, **kw: Any) -> EngineRequest:
    return EngineRequest(rid, tokens if tokens is not None else list(range(1, 11)), **kw)


async def collect(engine: Any, n: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < n:
        out += await asyncio.wait_for(engine.kv_events(), 2.0)
    return out


def tok(ids: list[int], extra: int = 0) -> list[dict[str, Any]]:
    return [{"type": "unique_token", "token_id": t, "token_extra_id": extra} for t in ids]


def block(h: int, ids: list[int], **kw: Any) -> dict[str, Any]:
    return {"type": "stored_block", "block_hash": h, "tokens": tok(ids), "cache_level": 0, "priority": 35, **kw}


def ev(eid: int, data: dict[str, Any], window: int = WINDOW) -> dict[str, Any]:
    return {"event_id": eid, "data": data, "window_size": window}


def local(tokens: list[int], lora: str = "", salt: str = "") -> list[int]:
    return local_block_hashes(tokens, TPB, block_hash_seed(lora, salt))


# ------------------------------------------------------------------------ generation
async def test_trtllm_adapter_against_fake_llm_streams_token_deltas(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    llm.plans.append(Plan(tokens=[31, 32, 33, 34, 35], cached_tokens=4))
    outs = [o async for o in engine.generate(req(stop=StopParams(max_tokens=5)))]
    assert [o.token_ids for o in outs] == [[31, 32], [33, 34], [35]]
    assert [o.finish_reason for o in outs] == [None, None, FinishReason.LENGTH]
    assert (outs[0].prompt_tokens, outs[0].cached_prompt_tokens) == (10, 4)
    call = llm.calls[0]
    assert call["inputs"] == list(range(1, 11)) and call["streaming"] is True
    assert call["sampling_params"] == FakeSamplingParams(max_tokens=5, detokenize=False)
    await engine.shutdown()
    assert llm.shut_down


async def test_trtllm_adapter_against_fake_llm_stop_token_and_logprobs(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    llm.plans.append(Plan(tokens=[31, 7, 33], chunk=1))
    outs = [o async for o in engine.generate(req(stop=StopParams(max_tokens=9, stop_token_ids=(7,)), logprobs=2))]
    assert [o.token_ids for o in outs] == [[31], [7]] and outs[-1].finish_reason is FinishReason.STOP
    lp = outs[1].logprobs[0]  # type: ignore[index]
    assert (lp.token_id, lp.logprob, lp.top) == (7, -0.25, ((7, -0.25), (99, -2.0)))
    assert llm.calls[0]["sampling_params"].logprobs == 2
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_llm_aborts_when_the_stream_is_closed(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    gen = engine.generate(req("gone", stop=StopParams(max_tokens=6)))
    await anext(gen)  # type: ignore[arg-type]
    await gen.aclose()  # type: ignore[attr-defined]
    assert llm.aborted == [2]  # request 1 was the warm-up
    assert await engine.abort("gone") is False
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_llm_abort_by_id_finishes_with_abort(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    gen = engine.generate(req("a", stop=StopParams(max_tokens=6)))
    await anext(gen)  # type: ignore[arg-type]
    assert await engine.abort("a") is True
    rest = [o async for o in gen]  # type: ignore[attr-defined]
    assert rest[-1].finish_reason is FinishReason.ABORT and llm.aborted == [2]
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_llm_maps_sampling_stop_lora_and_salt(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path, "--lora-modules", f"fr={tmp_path}")
    r = req(
        sampling=SamplingParams(
            temperature=0.5, top_p=0.9, top_k=0, seed=7, frequency_penalty=0.1, presence_penalty=0.2
        ),
        stop=StopParams(max_tokens=3, min_tokens=2, stop_token_ids=(5,), ignore_eos=True),
        lora_name="fr",
        cache_salt="tenant-a",
    )
    [o async for o in engine.generate(r)]
    call = llm.calls[0]
    assert call["sampling_params"] == FakeSamplingParams(
        max_tokens=3,
        min_tokens=2,
        stop_token_ids=[5],
        ignore_eos=True,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        frequency_penalty=0.1,
        presence_penalty=0.2,
        detokenize=False,
    )
    assert (call["lora_request"].lora_name, call["lora_request"].lora_int_id) == ("fr", 1)
    assert call["cache_salt"] == "tenant-a"
    [o async for o in engine.generate(req("r2", list(range(100))))]  # max_tokens 0: up to the context
    assert llm.calls[1]["sampling_params"].max_tokens == 2000 - 100  # 500 blocks of 4 tokens
    await engine.shutdown()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(lora_name="nope"), "unknown LoRA adapter 'nope'"),
        (req(cache_salt="s"), "cache_salt is not supported"),
        (req(sampling=SamplingParams(repetition_penalty=0.0)), "repetition_penalty"),
        (req(kv_import=KvImport(first_token_id=3)), "cache transceiver"),
        (req(tokens=list(range(5000))), "context is 2000 tokens"),
        (req(dp_rank=1), "attention-DP rank"),
    ],
)
async def test_trtllm_adapter_against_fake_llm_refuses_what_it_cannot_map(
    tmp_path: Path, request_: EngineRequest, message: str
) -> None:
    engine, llm = await started(tmp_path, api=FakeTrtllmApi(cache_salt=False))
    with pytest.raises(ValueError, match=message):
        [o async for o in engine.generate(request_)]
    assert llm.calls == []
    await engine.shutdown()


# -------------------------------------------------------------------------- KV events
async def test_trtllm_adapter_against_fake_kv_events_recomputes_local_hashes(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    assert engine.capacity.total_blocks == DEVICE_BLOCKS  # the largest window's 'created' event
    t = list(range(200, 208))
    llm.push_events(
        *[
            ev(1, {"type": "stored", "parent_hash": None, "blocks": [block(2**64 - 3, t[:4]), block(8, t[4:8])]}),
            # A partial last block (partial reuse) is not indexed, nor its later removal.
            ev(2, {"type": "stored", "parent_hash": 8, "blocks": [block(9, [1, 2, 3, 4]), block(10, [5, 6])]}),
            ev(3, {"type": "stored", "parent_hash": None, "blocks": [block(11, [7, 7, 7, 7])]}, window=128),
            ev(4, {"type": "updated", "block_hash": 8, "cache_level": {}, "priority": {}}),
            ev(5, {"type": "removed", "block_hashes": [10, 9]}),
        ]
    )
    recs = await collect(engine, 3)
    lh = local(t)
    assert [(r.event_id, r.data) for r in recs] == [
        (0, KvStored(None, ((2**64 - 3, lh[0]), (8, lh[1])))),
        (1, KvStored(8, ((9, local([1, 2, 3, 4])[0]),))),
        (2, KvRemoved((9,))),
    ]
    conv = engine.event_converter
    assert (conv.skipped_partial, conv.skipped_window) == (1, 1)
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_kv_events_uses_lora_and_salt_seeds(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path, "--lora-modules", f"fr={tmp_path}")
    [o async for o in engine.generate(req("l", [1, 2, 3, 4, 5], lora_name="fr", cache_salt="t1"))]
    llm.push_events(
        *[
            ev(1, {"type": "stored", "parent_hash": None, "blocks": [block(1, [1, 2, 3, 4])]}),
            # Multimodal content (token_extra_id) would hash differently from text: not indexed.
            ev(
                2,
                {
                    "type": "stored",
                    "parent_hash": None,
                    "blocks": [{**block(2, [0, 0, 0, 0]), "tokens": tok([0] * 4, 5)}],
                },
            ),
            # A version that serializes lora_id: it names the adapter (id 1 = "fr", from --lora-modules).
            ev(3, {"type": "stored", "parent_hash": None, "blocks": [block(3, [9, 9, 9, 9], lora_id=1)]}),
        ]
    )
    recs = await collect(engine, 2)
    assert recs[0].data == KvStored(None, ((1, local([1, 2, 3, 4], "fr", "t1")[0]),))
    assert recs[1].data == KvStored(None, ((3, local([9, 9, 9, 9], "fr")[0]),))
    assert engine.event_converter.skipped_special_tokens == 1
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_kv_events_dump_after_stores_and_removes(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    t = list(range(60, 72))
    llm.push_events(
        *[
            ev(1, {"type": "stored", "parent_hash": None, "blocks": [block(1, t[:4]), block(2, t[4:8])]}),
            ev(2, {"type": "stored", "parent_hash": 2, "blocks": [block(3, t[8:])]}),
            ev(3, {"type": "removed", "block_hashes": [3]}),
        ]
    )
    await collect(engine, 3)
    seq = sequence_hashes(local(t))
    blocks, marks = engine.kv_dump()  # type: ignore[misc]
    assert sorted(blocks) == [(0, 1, seq[0]), (0, 2, seq[1])] and marks == {0: 3}
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_kv_events_id_gap_clears_the_rank(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path)
    llm.push_events(
        *[
            ev(1, {"type": "stored", "parent_hash": None, "blocks": [block(1, [1, 2, 3, 4])]}),
            ev(4, {"type": "stored", "parent_hash": None, "blocks": [block(2, [5, 6, 7, 8])]}),  # 2 and 3 were dropped
        ]
    )
    recs = await collect(engine, 3)
    assert [type(r.data) for r in recs] == [KvStored, KvCleared, KvStored]
    assert [b[1] for b in engine.kv_dump()[0]] == [2]  # type: ignore[index]
    await engine.shutdown()


# ------------------------------------------------------------------ capacity, stats, hooks
async def test_trtllm_adapter_against_fake_llm_capacity_and_stats(tmp_path: Path) -> None:
    args = ("--max_batch_size", "64", "--max_num_tokens", "4096")
    engine, llm = await started(tmp_path, *args, stats_interval_s=0.001)
    cap = engine.capacity
    assert (cap.block_size, cap.total_blocks, cap.context_length, cap.max_num_seqs, cap.max_batched_tokens) == (
        TPB,
        DEVICE_BLOCKS,
        2000,  # 500 blocks of 4 tokens hold less than max_seq_len 2048
        64,
        4096,
    )
    llm.push_stats(
        {
            "iter": 7,
            "numActiveRequests": 3,
            "numQueuedRequests": 1,
            "kvCacheStats": {"usedNumBlocks": 42, "maxNumBlocks": DEVICE_BLOCKS, "tokensPerBlock": TPB},
            "inflightBatchingStats": {"numCtxTokens": 96, "numPausedRequests": 1},
        }
    )
    for _ in range(400):  # the stats pump reads it
        if engine.stats()[0].running_requests:
            break
        await asyncio.sleep(0.005)
    s = engine.stats()[0]
    assert (s.running_requests, s.waiting_requests, s.kv_blocks_used, s.kv_blocks_total) == (3, 2, 42, DEVICE_BLOCKS)
    assert s.pending_prefill_tokens == 96
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_llm_capacity_falls_back_to_the_stats(tmp_path: Path) -> None:
    # No 'created' event reached the adapter: the iteration stats of the warm-up say how big the cache is.
    engine, _ = await started(tmp_path, api=FakeTrtllmApi(created_events=False))
    assert engine.capacity.total_blocks == 321
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_llm_disaggregation_handoff_hooks(tmp_path: Path) -> None:
    engine, llm = await started(tmp_path, "--cache_transceiver_config", '{"backend": "UCX"}')
    outs = [o async for o in engine.generate(req("p", prefill_only=True))]
    assert outs[-1].finish_reason is FinishReason.LENGTH and outs[-1].token_ids == [31]
    assert llm.calls[0]["disaggregated_params"] == FakeDisaggregatedParams(request_type="context_only")
    assert llm.calls[0]["sampling_params"].max_tokens == 1
    handoff = engine.take_handoff("p")
    assert handoff == TrtllmHandoff(first_gen_tokens=(31,), ctx_request_id=2, opaque_state=b"\x01state")
    assert engine.take_handoff("p") is None
    engine.attach_handoff("d", handoff)
    [o async for o in engine.generate(req("d", stop=StopParams(max_tokens=2)))]
    assert llm.calls[1]["disaggregated_params"] == FakeDisaggregatedParams(
        request_type="generation_only", first_gen_tokens=[31], ctx_request_id=2, opaque_state=b"\x01state"
    )
    await engine.shutdown()


async def test_trtllm_adapter_against_fake_llm_is_a_pull_engine_of_the_handoff(tmp_path: Path) -> None:
    plain, _ = await started(tmp_path)
    assert plain.kv_handoff == ""  # no cache transceiver: not set up for disaggregation
    with pytest.raises(ValueError, match="cache transceiver"):
        [o async for o in plain.generate(req("p", prefill_only=True))]
    await plain.shutdown()

    engine, llm = await started(tmp_path, "--cache_transceiver_config", '{"backend": "UCX"}')
    assert engine.kv_handoff == "pull" and engine.start_handoff(req("p")) is None
    [o async for o in engine.generate(req("p", prefill_only=True))]
    data = engine.finish_handoff("p")  # what the prefill worker sends back, as bytes
    assert TrtllmHandoff.from_bytes(data) == TrtllmHandoff(
        first_gen_tokens=(31,), ctx_request_id=2, opaque_state=b"\x01state"
    )
    with pytest.raises(ValueError, match="no disaggregated_params"):
        engine.finish_handoff("p")
    handoff = KvImport(first_token_id=31, engine_params=data)
    [o async for o in engine.generate(req("d", stop=StopParams(max_tokens=2), kv_import=handoff))]
    assert llm.calls[1]["disaggregated_params"] == FakeDisaggregatedParams(
        request_type="generation_only", first_gen_tokens=[31], ctx_request_id=2, opaque_state=b"\x01state"
    )
    for bad in (b"", b"[1]", b'{"first_gen_tokens": [1], "evil": 1}'):
        with pytest.raises(ValueError):
            [o async for o in engine.generate(req("x", kv_import=KvImport(0, engine_params=bad)))]
    await engine.shutdown()


# ------------------------------------------------------------------------- construction
def test_trtllm_missing_package_is_an_engine_error_naming_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"needs the 'tensorrt_llm' package.*pip install tensorrt_llm"):
        make_engine("trtllm", spec(tmp_path))


def test_trtllm_adapter_against_fake_llm_args_refused_engine_arg_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="TensorRT-LLM refused --engine-args '--bogus 1': LLM got invalid argument"):
        build_engine(spec(tmp_path, "--bogus", "1"), FakeTrtllmApi())
    with pytest.raises(EngineError, match="expected --name value"):
        build_engine(spec(tmp_path, "stray"), FakeTrtllmApi())


def test_trtllm_engine_args_become_llm_keyword_arguments(tmp_path: Path) -> None:
    cfg = tmp_path / "extra.yaml"
    cfg.write_text("max_batch_size: 8\nkv_cache_config:\n  free_gpu_memory_fraction: 0.5\n")
    kwargs, loras = parse_engine_args(
        [
            "--config",
            str(cfg),
            "--tensor-parallel-size",
            "2",
            "--kv_cache_config.tokens_per_block=64",
            "--enable_attention_dp",
            "--dtype",
            "bfloat16",
            "--lora-modules",
            "a=/p/a",
            "b=/p/b",
        ]
    )
    assert kwargs == {
        "max_batch_size": 8,
        "kv_cache_config": {"free_gpu_memory_fraction": 0.5, "tokens_per_block": 64},
        "tensor_parallel_size": 2,
        "enable_attention_dp": True,
        "dtype": "bfloat16",
    }
    assert loras == {"a": "/p/a", "b": "/p/b"}
    with pytest.raises(EngineArgsError, match="name=path"):
        parse_engine_args(["--lora-modules", "nopath"])
    # What KV routing needs is switched on unless the user set it.
    assert llm_kwargs({"kv_cache_config": {"event_buffer_max_size": 0}}) == {
        "kv_cache_config": {"event_buffer_max_size": 0, "enable_block_reuse": True},
        "enable_iter_perf_stats": True,
    }
    assert llm_kwargs({})["kv_cache_config"] == {"enable_block_reuse": True, "event_buffer_max_size": 16384}
