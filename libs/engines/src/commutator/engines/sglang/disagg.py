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

The adapter exposes what the coming disaggregation work plugs into:

- :meth:`SglangEngine.bootstrap_address` on the prefill side says where its bootstrap
  server listens;
- :func:`new_bootstrap_room` makes the room both sides share;
- :meth:`SglangEngine.attach_rendezvous` (before ``generate``) makes the next
  ``generate`` of that request id carry the rendezvous, on either side.

Nothing here starts or wires a prefill service.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["SglangRendezvous", "new_bootstrap_room"]


@dataclass(frozen=True, slots=True)
class SglangRendezvous:
    """Where the prefill engine's bootstrap server is, and the room that names this transfer."""

    host: str
    port: int
    room: int


def new_bootstrap_room(rng: random.Random | None = None) -> int:
    """A fresh room id: 63 random bits (rooms are integers; collisions between live transfers must not happen)."""
    return (rng or random.SystemRandom()).getrandbits(63)
