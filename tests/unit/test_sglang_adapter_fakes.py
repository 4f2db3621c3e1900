"""The SGLang adapter against hand-written FAKES of SGLang's documented Python API (no sglang installed).

The fakes mirror what the real calls take and give (checked against sgl-project/sglang,
``entrypoints/engine.py`` at 001067f, ``managers/tokenizer_manager.py``,
``disaggregation/kv_events.py``; see the adapter's module docstrings): ``async_generate``
yields dicts with cumulative ``output_ids`` (or deltas with incremental streaming) and
``meta_info``; the KV-event source yields msgpack-decoded array-like batches. Every test
name says ``fake``: these prove the adapter's side of the contract, not SGLang itself.
"""

from __future__ import annotations

import asyncio
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from commutator.common.clock import VirtualClock
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
from commutator.engines.engine_events import engine_block_id
from commutator.engines.registry import EngineError, EngineSpec, make_engine
from commutator.engines.seed_hints import RootSeedHints
from commutator.engines.sglang import SglangEngine, SglangRendezvous, build_engine

pytestmark = pytest.mark.unit

PAGE = 4
TOTAL_TOKENS = 4096
# SamplingParams.__init__ parameters of sglang 0bebedd, plus sampling_seed (newer versions).
SAMPLING_NAMES = frozenset(
    "max_new_tokens stop stop_token_ids temperature top_p top_k min_p frequency_penalty presence_penalty "
    "repetition_penalty min_new_tokens n json_schema regex ebnf structural_tag ignore_eos skip_special_tokens "
    "spaces_between_special_tokens no_stop_trim custom_params stream_interval logit_bias sampling_seed".split()
)


# ---------------------------------------------------------------------------------- fakes
@dataclass
class FakeServerArgs:
    """The ServerArgs fields the adapter reads (names as in sglang's server_args.py)."""

    model_path: str = ""
    page_size: int = 1
    dp_size: int = 1
    kv_events_config: str | None = None
    context_length: int | None = None
    max_running_requests: int | None = None
    chunked_prefill_size: int | None = 8192
    disaggregation_mode: str = "null"
    disaggregation_bootstrap_port: int = 8998
    host: str = "127.0.0.1"
    incremental_streaming_output: bool = False


@dataclass
class FakeLoad:
    """GetLoadReqOutput (io_struct.py): num_reqs counts running and waiting requests."""

    dp_rank: int
    num_reqs: int
    num_waiting_reqs: int
    num_tokens: int


class FakeTokenizerManager:
    def __init__(self, context_len: int) -> None:
        self.context_len = context_len
        self.aborted: list[str] = []
        self.loads: list[FakeLoad] = []

    def abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        self.aborted.append(rid)

    async def get_load(self) -> list[FakeLoad]:
        return list(self.loads)


@dataclass
class Plan:
    """What the fake engine generates for the next request."""

    tokens: list[int] = field(default_factory=lambda: [11, 12, 13, 14, 15])
    cached_tokens: int = 0
    chunk: int = 2


class FakeSglangEngine:
    """``sglang.Engine``: the attributes and calls the adapter uses."""

    def __init__(self, server_args: FakeServerArgs, *, cache_salt: bool = True) -> None:
        self.server_args = server_args
        self.tokenizer_manager = FakeTokenizerManager(context_len=2048)
        self._scheduler_init_result = SimpleNamespace(
            scheduler_infos=[{"max_total_num_tokens": TOTAL_TOKENS, "max_req_input_len": 2047}]
        )
        self.calls: list[dict[str, Any]] = []
        self.plans: list[Plan] = []
        self.shut_down = False
        if not cache_salt:  # an older version: no cache_salt keyword
            self.async_generate = self._async_generate_no_salt  # type: ignore[method-assign,assignment]

    async def async_generate(
        self,
        prompt: Any = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        lora_path: Any = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        routed_dp_rank: int | None = None,
        rid: str | None = None,
        *,
        cache_salt: str | None = None,
    ) -> Any:
        call = {k: v for k, v in locals().items() if k != "self" and v is not None}
        self.calls.append(call)
        assert stream is True and input_ids is not None and rid is not None
        return self._stream(call)

    async def _async_generate_no_salt(
        self,
        prompt: Any = None,
        sampling_params: dict[str, Any] | None = None,
        input_ids: list[int] | None = None,
        return_logprob: bool = False,
        logprob_start_len: int | None = None,
        top_logprobs_num: int | None = None,
        lora_path: Any = None,
        stream: bool = False,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        data_parallel_rank: int | None = None,
        rid: str | None = None,
    ) -> Any:
        """An older ``async_generate``: no ``cache_salt``, ``data_parallel_rank`` instead of ``routed_dp_rank``."""
        call = {k: v for k, v in locals().items() if k != "self" and v is not None}
        self.calls.append(call)
        return self._stream(call)

    async def _stream(self, call: dict[str, Any]) -> Any:
        plan = self.plans.pop(0) if self.plans else Plan()
        sp = call["sampling_params"]
        rid = call["rid"]
        incremental = self.server_args.incremental_streaming_output
        produced: list[int] = []
        lps: list[tuple[float, int, None]] = []
        tops: list[list[tuple[float, int, None]]] = []
        finish: dict[str, Any] | None = None
        while finish is None:
            await asyncio.sleep(0)
            if rid in self.tokenizer_manager.aborted:
                finish = {"type": "abort", "message": "Abort in waiting queue", "status_code": 499, "err_type": None}
                new: list[int] = []
            else:
                new = []
                for _ in range(plan.chunk):
                    tok = plan.tokens[len(produced) + len(new)]
                    new.append(tok)
                    if tok in sp.get("stop_token_ids", ()):
                        finish = {"type": "stop", "matched": tok}
                        break
                    if len(produced) + len(new) >= sp["max_new_tokens"]:
                        finish = {"type": "length", "length": sp["max_new_tokens"]}
                        break
                    if len(produced) + len(new) == len(plan.tokens):
                        finish = {"type": "stop", "matched": tok}  # the plan's last token is its EOS
                        break
            n_before = len(produced)
            produced += new
            for t in new:
                lps.append((-0.5 - 0.01 * t, t, None))
                tops.append([(-0.5 - 0.01 * t, t, None), (-3.0, 99, None)])
            meta: dict[str, Any] = {
                "id": rid,
                "finish_reason": finish,
                "prompt_tokens": len(call["input_ids"]),
                "completion_tokens": len(produced),
                "cached_tokens": plan.cached_tokens,
            }
            if call.get("return_logprob"):
                meta["output_token_logprobs"] = lps[n_before:] if incremental else list(lps)
                meta["output_top_logprobs"] = tops[n_before:] if incremental else list(tops)
            yield {"text": None, "output_ids": new if incremental else list(produced), "meta_info": meta}

    def shutdown(self) -> None:
        self.shut_down = True


class FakeKvSource:
    """One rank's ZMQ SUB socket: ``(seq, msgpack-decoded EventBatch)`` items."""

    def __init__(self, endpoint: str, topic: str) -> None:
        self.endpoint, self.topic = endpoint, topic
        self.queue: asyncio.Queue[tuple[int | None, Any]] = asyncio.Queue()
        self.closed = False

    async def recv(self) -> tuple[int | None, Any]:
        return await self.queue.get()

    def close(self) -> None:
        self.closed = True


KNOWN_FLAGS = {
    "--model-path": "model_path",
    "--page-size": "page_size",
    "--dp-size": "dp_size",
    "--kv-events-config": "kv_events_config",
    "--context-length": "context_length",
    "--max-running-requests": "max_running_requests",
    "--disaggregation-mode": "disaggregation_mode",
    "--incremental-streaming-output": "incremental_streaming_output",
}


class FakeSglangApi:
    """``prepare_server_args`` (argparse), ``sglang.Engine(server_args=...)``, and the ZMQ subscriber."""

    def __init__(self, *, cache_salt: bool = True, sampling_names: frozenset[str] = SAMPLING_NAMES) -> None:
        self.parsed: list[list[str]] = []
        self.engines: list[FakeSglangEngine] = []
        self.sources: list[FakeKvSource] = []
        self._cache_salt = cache_salt
        self._names = sampling_names

    def parse_server_args(self, argv: list[str]) -> FakeServerArgs:
        self.parsed.append(list(argv))
        args = FakeServerArgs()
        i = 0
        while i < len(argv):
            flag = argv[i]
            if flag not in KNOWN_FLAGS:
                print("usage: sglang serve [-h] --model-path MODEL_PATH ...", file=sys.stderr)
                print(f"sglang serve: error: unrecognized arguments: {flag}", file=sys.stderr)
                raise SystemExit(2)
            name = KNOWN_FLAGS[flag]
            if name == "incremental_streaming_output":
                args.incremental_streaming_output = True
                i += 1
                continue
            value: Any = argv[i + 1]
            default = getattr(FakeServerArgs(), name)
            setattr(args, name, int(value) if isinstance(default, int) and not isinstance(default, bool) else value)
            i += 2
        if args.page_size < 1:
            raise ValueError("page_size must be positive")
        return args

    def create_engine(self, server_args: FakeServerArgs) -> FakeSglangEngine:
        engine = FakeSglangEngine(server_args, cache_salt=self._cache_salt)
        self.engines.append(engine)
        return engine

    def sampling_param_names(self) -> frozenset[str]:
        return self._names

    def open_kv_events(self, endpoint: str, topic: str) -> FakeKvSource:
        source = FakeKvSource(endpoint, topic)
        self.sources.append(source)
        return source


# -------------------------------------------------------------------------------- helpers
def spec(tmp_path: Path, *args: str) -> EngineSpec:
    (tmp_path / "config.json").write_text('{"vocab_size": 128, "max_position_embeddings": 2048}')
    return EngineSpec(tmp_path, "tiny", tuple(args))


async def started(tmp_path: Path, *args: str, api: FakeSglangApi | None = None) -> tuple[SglangEngine, FakeSglangApi]:
    api = api or FakeSglangApi()
    engine = build_engine(spec(tmp_path, "--page-size", str(PAGE), *args), api, stats_interval_s=1000.0)
    await engine.start()
    return engine, api


def req(rid: str = "r1", tokens: list[int] | None = None, **kw: Any) -> EngineRequest:
    return EngineRequest(rid, tokens if tokens is not None else list(range(1, 11)), **kw)


async def collect(engine: Any, n: int) -> list[Any]:
    out: list[Any] = []
    while len(out) < n:
        out += await asyncio.wait_for(engine.kv_events(), 2.0)
    return out


def stored(hashes: list[int], parent: int | None, tokens: list[Any], medium: str = "GPU") -> list[Any]:
    return ["BlockStored", hashes, parent, tokens, len(tokens), None, medium]


def local(tokens: list[int], lora: str = "", salt: str = "") -> list[int]:
    return local_block_hashes(tokens, PAGE, block_hash_seed(lora, salt))


# ------------------------------------------------------------------------ generation
async def test_sglang_adapter_against_fake_engine_streams_token_deltas(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    fake = api.engines[0]
    fake.plans.append(Plan(tokens=[21, 22, 23, 24, 25], cached_tokens=8))
    outs = [o async for o in engine.generate(req(stop=StopParams(max_tokens=5)))]
    assert [o.token_ids for o in outs] == [[21, 22], [23, 24], [25]]
    assert [o.finish_reason for o in outs] == [None, None, FinishReason.LENGTH]
    assert (outs[0].prompt_tokens, outs[0].cached_prompt_tokens) == (10, 8)
    assert (outs[1].prompt_tokens, outs[1].cached_prompt_tokens) == (0, 0)
    call = fake.calls[0]
    assert call["input_ids"] == list(range(1, 11)) and call["rid"] == "r1" and call["stream"] is True
    await engine.shutdown()
    assert fake.shut_down


async def test_sglang_adapter_against_fake_engine_incremental_streaming_gives_the_same_deltas(
    tmp_path: Path,
) -> None:
    engine, api = await started(tmp_path, "--incremental-streaming-output")
    api.engines[0].plans.append(Plan(tokens=[21, 22, 23, 24, 25]))
    outs = [o async for o in engine.generate(req(stop=StopParams(max_tokens=5), logprobs=0))]
    assert [o.token_ids for o in outs] == [[21, 22], [23, 24], [25]]
    assert [lp.token_id for o in outs for lp in o.logprobs or []] == [21, 22, 23, 24, 25]
    await engine.shutdown()


async def test_sglang_adapter_against_fake_engine_stop_token_finish_and_logprobs(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    api.engines[0].plans.append(Plan(tokens=[21, 22, 7, 24], chunk=1))
    outs = [o async for o in engine.generate(req(stop=StopParams(max_tokens=10, stop_token_ids=(7,)), logprobs=1))]
    assert [o.token_ids for o in outs] == [[21], [22], [7]]
    assert outs[-1].finish_reason is FinishReason.STOP
    lps = [lp for o in outs for lp in o.logprobs or []]
    assert [(lp.token_id, round(lp.logprob, 2)) for lp in lps] == [(21, -0.71), (22, -0.72), (7, -0.57)]
    assert lps[0].top == ((21, pytest.approx(-0.71)),)
    call = api.engines[0].calls[0]
    assert (call["return_logprob"], call["top_logprobs_num"], call["logprob_start_len"]) == (True, 1, -1)
    await engine.shutdown()


async def test_sglang_adapter_against_fake_engine_aborts_when_the_stream_is_closed(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    gen = engine.generate(req("gone", stop=StopParams(max_tokens=5)))
    first = await anext(gen)  # type: ignore[arg-type]
    assert first.token_ids == [11, 12]
    await gen.aclose()  # type: ignore[attr-defined]
    assert api.engines[0].tokenizer_manager.aborted == ["gone"]
    assert await engine.abort("gone") is False  # no longer running
    await engine.shutdown()


async def test_sglang_adapter_against_fake_engine_abort_by_id_finishes_with_abort(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    gen = engine.generate(req("a", stop=StopParams(max_tokens=5)))
    await anext(gen)  # type: ignore[arg-type]
    assert await engine.abort("a") is True
    rest = [o async for o in gen]  # type: ignore[attr-defined]
    assert rest[-1].finish_reason is FinishReason.ABORT and rest[-1].error is None
    assert api.engines[0].tokenizer_manager.aborted == ["a"]
    await engine.shutdown()


async def test_sglang_adapter_against_fake_engine_maps_sampling_stop_lora_salt_and_rank(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    r = req(
        sampling=SamplingParams(
            temperature=0.5,
            top_p=0.9,
            top_k=20,
            seed=7,
            frequency_penalty=0.1,
            presence_penalty=0.2,
            repetition_penalty=1.1,
        ),
        stop=StopParams(max_tokens=3, min_tokens=2, stop_token_ids=(5, 6), ignore_eos=True),
        lora_name="fr",
        cache_salt="tenant-a",
        dp_rank=0,
    )
    [o async for o in engine.generate(r)]
    call = api.engines[0].calls[0]
    assert call["sampling_params"] == {
        "max_new_tokens": 3,
        "min_new_tokens": 2,
        "stop_token_ids": [5, 6],
        "ignore_eos": True,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 20,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.2,
        "repetition_penalty": 1.1,
        "sampling_seed": 7,
    }
    assert (call["lora_path"], call["cache_salt"], call["routed_dp_rank"]) == ("fr", "tenant-a", 0)
    # max_tokens 0: up to the context (2048 tokens of the fake's tokenizer manager); top_k 0: all.
    [o async for o in engine.generate(req("r2", list(range(100)), sampling=SamplingParams(top_k=0)))]
    assert api.engines[0].calls[1]["sampling_params"] == {"max_new_tokens": 2048 - 100}
    await engine.shutdown()


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (req(sampling=SamplingParams(seed=1)), "seed is not supported"),
        (req(cache_salt="s"), "cache_salt is not supported"),
        (req(kv_import=KvImport(first_token_id=3)), "rendezvous"),
        (req(tokens=list(range(3000))), "context is 2048 tokens"),
        (req(dp_rank=3), "dp_rank 3"),
    ],
)
async def test_sglang_adapter_against_fake_engine_refuses_what_it_cannot_map(
    tmp_path: Path, request_: EngineRequest, message: str
) -> None:
    old = FakeSglangApi(cache_salt=False, sampling_names=SAMPLING_NAMES - {"sampling_seed"})
    engine, api = await started(tmp_path, api=old)
    with pytest.raises(ValueError, match=message):
        [o async for o in engine.generate(request_)]
    assert api.engines[0].calls == []
    await engine.shutdown()


async def test_sglang_adapter_against_fake_older_engine_routes_a_rank_with_data_parallel_rank(
    tmp_path: Path,
) -> None:
    engine, api = await started(tmp_path, api=FakeSglangApi(cache_salt=False))
    [o async for o in engine.generate(req(dp_rank=0))]
    assert api.engines[0].calls[0]["data_parallel_rank"] == 0
    await engine.shutdown()


# -------------------------------------------------------------------------- KV events
async def test_sglang_adapter_against_fake_kv_events_recomputes_local_hashes(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    src = api.sources[0]
    assert src.endpoint.startswith("ipc://") and api.parsed[-1][-2] == "--kv-events-config"
    tokens = list(range(100, 108))
    # One BlockStored per page, chained by parent id; ids are signed 64-bit in SGLang.
    await src.queue.put(
        (0, [1.0, [stored([-5], None, tokens[:4]), stored([6], -5, tokens[4:]), stored([9], 6, [1, 2])], 0])
    )
    recs = await collect(engine, 2)
    lh = local(tokens)
    u5 = engine_block_id(-5)
    assert u5 == (1 << 64) - 5
    assert [r.data for r in recs] == [KvStored(None, ((u5, lh[0]),)), KvStored(u5, ((6, lh[1]),))]
    assert [r.event_id for r in recs] == [0, 1]
    assert engine.event_converter.skipped_partial == 1  # the 2-token page is not indexed
    # A removal of the partial page is dropped; CPU-tier copies are not the device cache.
    await src.queue.put((1, [2.0, [["BlockRemoved", [9]], stored([77], None, tokens[:4], "CPU_PINNED")], 0]))
    await src.queue.put((2, [3.0, [["BlockRemoved", [6], "GPU"]], 0]))
    recs = await collect(engine, 1)
    assert [(r.event_id, r.data) for r in recs] == [(2, KvRemoved((6,)))]
    await engine.shutdown()


async def test_sglang_adapter_against_fake_kv_events_uses_lora_and_salt_seeds(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    src = api.sources[0]
    lora_tokens, salted_tokens = [1, 2, 3, 4], [5, 6, 7, 8]
    # The events carry no LoRA name (lora_id None): the adapter knows which request had these tokens.
    [o async for o in engine.generate(req("l", tokens=[*lora_tokens, 9], lora_name="fr"))]
    await src.queue.put((0, [1.0, [stored([1], None, lora_tokens)]]))
    # Newer SGLang sends the salt itself (BlockStoredWithMetadata: a trailing map).
    await src.queue.put((1, [1.0, [[*stored([2], None, salted_tokens), {"cache_salt": "t1"}]]]))
    recs = await collect(engine, 2)
    assert recs[0].data == KvStored(None, ((1, local(lora_tokens, lora="fr")[0]),))
    assert recs[1].data == KvStored(None, ((2, local(salted_tokens, salt="t1")[0]),))
    await engine.shutdown()


async def test_sglang_adapter_against_fake_kv_events_skips_a_root_it_cannot_attribute(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    src = api.sources[0]
    shared = [1, 2, 3, 4]
    a = engine.generate(req("a", tokens=[*shared, 5], cache_salt="t1"))
    b = engine.generate(req("b", tokens=[*shared, 6], cache_salt="t2"))
    await anext(a)  # type: ignore[arg-type]
    await anext(b)  # type: ignore[arg-type]
    # Two tenants' requests with the same first page are in flight: which salt is this root? Not guessed.
    await src.queue.put((0, [1.0, [stored([1], None, shared), stored([2], 1, [5, 5, 5, 5])]]))
    await src.queue.put((1, [1.0, [stored([3], None, [8, 8, 8, 8])]]))
    recs = await collect(engine, 1)
    assert [r.data for r in recs] == [KvStored(None, ((3, local([8, 8, 8, 8])[0]),))]
    assert engine.event_converter.skipped_ambiguous == 1
    await a.aclose()  # type: ignore[attr-defined]
    await b.aclose()  # type: ignore[attr-defined]
    await engine.shutdown()


async def test_sglang_adapter_against_fake_kv_events_dump_after_stores_and_removes(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    src = api.sources[0]
    t = list(range(40, 52))
    await src.queue.put(
        (0, [1.0, [stored([1], None, t[:4]), stored([2], 1, t[4:8]), stored([3], 2, t[8:]), ["BlockRemoved", [3]]]])
    )
    await collect(engine, 4)
    seq = sequence_hashes(local(t))
    blocks, marks = engine.kv_dump()  # type: ignore[misc]
    assert sorted(blocks) == [(0, 1, seq[0]), (0, 2, seq[1])]
    assert marks == {0: 4}
    await engine.shutdown()


async def test_sglang_adapter_against_fake_kv_events_sequence_gap_clears_the_rank(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    src = api.sources[0]
    await src.queue.put((5, [1.0, [stored([1], None, [1, 2, 3, 4])]]))
    await src.queue.put((7, [1.0, [stored([2], None, [5, 6, 7, 8])]]))  # seq 6 never arrived
    recs = await collect(engine, 3)
    assert [type(r.data) for r in recs] == [KvStored, KvCleared, KvStored]
    blocks, _ = engine.kv_dump()  # type: ignore[misc]
    assert [b[1] for b in blocks] == [2]
    assert engine.event_converter.sequence_gaps == 1
    await engine.shutdown()


# ------------------------------------------------------------------ capacity, stats, hooks
async def test_sglang_adapter_against_fake_engine_capacity_and_stats(tmp_path: Path) -> None:
    engine, api = await started(tmp_path, "--max-running-requests", "64")
    cap = engine.capacity
    assert (cap.block_size, cap.total_blocks, cap.context_length, cap.max_num_seqs, cap.dp_size) == (
        PAGE,
        TOTAL_TOKENS // PAGE,
        2048,
        64,
        1,
    )
    api.engines[0].tokenizer_manager.loads = [FakeLoad(0, num_reqs=5, num_waiting_reqs=2, num_tokens=41)]
    await engine.refresh_stats()
    s = engine.stats()[0]
    assert (s.running_requests, s.waiting_requests, s.kv_blocks_used, s.kv_blocks_total) == (3, 2, 11, 1024)
    await engine.shutdown()
    assert api.sources[0].closed


async def test_sglang_adapter_against_fake_engine_rendezvous_hook_passes_the_bootstrap_room(tmp_path: Path) -> None:
    engine, api = await started(tmp_path)
    assert engine.bootstrap_address() is None  # not a prefill engine
    engine.attach_rendezvous("p", SglangRendezvous("10.0.0.2", 8998, 1234))
    [o async for o in engine.generate(req("p"))]
    call = api.engines[0].calls[0]
    assert (call["bootstrap_host"], call["bootstrap_port"], call["bootstrap_room"]) == ("10.0.0.2", 8998, 1234)
    await engine.shutdown()
    prefill, _ = await started(tmp_path, "--disaggregation-mode", "prefill")
    assert prefill.bootstrap_address() == ("127.0.0.1", 8998)
    with pytest.raises(ValueError, match="need a rendezvous"):
        [o async for o in prefill.generate(req("x"))]
    await prefill.shutdown()


async def test_sglang_adapter_against_fake_engine_is_a_rendezvous_engine_of_the_handoff(tmp_path: Path) -> None:
    plain, _ = await started(tmp_path)
    assert plain.kv_handoff == ""  # --disaggregation-mode null: not set up for disaggregation
    await plain.shutdown()
    prefill, papi = await started(tmp_path, "--disaggregation-mode", "prefill")
    decode, dapi = await started(tmp_path, "--disaggregation-mode", "decode")
    assert prefill.kv_handoff == decode.kv_handoff == "rendezvous"
    # Prefill side: a fresh room at its bootstrap server, armed for this request, sent back at once.
    data = prefill.start_handoff(req("p", prefill_only=True))
    assert data is not None
    meet = SglangRendezvous.from_bytes(data)
    assert (meet.host, meet.port) == ("127.0.0.1", 8998) and 0 <= meet.room < 2**63
    [o async for o in prefill.generate(req("p", prefill_only=True))]
    assert prefill.finish_handoff("p") == b""
    pcall = papi.engines[0].calls[0]
    assert pcall["sampling_params"]["max_new_tokens"] == 1
    # Decode side: the same rendezvous, from the request's handoff parameters.
    [o async for o in decode.generate(req("d", kv_import=KvImport(0, engine_params=data)))]
    dcall = dapi.engines[0].calls[0]
    for call in (pcall, dcall):
        assert (call["bootstrap_host"], call["bootstrap_port"], call["bootstrap_room"]) == (
            meet.host,
            meet.port,
            meet.room,
        )
    with pytest.raises(ValueError, match="not prefill"):
        decode.start_handoff(req("q"))
    with pytest.raises(ValueError, match="unreadable"):
        [o async for o in decode.generate(req("e", kv_import=KvImport(0, engine_params=b"{}")))]
    await prefill.shutdown()
    await decode.shutdown()


# ------------------------------------------------------------------------- construction
def test_sglang_missing_package_is_an_engine_error_naming_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"needs the 'sglang' package.*pip install 'sglang\[all\]'"):
        make_engine("sglang", spec(tmp_path))


def test_sglang_adapter_against_fake_parser_refused_engine_arg_is_an_engine_error(tmp_path: Path) -> None:
    with pytest.raises(
        EngineError, match=r"SGLang refused --engine-args '--bogus 1': .*unrecognized arguments: --bogus"
    ):
        build_engine(spec(tmp_path, "--bogus", "1"), FakeSglangApi())
    with pytest.raises(EngineError, match="page_size must be positive"):
        build_engine(spec(tmp_path, "--page-size", "0"), FakeSglangApi())


def test_sglang_adapter_keeps_a_user_kv_events_config(tmp_path: Path) -> None:
    api = FakeSglangApi()
    cfg = '{"publisher": "zmq", "endpoint": "tcp://*:6000"}'
    engine = build_engine(spec(tmp_path, "--kv-events-config", cfg, "--dp-size", "2"), api)
    assert len(api.parsed) == 1 and engine.server_args.kv_events_config == cfg


async def test_sglang_adapter_subscribes_one_source_per_rank_with_offset_ports(tmp_path: Path) -> None:
    cfg = '{"publisher": "zmq", "endpoint": "tcp://*:6000", "topic": "kv"}'
    engine, api = await started(tmp_path, "--kv-events-config", cfg, "--dp-size", "2")
    assert [(s.endpoint, s.topic) for s in api.sources] == [
        ("tcp://127.0.0.1:6000", "kv"),
        ("tcp://127.0.0.1:6001", "kv"),
    ]
    await api.sources[1].queue.put((0, [1.0, [stored([1], None, [1, 2, 3, 4])], 1]))
    recs = await collect(engine, 1)
    assert recs[0].dp_rank == 1 and engine.capacity.dp_size == 2
    await engine.shutdown()


# ---------------------------------------------------------------------- seed hints (pure)
def test_root_seed_hints_attribute_in_flight_and_recent_requests_only() -> None:
    clock = VirtualClock()
    hints = RootSeedHints(2, clock=clock, grace_s=5.0)
    h = hints.begin([1, 2, 3], "fr", "")
    assert hints.begin([1], "x", "") is None  # no full block
    assert hints.choose([1, 2]) == ("fr", "")
    assert hints.choose([7, 7]) == ("", "")  # nobody sent it: the base seed
    assert hints.choose([1, 2], event_salt="t") == ("", "t")
    hints.end(h)
    clock.advance_sync(4.0)
    assert hints.choose([1, 2]) == ("fr", "")  # its events may still be arriving
    h2 = hints.begin([1, 2, 9])
    assert hints.choose([1, 2]) is None  # base and LoRA requests share the block: ambiguous
    assert hints.choose([1, 2], event_lora="fr") == ("fr", "")
    clock.advance_sync(2.0)
    assert hints.choose([1, 2]) == ("", "")
    hints.end(h2)
    assert len(hints) == 1
