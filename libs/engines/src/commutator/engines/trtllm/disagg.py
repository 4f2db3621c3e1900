"""TensorRT-LLM's disaggregation handoff: opaque parameters from the context phase (DESIGN.md 2).

TensorRT-LLM splits a request in two with ``DisaggregatedParams``
(``tensorrt_llm/disaggregated_params.py``, NVIDIA/TensorRT-LLM 01009a3): the context
(prefill) server runs it with ``request_type="context_only"`` and answers, in
``CompletionOutput.disaggregated_params``, the first generated token(s)
(``first_gen_tokens``), its request id (``ctx_request_id``), an ``opaque_state``
(bytes: how to reach its KV cache), ``draft_tokens`` and, in newer versions,
``disagg_request_id``, ``ctx_dp_rank`` and ``ctx_info_endpoint``. The generation
server then runs the same prompt with ``request_type="generation_only"`` and those
values, and its cache transceiver pulls the KV. Both engines need a
``cache_transceiver_config`` in their LLM arguments.

The adapter is a *pull* engine of the handoff (``Engine.kv_handoff``) and carries the
values without interpreting them:

- a ``prefill_only`` request on an engine with a cache transceiver runs as
  ``context_only``; afterwards :meth:`TrtllmEngine.finish_handoff` returns its
  :class:`TrtllmHandoff` as JSON (:meth:`TrtllmHandoff.to_bytes`), which the prefill
  worker sends back in ``PrefillResult.engine_params``;
- a decode request with ``kv_import.engine_params`` runs as ``generation_only`` with
  that handoff (:meth:`TrtllmEngine.attach_handoff` does the same for a request id).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["HANDOFF_FIELDS", "TrtllmHandoff"]


@dataclass(frozen=True, slots=True)
class TrtllmHandoff:
    """The context phase's ``DisaggregatedParams`` values, as plain data."""

    first_gen_tokens: tuple[int, ...] = ()
    ctx_request_id: int | None = None
    opaque_state: bytes | None = None
    draft_tokens: tuple[int, ...] | None = None
    disagg_request_id: int | None = None
    ctx_dp_rank: int | None = None
    ctx_info_endpoint: str | None = None

    @classmethod
    def from_params(cls, params: Any) -> TrtllmHandoff:
        draft = getattr(params, "draft_tokens", None)
        return cls(
            first_gen_tokens=tuple(getattr(params, "first_gen_tokens", None) or ()),
            ctx_request_id=getattr(params, "ctx_request_id", None),
            opaque_state=getattr(params, "opaque_state", None),
            draft_tokens=tuple(draft) if draft is not None else None,
            disagg_request_id=getattr(params, "disagg_request_id", None),
            ctx_dp_rank=getattr(params, "ctx_dp_rank", None),
            ctx_info_endpoint=getattr(params, "ctx_info_endpoint", None),
        )

    def to_bytes(self) -> bytes:
        """JSON (``opaque_state`` in base64): the handoff as the prefill worker sends it."""
        out: dict[str, Any] = {}
        for name in HANDOFF_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if name == "opaque_state":
                value = base64.b64encode(value).decode()
            out[name] = list(value) if isinstance(value, tuple) else value
        return json.dumps(out, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> TrtllmHandoff:
        """The inverse of :meth:`to_bytes`; ``ValueError`` for anything else."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or "first_gen_tokens" not in raw:
                raise ValueError("not a TensorRT-LLM handoff")
            unknown = set(raw) - set(HANDOFF_FIELDS)
            if unknown:
                raise ValueError(f"unknown fields {sorted(unknown)}")
            state = raw.get("opaque_state")
            draft = raw.get("draft_tokens")
            return cls(
                first_gen_tokens=tuple(int(t) for t in raw["first_gen_tokens"]),
                ctx_request_id=raw.get("ctx_request_id"),
                opaque_state=base64.b64decode(state) if state is not None else None,
                draft_tokens=tuple(int(t) for t in draft) if draft is not None else None,
                disagg_request_id=raw.get("disagg_request_id"),
                ctx_dp_rank=raw.get("ctx_dp_rank"),
                ctx_info_endpoint=raw.get("ctx_info_endpoint"),
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"trtllm: the remote prefill's handoff is unreadable: {exc}") from None

    def generation_kwargs(self) -> dict[str, Any]:
        """``DisaggregatedParams`` keyword arguments for the generation-only request (unset fields left out)."""
        out: dict[str, Any] = {"request_type": "generation_only", "first_gen_tokens": list(self.first_gen_tokens)}
        for name in HANDOFF_FIELDS[1:]:
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value) if isinstance(value, tuple) else value
        return out


HANDOFF_FIELDS = tuple(f.name for f in fields(TrtllmHandoff))
