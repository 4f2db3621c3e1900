"""Session fixtures: a real etcd and a real nats-server (JetStream on) on free loopback ports.

Tests that need servers take ``etcd_server`` / ``nats_server`` (shared by the
session; each test uses its own unique names) or the ``*_private`` variants,
which give a test its own server to stop and restart.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from commutator.common.local_servers import EtcdProcess, NatsProcess


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdProcess]:
    server = EtcdProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsProcess]:
    server = NatsProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def etcd_private() -> Iterator[EtcdProcess]:
    server = EtcdProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def nats_private() -> Iterator[NatsProcess]:
    server = NatsProcess()
    server.start()
    yield server
    server.close()


@pytest.fixture
def unique() -> str:
    """A short unique name for this test's namespaces, streams and buckets."""
    return "t" + uuid.uuid4().hex[:10]
