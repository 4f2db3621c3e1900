"""SGLang's disaggregation handoff: a rendezvous on a bootstrap room (DESIGN.md 2, *rendezvous* engines).

SGLang splits prefill and decode across two engines started with
``--disaggregation-mode prefill`` and ``--disaggregation-mode decode`` (and a KV
transfer backend, ``--disaggregation-transfer-backend mooncake|nixl``). A request is
sent to both, each with the same ``bootstrap_host``/``bootstrap_port`` (the prefill
engine's bootstrap server: its host and ``--disaggregation-bootstrap-port``, 8998
by default) and the same ``bootstrap_room`` (an integer naming the transfer); the
prefill engine computes the prompt's KV and the decode engine pulls it into its own
pages, then decodes. (``Engine.async_generate`` arguments ``bootstrap_host``,
``bootstrap_port``, ``bootstrap_room``; ``ServerArgs.disaggregation_mode`` /
``disaggregation_bootstrap_port``; checked at sglang 001067f.)

The adapter is a *rendezvous* engine of the handoff (``Engine.kv_handoff``):

- on the prefill side, :meth:`SglangEngine.start_handoff` makes a fresh room
  (:func:`new_bootstrap_room`) at the engine's bootstrap server
  (:meth:`SglangEngine.bootstrap_address`: ``--host`` and
  ``--disaggregation-bootstrap-port``, so ``--host`` must be an address the decode
  machines reach), arms the request with it and returns it as JSON
  (:meth:`SglangRendezvous.to_bytes`); the prefill worker sends that back at once;
- on the decode side, a request with ``kv_import.engine_params`` carries the same
  rendezvous (:meth:`SglangEngine.attach_rendezvous` does it for a request id).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

__all__ = ["SglangRendezvous", "new_bootstrap_room"]


@dataclass(frozen=True, slots=True)
class SglangRendezvous:
    """Where the prefill engine's bootstrap server is, and the room that names this transfer."""

    host: str
    port: int
    room: int

    def to_bytes(self) -> bytes:
        return json.dumps({"host": self.host, "port": self.port, "room": self.room}).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> SglangRendezvous:
        """The inverse of :meth:`to_bytes`; ``ValueError`` for anything else."""
        try:
            raw = json.loads(data)
            return cls(str(raw["host"]), int(raw["port"]), int(raw["room"]))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"sglang: the remote prefill's rendezvous is unreadable: {exc!r}") from None


def new_bootstrap_room(rng: random.Random | None = None) -> int:
    """A fresh room id: 63 random bits (rooms are integers; collisions between live transfers must not happen)."""
    return (rng or random.SystemRandom()).getrandbits(63)
