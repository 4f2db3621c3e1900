"""Mutual TLS between the roles (docs/security.md), with certificates made for the session: a worker's
gRPC server and its TCP worker stream serve a client with a certificate from the CA, and refuse, with a
clear error on the client's side and no harm to the server, a client with no certificate, one from
another CA, or one that expects another server name."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from commutator.common.discovery import Discovery, EtcdBackend, InstanceInfo
from commutator.common.errors import Unavailable
from commutator.common.grpc import EndpointClient, GrpcConfig, GrpcServer
from commutator.common.local_servers import EtcdProcess
from commutator.common.tls import MutualTls, load_tls
from commutator.engines.mocker.config import MockerConfig
from commutator.engines.mocker.engine import MockerEngine
from commutator.engines.mocker.tokens import token_at
from commutator.router.mux import WorkerMux
from commutator.router.tcp_call import TcpCall, open_worker_stream
from commutator.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from commutator.worker.servicer import WorkerServicer
from commutator.worker.tcp_stream import StreamServer

pytestmark = pytest.mark.integration

VOCAB = 1000


def _tls(pki: Any, role: str, server_name: str = "") -> MutualTls:
    tls = load_tls(pki.tls_config(role, server_name))
    assert tls is not None
    return tls


@pytest.fixture
async def worker(pki: Any, etcd_server: EtcdProcess, unique: str) -> AsyncIterator[tuple[Discovery, int]]:
    """A mocker worker serving gRPC and its TCP stream over mutual TLS, registered in ``unique``."""
    tls = _tls(pki, "server")
    engine = MockerEngine(MockerConfig(speedup_ratio=50.0, block_size=16, num_blocks=1024), vocab_size=VOCAB)
    await engine.start()
    servicer = WorkerServicer(engine, "w", lambda: 1, 0.002)
    server = GrpcServer(GrpcConfig(), tls=tls)
    server.add(worker_pb2_grpc.add_WorkerServicer_to_server, servicer, "commutator.v1.Worker")
    await server.start()
    stream = StreamServer(servicer, "127.0.0.1", 0, ssl=tls.server_ssl)
    await stream.start()
    d = Discovery(EtcdBackend([etcd_server.endpoint], lease_ttl_s=3))
    await d.start()
    info = InstanceInfo(address=server.address, role="decode", stream_port=stream.port)
    await d.register(unique, "decode", "generate", info)
    yield d, stream.port
    await stream.close()
    await server.stop()
    await engine.shutdown()
    await d.close()


async def _client(etcd: EtcdProcess, ns: str, tls: MutualTls | None) -> tuple[Discovery, EndpointClient[Any]]:
    d = Discovery(EtcdBackend([etcd.endpoint]))
    await d.start()
    c = EndpointClient(d, ns, "decode", "generate", worker_pb2_grpc.WorkerStub, default_timeout_s=5, tls=tls)
    await c.start()
    await c.wait_for_instances(1, timeout_s=10)
    return d, c


def _request(rid: str, max_tokens: int = 5) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        request_id=rid,
        token_ids=list(range(40)),
        sampling=common_pb2.SamplingOptions(seed=9),
        stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True),
    )


async def _generate(mux: WorkerMux, rid: str) -> list[int]:
    stream = mux.open(_request(rid), timeout_s=10)
    try:
        return [t async for m in stream for t in m.token_ids]
    finally:
        await stream.aclose()


async def test_grpc_and_the_worker_stream_over_mutual_tls(
    pki: Any, etcd_server: EtcdProcess, unique: str, worker
) -> None:  # type: ignore[no-untyped-def]
    for server_name in ("", "commutator.test"):  # the IP SAN of the address dialled, or one name for all
        d, client = await _client(etcd_server, unique, _tls(pki, "client", server_name))
        try:
            stats = await client.call("Stats", worker_pb2.StatsRequest())
            assert isinstance(stats, worker_pb2.StatsResponse)
            [wid] = client.instances
            for transport in ("tcp", "mux"):  # the TCP stream, and the same stream as a gRPC call
                mux = WorkerMux(lambda t=transport, c=client, w=wid: open_worker_stream(c, w, t))  # type: ignore[misc]
                try:
                    tokens = await _generate(mux, f"{transport}-{server_name}")
                finally:
                    await mux.close()
                assert tokens == [token_at(9, 40 + i, VOCAB) for i in range(5)]  # after the 40-token prompt
        finally:
            await client.close()
            await d.close()


def _credentials(pki: Any, cert: str | None, key: str | None) -> grpc.ChannelCredentials:
    def read(p: str | None) -> bytes | None:
        return open(p, "rb").read() if p else None

    return grpc.ssl_channel_credentials(read(pki.ca), read(key), read(cert))


async def test_grpc_refuses_clients_without_a_certificate_from_the_ca(
    pki: Any, etcd_server: EtcdProcess, unique: str, worker
) -> None:  # type: ignore[no-untyped-def]
    d, client = await _client(etcd_server, unique, _tls(pki, "client"))
    address = next(iter(client.instances.values())).info.address
    try:
        for cert, key in [(None, None), (pki.other_cert, pki.other_key)]:
            async with grpc.aio.secure_channel(address, _credentials(pki, cert, key)) as ch:
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(address) as ch:  # plaintext to a TLS port
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await worker_pb2_grpc.WorkerStub(ch).Stats(worker_pb2.StatsRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        # Through the typed client: a certificate for another name fails with Unavailable naming the peer.
        d2, wrong = await _client(etcd_server, unique, _tls(pki, "client", "not-this-server.test"))
        try:
            with pytest.raises(Unavailable, match=r"decode/generate/Stats@127\.0\.0\.1"):
                await wrong.call("Stats", worker_pb2.StatsRequest())
        finally:
            await wrong.close()
            await d2.close()
        # The server is unharmed: a good client is still served.
        assert isinstance(await client.call("Stats", worker_pb2.StatsRequest()), worker_pb2.StatsResponse)
    finally:
        await client.close()
        await d.close()


class _Tls:
    """A :class:`MutualTls` stand-in for a client whose SSL context the test builds itself."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.client_ssl = ctx

    def server_hostname(self, host: str) -> str:
        return host


def _client_ctx(pki: Any, cert: str | None, key: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


async def test_the_worker_stream_refuses_clients_without_a_certificate_from_the_ca(
    pki: Any, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    _, port = worker
    address = f"127.0.0.1:{port}"
    caplog.set_level(logging.WARNING, logger="commutator.worker.tcp_stream")
    for cert, key in [(None, None), (pki.other_cert, pki.other_key)]:
        tls = _Tls(_client_ctx(pki, cert, key))
        mux = WorkerMux(lambda t=tls: (TcpCall(address, "stream", t), lambda: None, "stream"))  # type: ignore[misc, arg-type]
        try:
            with pytest.raises(Unavailable, match="stream: "):
                await asyncio.wait_for(_generate(mux, "refused"), 10)
        finally:
            await mux.close()
    handshakes = [r for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(handshakes) == 2, [r.getMessage() for r in caplog.records]
    # Plaintext to the TLS listener: the worker refuses it the same way, the client sees the connection end.
    mux = WorkerMux(lambda: (TcpCall(address, "stream", None), lambda: None, "stream"))
    try:
        with pytest.raises(Unavailable):
            await asyncio.wait_for(_generate(mux, "plain"), 10)
    finally:
        await mux.close()
    # A good client is still served.
    good = _tls(pki, "client")
    mux = WorkerMux(lambda: (TcpCall(address, "stream", good), lambda: None, "stream"))
    try:
        assert len(await _generate(mux, "good")) == 5
    finally:
        await mux.close()


async def test_a_worker_stream_server_with_a_certificate_for_another_name_is_refused(pki: Any, worker: Any) -> None:
    _, port = worker
    tls = _tls(pki, "client", "not-this-server.test")
    mux = WorkerMux(lambda: (TcpCall(f"127.0.0.1:{port}", "stream", tls), lambda: None, "stream"))
    try:
        with pytest.raises(Unavailable, match=r"cannot connect: .*certificate verify failed"):
            await asyncio.wait_for(_generate(mux, "wrong-name"), 10)
    finally:
        await mux.close()


class _Exporter:
    kv_bytes_per_block = 100

    def prefill_blocks(self, request_id: str) -> tuple[int, ...]:
        return (1, 2)

    async def kv_export(self, block_ids: Any) -> bytes:
        return b"".join(bytes([b]) * 100 for b in block_ids)


class _Importer:
    def __init__(self) -> None:
        self.data = b""

    async def kv_import(self, block_ids: Any, data: bytes) -> None:
        self.data += data


async def test_the_grpc_kv_transfer_over_mutual_tls(pki: Any) -> None:
    from commutator.v1 import kv_transfer_pb2_grpc
    from commutator.worker.disagg import Reservations
    from commutator.worker.kv_transfer import KvTransferConfig, KvTransferServicer, TransferError, make_transfer

    importer, reservations = _Importer(), Reservations(lambda _: None)
    server = GrpcServer(GrpcConfig(), tls=_tls(pki, "server"))
    server.add(
        kv_transfer_pb2_grpc.add_KvTransferServicer_to_server,
        KvTransferServicer(importer, reservations),  # type: ignore[arg-type]
        "commutator.v1.KvTransfer",
    )
    await server.start()
    dest = common_pb2.TransferDescriptor(
        kind=common_pb2.TransferDescriptor.KIND_GRPC, grpc_address=server.address, block_ids=[5, 6]
    )
    try:
        reservations.add("r", (5, 6))
        plain = make_transfer(KvTransferConfig(kv_transfer="grpc"))
        with pytest.raises(TransferError, match="UNAVAILABLE"):  # no certificate: refused
            await plain.send(_Exporter(), "r", 100, dest)  # type: ignore[arg-type]
        await plain.close()
        assert importer.data == b""
        transfer = make_transfer(KvTransferConfig(kv_transfer="grpc"), _tls(pki, "client"))
        assert await transfer.send(_Exporter(), "r", 100, dest) == 200  # type: ignore[arg-type]
        await transfer.close()
        assert importer.data == b"\x01" * 100 + b"\x02" * 100
    finally:
        await server.stop()
