"""The protocol every engine sits behind, and the plain data it exchanges.

Shaped after the public async APIs of the engines Commutator fronts:

- vLLM ``AsyncLLM.generate(prompt, sampling_params, request_id)`` yields
  ``RequestOutput`` (token ids, ``finish_reason``, ``num_cached_tokens``,
  logprobs); ``abort(request_id)``; KV events from its ``KVEventsConfig``
  publisher (``BlockStored``/``BlockRemoved``/``AllBlocksCleared``).
- SGLang ``Engine.async_generate(input_ids=..., sampling_params=..., stream=True)``
  yields dicts with ``output_ids`` and ``meta_info`` (``finish_reason``,
  ``cached_tokens``); abort by request id; the same KV event format.
- TensorRT-LLM ``LLM.generate_async(inputs, sampling_params, streaming=True)``
  yields ``RequestOutput``; ``abort()`` on the result;
  ``get_kv_cache_events_async()`` and ``get_stats_async()``.

So: token ids in, token deltas out, abort by id, a stream of KV events, load
statistics, capacity, and the handoff of disaggregated serving (DESIGN.md 2):

- ``kv_handoff`` says how the engine takes part. ``push`` (mocker, hf): the decode
  engine reserves blocks (``reserve_import``), the prefill worker's transfer backend
  writes the prompt's KV into them, and the decode request carries ``kv_import``
  with those blocks and the prefill's first token. ``pull`` (vLLM's KV connectors,
  TensorRT-LLM's cache transceiver): nothing is reserved; the prefill engine keeps
  the prompt's blocks and returns opaque parameters (``finish_handoff``), which the
  decode request carries in ``kv_import.engine_params``; the decode engine fetches
  the KV itself. ``rendezvous`` (SGLang): the prefill engine names a meeting point
  before it starts (``start_handoff``), sent to the decode side at once; both
  engines then run the request and the KV moves between them. ``""``: the engine is
  not set up for disaggregation; its prompts are prefilled where they decode.
- A prefill is an ``EngineRequest`` with ``prefill_only``: the prompt's KV and the
  first token, then the request finishes; the prefill engine keeps the prompt's
  blocks until the KV has gone (push: ``release_prefill``; pull and rendezvous:
  the engine's own connector).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "KV_HANDOFFS",
    "Engine",
    "EngineCapacity",
    "EngineOutput",
    "EngineRequest",
    "EngineStats",
    "FinishReason",
    "KvCleared",
    "KvDump",
    "KvEventRecord",
    "KvImport",
    "KvLayout",
    "KvRemoved",
    "KvStored",
    "SamplingParams",
    "StopParams",
    "TokenLogprob",
]


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled
    ERROR = "error"  # the engine failed the request


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None


@dataclass(frozen=True, slots=True)
class StopParams:
    max_tokens: int = 0
    """0: up to the context limit."""
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


KV_HANDOFFS = ("push", "pull", "rendezvous")
"""The ways an engine can take part in disaggregated serving (``Engine.kv_handoff``)."""


@dataclass(frozen=True, slots=True)
class KvImport:
    """A prompt whose KV another worker computed (DESIGN.md 2, the handoff).

    Push engines (mocker, hf) had it written into ``block_ids``, reserved here with
    ``reserve_import``, and emit ``first_token_id`` (the token the prefill produced)
    as this request's first output. Pull and rendezvous engines (vLLM, TensorRT-LLM,
    SGLang) get ``engine_params``, the prefill engine's opaque handoff (its
    ``kv_transfer_params``, disaggregated parameters, bootstrap room), fetch the KV
    themselves and produce their first output as their own connector defines it.
    """

    first_token_id: int
    block_ids: tuple[int, ...] = ()
    engine_params: bytes = b""


@dataclass(frozen=True, slots=True)
class KvLayout:
    """Where an engine's paged KV cache lives, for transfers that address its memory directly (NIXL).

    The cache is ``len(regions)`` contiguous regions of ``num_blocks * block_bytes`` bytes, each
    holding one part of every block (the hf engine: layer 0's K, layer 0's V, layer 1's K, ...):
    block ``b``'s part in region ``r`` is the ``block_bytes`` bytes at ``regions[r] + b * block_bytes``.
    Two engines exchange blocks region by region when their region count and ``block_bytes`` agree
    (same model, dtype and block size). Engines that offer it (``kv_layout()``) keep the memory
    where it is from ``start`` until ``shutdown``.
    """

    device: str
    """``cpu`` or ``cuda``."""
    device_id: int
    """The CUDA device ordinal (0 on CPU)."""
    regions: tuple[int, ...]
    """Base address of each region, in the engine's fixed order."""
    block_bytes: int
    """Bytes of one block in one region, which is also the stride between blocks."""
    num_blocks: int

    @property
    def region_bytes(self) -> int:
        return self.block_bytes * self.num_blocks


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    token_ids: Sequence[int]
    """The prompt: a list, a protobuf repeated field, or an ``array('I')`` (from ``token_bytes``);
    engines that need a list make one."""
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: StopParams = field(default_factory=StopParams)
    logprobs: int | None = None
    """Top alternatives per token to return; ``None``: no logprobs."""
    lora_name: str = ""
    cache_salt: str = ""
    prefill_only: bool = False
    """Compute the prompt's KV and the first token, then finish (disaggregated prefill)."""
    kv_import: KvImport | None = None
    """The prompt's KV was written remotely into blocks reserved with ``reserve_import``."""
    dp_rank: int | None = None


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class EngineOutput:
    """Tokens produced since the last output of a request (one or several)."""

    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    """Set on the first output: prompt tokens served from the prefix cache."""
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """What an engine can take; a worker advertises it in discovery and its model card.

    ``context_length`` is the longest sequence (prompt plus output) the engine can
    actually run: the model's context, or less where the KV cache cannot hold it.
    A frontend refuses longer prompts before routing them.
    """

    block_size: int
    total_blocks: int
    max_num_seqs: int
    max_batched_tokens: int
    context_length: int
    dp_size: int = 1


@dataclass(frozen=True, slots=True)
class EngineStats:
    dp_rank: int
    running_requests: int
    waiting_requests: int
    kv_blocks_used: int
    kv_blocks_total: int
    active_decode_blocks: int
    pending_prefill_tokens: int


@dataclass(frozen=True, slots=True)
class KvStored:
    """Full blocks stored, in prefix order: ``(engine block id, local block hash)``."""

    parent_hash: int | None
    blocks: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class KvRemoved:
    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class KvCleared:
    pass


@dataclass(frozen=True, slots=True)
class KvEventRecord:
    """One KV event of one data-parallel rank, numbered from 0 per rank (DESIGN.md 4.2)."""

    event_id: int
    data: KvStored | KvRemoved | KvCleared
    dp_rank: int = 0


KvDump = tuple[list[tuple[int, int, int]], dict[int, int]]
"""``([(dp_rank, engine block id, sequence hash), ...], {dp_rank: next event id})``."""


class Engine(Protocol):
    """What a worker needs from an engine.

    Lifecycle: ``start`` (load, warm up), then any number of concurrent
    ``generate`` calls, then ``shutdown``. Closing a ``generate`` iterator
    early aborts the request and frees its blocks.
    """

    @property
    def capacity(self) -> EngineCapacity: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Outputs of one request; the last one carries a finish reason."""
        ...

    async def abort(self, request_id: str) -> bool:
        """Abort a request; False if it was not running."""
        ...

    def stats(self) -> list[EngineStats]:
        """Current load, one entry per data-parallel rank."""
        ...

    async def kv_events(self) -> list[KvEventRecord]:
        """Wait for, then take, every KV event emitted since the last call (in order)."""
        ...

    def kv_dump(self) -> KvDump | None:
        """The prefix cache now: ``(dp_rank, engine block id, sequence hash)`` for every cached
        block, and per dp rank the id of the next event (the dump reflects all earlier ones).

        ``None`` when this engine cannot describe its cache (the worker answers ``DumpKvState``
        with UNIMPLEMENTED and the router rebuilds it from live events alone). Adapters of
        engines without a dump of their own keep a :class:`~commutator.engines.kv_mirror.KvMirror`
        of the events they emitted, which describes the cache exactly as long as it saw every
        event since the engine started.
        """
        ...

    def failure(self) -> str | None:
        """Why the engine can serve nothing more (its process died, its loop stopped), else ``None``.

        The worker checks it every second: a failed engine makes the worker leave discovery and
        exit with status 1, so that routers stop sending it requests and a supervisor restarts it.
        """
        ...

    @property
    def kv_handoff(self) -> str:
        """``push``, ``pull``, ``rendezvous`` (see the module docstring), or ``""``: not set up for
        disaggregated serving (engines that need their own configuration for it say so here)."""
        ...

    def start_handoff(self, request: EngineRequest) -> bytes | None:
        """Prefill side, before ``generate`` of a ``prefill_only`` request: a rendezvous engine arms
        the request and returns what the decode engine needs to meet it, sent back before the prefill
        runs; ``None`` for push and pull engines."""
        ...

    def finish_handoff(self, request_id: str) -> bytes:
        """Prefill side, once a ``prefill_only`` request finished: the opaque parameters the decode
        engine needs (pull engines: vLLM's ``kv_transfer_params``, TensorRT-LLM's disaggregated
        parameters); ``b""`` for push and rendezvous engines. Raises ``ValueError`` when a pull engine
        left none (its connector is not set up)."""
        ...

    def reserve_import(self, request: EngineRequest) -> tuple[int, ...] | None:
        """Push engines: reserve blocks to receive ``request``'s prompt KV from a prefill worker.

        Returns the block ids (in prompt order), or ``None`` when there is no
        room now (the caller prefills locally instead). Raises ``ValueError``,
        as :meth:`generate` does, for a request that can never run here.
        """
        ...

    def release_import(self, request_id: str) -> None:
        """Give back blocks reserved by :meth:`reserve_import` that will not be used."""
        ...
