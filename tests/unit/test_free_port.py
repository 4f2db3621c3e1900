"""free_port: a port for a server started next, out of the kernel's reach meanwhile."""

from __future__ import annotations

import socket

import pytest
from commutator.common.local_servers import _ephemeral_low, free_port

pytestmark = pytest.mark.unit


def test_free_ports_are_bindable_and_below_the_range_the_kernel_hands_out() -> None:
    low = _ephemeral_low()
    ports = {free_port() for _ in range(20)}
    if low > 11_000:  # where there is room below it (Linux's default range starts at 32768)
        assert all(10_000 <= p < low for p in ports)
    for p in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))  # free: nothing was left bound to it
    with socket.socket() as s:  # a bind to port 0 never lands there
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] >= low
