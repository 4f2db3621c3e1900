"""Between the wire (``commutator.v1`` protobuf) and the engine's plain data."""

from __future__ import annotations

from commutator.common.prompt import prompt_ids
from commutator.engines.base import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    FinishReason,
    KvCleared,
    KvEventRecord,
    KvImport,
    KvRemoved,
    KvStored,
    SamplingParams,
    StopParams,
)
from commutator.v1 import common_pb2, kv_events_pb2

__all__ = [
    "event_batch",
    "fill_response",
    "output_to_proto",
    "request_from_proto",
    "request_to_proto",
    "stats_to_proto",
]

_FINISH = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


_SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
)


def _opt(msg: object, name: str) -> object | None:
    return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[attr-defined]


def request_from_proto(req: common_pb2.GenerateRequest) -> EngineRequest:
    """The engine request for a wire request. Raises ``ValueError`` for values no engine can take."""
    if not req.request_id:
        raise ValueError("request_id is required")
    tokens = prompt_ids(req)
    if not tokens:
        raise ValueError("token_ids is empty")
    s = req.sampling
    sampling = SamplingParams(
        temperature=_opt(s, "temperature"),  # type: ignore[arg-type]
        top_p=_opt(s, "top_p"),  # type: ignore[arg-type]
        top_k=_opt(s, "top_k"),  # type: ignore[arg-type]
        seed=_opt(s, "seed"),  # type: ignore[arg-type]
        frequency_penalty=_opt(s, "frequency_penalty"),  # type: ignore[arg-type]
        presence_penalty=_opt(s, "presence_penalty"),  # type: ignore[arg-type]
        repetition_penalty=_opt(s, "repetition_penalty"),  # type: ignore[arg-type]
    )
    if sampling.temperature is not None and sampling.temperature < 0:
        raise ValueError("temperature must be >= 0")
    if sampling.top_p is not None and not 0 < sampling.top_p <= 1:
        raise ValueError("top_p must be in (0, 1]")
    st = req.stop
    if st.min_tokens and st.max_tokens and st.min_tokens > st.max_tokens:
        raise ValueError("min_tokens must not exceed max_tokens")
    d = req.disaggregation
    kv_import = None
    if d.HasField("first_token_id"):
        kv_import = KvImport(
            first_token_id=d.first_token_id, block_ids=tuple(d.imported_block_ids), engine_params=d.engine_params
        )
    return EngineRequest(
        request_id=req.request_id,
        token_ids=tokens,
        sampling=sampling,
        stop=StopParams(
            max_tokens=st.max_tokens,
            min_tokens=st.min_tokens,
            stop_token_ids=tuple(st.stop_token_ids),
            ignore_eos=st.ignore_eos,
        ),
        logprobs=req.logprobs if req.HasField("logprobs") else None,
        lora_name=req.lora_name,
        cache_salt=req.cache_salt,
        prefill_only=d.prefill_only,
        kv_import=kv_import,
        dp_rank=req.dp_rank if req.HasField("dp_rank") else None,
    )


def request_to_proto(req: EngineRequest) -> common_pb2.GenerateRequest:
    """The wire form of an engine request (the inverse of :func:`request_from_proto`)."""
    g = common_pb2.GenerateRequest(
        request_id=req.request_id, token_ids=req.token_ids, lora_name=req.lora_name, cache_salt=req.cache_salt
    )
    s, sp = req.sampling, g.sampling
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
    ):
        value = getattr(s, name)
        if value is not None:
            setattr(sp, name, value)
    st = g.stop
    st.max_tokens, st.min_tokens, st.ignore_eos = req.stop.max_tokens, req.stop.min_tokens, req.stop.ignore_eos
    st.stop_token_ids.extend(req.stop.stop_token_ids)
    if req.logprobs is not None:
        g.logprobs = req.logprobs
    if req.dp_rank is not None:
        g.dp_rank = req.dp_rank
    d = g.disaggregation
    d.prefill_only = req.prefill_only
    if req.kv_import is not None:
        d.first_token_id = req.kv_import.first_token_id
        d.imported_block_ids.extend(req.kv_import.block_ids)
        d.engine_params = req.kv_import.engine_params
    return g


def output_to_proto(out: EngineOutput) -> common_pb2.GenerateResponse:
    resp = common_pb2.GenerateResponse()
    fill_response(resp, out)
    return resp


def fill_response(resp: common_pb2.GenerateResponse, out: EngineOutput) -> None:
    """Write ``out`` into an empty ``resp`` (in place: a message inside a frame costs no copy)."""
    resp.token_ids.extend(out.token_ids)
    if out.finish_reason is not None:
        resp.finish_reason = _FINISH[out.finish_reason]
    if out.cached_prompt_tokens:
        resp.cached_prompt_tokens = out.cached_prompt_tokens
    if out.prompt_tokens:
        resp.prompt_tokens = out.prompt_tokens
    if out.logprobs:
        for lp in out.logprobs:
            entry = resp.logprobs.add(token_id=lp.token_id, logprob=lp.logprob)
            for tid, val in lp.top:
                entry.top.add(token_id=tid, logprob=val)
    if out.error:
        resp.error_message = out.error


def stats_to_proto(stats: EngineStats, worker_id: int, timestamp_s: float, epoch: int = 0) -> common_pb2.WorkerStats:
    """``epoch``: the engine's (``KvEvent.epoch``; 0: not stamped)."""
    return common_pb2.WorkerStats(
        worker_id=worker_id,
        dp_rank=stats.dp_rank,
        running_requests=stats.running_requests,
        waiting_requests=stats.waiting_requests,
        kv_blocks_used=stats.kv_blocks_used,
        kv_blocks_total=stats.kv_blocks_total,
        active_decode_blocks=stats.active_decode_blocks,
        pending_prefill_tokens=stats.pending_prefill_tokens,
        timestamp_s=timestamp_s,
        epoch=epoch,
    )


def event_batch(records: list[KvEventRecord], worker_id: int, epoch: int = 0) -> kv_events_pb2.KvEventBatch:
    """One wire message carrying ``records`` (in order) of ``worker_id``'s engine incarnation ``epoch``."""
    batch = kv_events_pb2.KvEventBatch()
    events = batch.events
    for r in records:
        ev = events.add(worker_id=worker_id, dp_rank=r.dp_rank, event_id=r.event_id, epoch=epoch)
        data = r.data
        if isinstance(data, KvStored):
            stored = ev.stored
            if data.parent_hash is not None:
                stored.parent_hash = data.parent_hash
            blocks = stored.blocks
            for block_hash, tokens_hash in data.blocks:
                blocks.add(block_hash=block_hash, tokens_hash=tokens_hash)
        elif isinstance(data, KvRemoved):
            ev.removed.block_hashes.extend(data.block_hashes)
        elif isinstance(data, KvCleared):
            ev.cleared.SetInParent()
    return batch
