"""The router service with mocker workers, all separate processes on real etcd and NATS."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest
from commutator.common.discovery import Discovery, EtcdBackend
from commutator.common.grpc import EndpointClient
from commutator.common.local_servers import EtcdProcess, free_port
from commutator.v1 import common_pb2, router_pb2, worker_pb2

pytestmark = pytest.mark.integration

BS = 16


def start_workers(spawn, n: int, *extra: str) -> list:  # type: ignore[no-untyped-def,type-arg]
    return [spawn("commutator.decode", "--speedup-ratio", "0", "--block-size", str(BS), *extra) for _ in range(n)]


def prompt(group: int, n_tokens: int = 160, suffix: int = 0) -> list[int]:
    base = [(group * 7919 + i * 31) % 4000 for i in range(n_tokens)]
    return base + [(suffix * 13 + k) % 4000 for k in range(1, 9)] if suffix else base


async def generate(client: EndpointClient, rid: str, tokens: list[int], max_tokens: int = 4, **kw: object) -> int:
    """A Generate stream through ``client`` (a router, or a worker directly)."""
    req = common_pb2.GenerateRequest(
        request_id=rid, token_ids=tokens, stop=common_pb2.StopConditions(max_tokens=max_tokens, ignore_eos=True)
    )
    n = 0
    async for m in client.stream("Generate", req, **kw):  # type: ignore[arg-type]
        n += len(m.token_ids)
    return n


async def overlap(routers: EndpointClient, tokens: list[int], **kw: object) -> dict[int, int]:
    resp = await routers.call("Overlap", router_pb2.OverlapRequest(token_ids=tokens), **kw)  # type: ignore[arg-type]
    return {w.worker_id: w.overlap_blocks for w in resp.workers}


async def router_sees(routers: EndpointClient, workers: EndpointClient, n: int, timeout_s: float = 60.0) -> None:
    """Wait until every router replica knows ``n`` workers (its own discovery watch may lag the test's)."""
    await workers.wait_for_instances(n, timeout_s)

    async def knows_all() -> bool:
        for rid in routers.instances:
            for wid in workers.instances:
                r = await routers.call("Route", router_pb2.RouteRequest(token_ids=[1], worker_id=wid), instance_id=rid)
                if r.outcome != router_pb2.ROUTE_OUTCOME_ROUTED:
                    return False
        return True

    await until(knows_all, timeout_s)


async def until(pred, timeout_s: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if await pred():
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def dump(routers: EndpointClient, **kw: object) -> dict[tuple[int, int], tuple[int, list[tuple[int, int]]]]:
    out = {}
    async for batch in routers.stream("Dump", router_pb2.DumpRequest(), **kw):  # type: ignore[arg-type]
        for ev in batch.events:
            out[(ev.worker_id, ev.dp_rank)] = (
                ev.event_id,
                sorted((b.block_hash, b.sequence_hash) for b in ev.stored.blocks),
            )
    return out


async def test_repeated_prefix_lands_on_the_worker_that_cached_it(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    start_workers(spawn, 3)
    spawn("commutator.router")
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 3)
    # Each group's first request goes straight to a chosen worker (routed, idle workers tie and one is
    # picked at random), so every worker owns two groups; the router learns that from the KV events alone.
    ids = sorted(workers.instances)
    owner = {group: ids[group % 3] for group in range(6)}
    for group in range(6):
        assert await generate(workers, f"g{group}-0", prompt(group, suffix=1), instance_id=owner[group]) == 4
        await until(lambda g=group: _has_full(routers, prompt(g)))
        assert await overlap(routers, prompt(group)) == {owner[group]: 160 // BS}
    assert await generate(routers, "via-router", prompt(0, suffix=5)) == 4  # the router's Generate proxy
    for group in range(6):
        for suffix in (2, 3, 4):
            r = await routers.call("Route", router_pb2.RouteRequest(token_ids=prompt(group, suffix=suffix)))
            assert r.outcome == router_pb2.ROUTE_OUTCOME_ROUTED
            assert (r.worker_id, r.overlap_blocks) == (owner[group], 160 // BS)


async def _has_full(routers: EndpointClient, tokens: list[int]) -> bool:
    return any(n == len(tokens) // BS for n in (await overlap(routers, tokens)).values())


async def test_restarted_router_recovers_an_identical_index(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    start_workers(spawn, 2, "--num-blocks", "64")  # small caches: stores and evictions
    router = spawn("commutator.router", "--snapshot-interval-s", "1")
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 2)
    for i in range(20):
        await generate(routers, f"a{i}", prompt(i, n_tokens=96), max_tokens=20)
    await asyncio.sleep(2.5)  # at least one snapshot covers these
    for i in range(20, 30):  # and these come after it: replayed from the stream
        await generate(routers, f"b{i}", prompt(i, n_tokens=96), max_tokens=20)
    await until(lambda: caught_up(routers, workers))
    before = await dump(routers)
    assert sum(len(pairs) for _, pairs in before.values()) > 0
    old_id = next(iter(routers.instances))
    router.signal(signal.SIGKILL)
    await routers.instance_set.wait_for(lambda m: old_id not in m, 10)  # lease 5 s
    spawn("commutator.router", "--snapshot-interval-s", "1")
    await routers.wait_for_instances(1, 60)
    after = await dump(routers)
    assert after == before
    log = (router.log_path.parent / "commutator.router-3.log").read_text()
    assert "KV index ready: snapshot seq " in log and "KV index ready: snapshot seq 0 " not in log


async def test_replica_sync_shows_each_router_the_others_load(spawn, clients, router_metric) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    start_workers(spawn, 4)
    port_a, port_b = free_port(), free_port()
    spawn("commutator.router", "--router-replica-sync", "--metrics-port", str(port_a))
    await routers.wait_for_instances(1, 60)
    [router_a] = routers.instances
    spawn("commutator.router", "--router-replica-sync", "--metrics-port", str(port_b))
    await routers.wait_for_instances(2, 60)
    [router_b] = [r for r in routers.instances if r != router_a]
    await router_sees(routers, workers, 4)
    ids = sorted(workers.instances)
    # Router A puts three requests on each of three workers and leaves the fourth idle.
    for w in ids[:3]:
        for k in range(3):
            req = router_pb2.RouteRequest(
                request_id=f"a-{w:x}-{k}", token_ids=prompt(600 + k), track_load=True, worker_id=w
            )
            r = await routers.call("Route", req, instance_id=router_a)
            assert r.worker_id == w
    received = 'commutator_router_replica_events_total{direction="received"}'
    await until(lambda: _at_least(router_metric, port_b, received, 9), 15)
    # Router B sees that load: its next three (distinct prompts, no cache) all go to the idle worker.
    # Alone, B would spread them over the workers it thinks idle (it only knows its own requests).
    chosen = []
    for j in range(3):
        req = router_pb2.RouteRequest(request_id=f"b{j}", token_ids=prompt(700 + j), track_load=True)
        chosen.append((await routers.call("Route", req, instance_id=router_b)).worker_id)
    assert chosen == [ids[3]] * 3, (chosen, ids)


async def _at_least(router_metric, port: int, series: str, n: float) -> bool:  # type: ignore[no-untyped-def]
    return await router_metric(port, series) >= n


async def test_killed_worker_leaves_the_index_and_gets_no_requests(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    procs = start_workers(spawn, 2, "--lease-ttl-s", "2")
    spawn("commutator.router")
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 2)
    ids = sorted(workers.instances)
    for i in range(8):  # half on each worker (routed, idle workers tie and one is picked at random)
        await generate(workers, f"w{i}", prompt(200 + i), instance_id=ids[i % 2])
    await until(lambda: _index_workers(routers, 2))
    procs[0].signal(signal.SIGKILL)
    await workers.instance_set.wait_for(lambda m: len(m) == 1, 10)
    survivor = next(iter(workers.instances))
    victim = next(i for i in ids if i != survivor)

    async def victim_gone() -> bool:  # the router's own discovery watch may see the lease end a moment later
        return victim not in {k[0] for k in await dump(routers)}

    await until(victim_gone, 5)
    picks: Counter[int] = Counter()
    for i in range(20):
        r = await routers.call("Route", router_pb2.RouteRequest(token_ids=prompt(200 + i % 8)))
        picks[r.worker_id] += 1
    assert picks == {survivor: 20}
    for g in range(8):
        assert victim not in await overlap(routers, prompt(200 + g))


async def caught_up(routers: EndpointClient, workers: EndpointClient) -> bool:
    """The router has applied every KV event that the workers have published so far."""
    applied = {key: event_id for key, (event_id, _) in (await dump(routers)).items()}
    for wid in workers.instances:
        truth = await workers.call("DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=wid)
        if any(applied.get((wid, w.dp_rank)) != w.next_event_id - 1 for w in truth.watermarks):
            return False
    return True


async def _index_workers(routers: EndpointClient, n: int) -> bool:
    return len(await dump(routers)) >= n


async def test_lost_events_are_recovered_from_the_workers_cache_state(spawn, clients, nats_server, unique) -> None:  # type: ignore[no-untyped-def]
    from commutator.common import subjects
    from commutator.common.events import NatsEventPlane

    routers, workers = clients
    start_workers(spawn, 1)
    await workers.wait_for_instances(1, 60)
    [wid] = workers.instances
    for i in range(5):  # straight to the worker: no router runs yet
        await generate(workers, f"early{i}", prompt(300 + i), max_tokens=20)
    # The events of that traffic are lost: purged before any router read them.
    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    stream = subjects.kv_events_stream(unique, "decode")
    await asyncio.sleep(0.5)
    await plane.purge(stream, before_seq=(await plane.stream_state(stream)).last_seq + 1)
    await plane.close()
    await generate(workers, "late", prompt(400), max_tokens=20)
    spawn("commutator.router")
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 1)
    truth = await workers.call("DumpKvState", worker_pb2.DumpKvStateRequest(), instance_id=wid)
    want = sorted((b.block_hash, b.sequence_hash) for ev in truth.events for b in ev.stored.blocks)
    assert len(want) >= 6 * 10

    async def recovered() -> bool:
        got = (await dump(routers)).get((wid, 0))
        return got is not None and got[1] == want

    await until(recovered)
    for i in range(5):  # the lost history is routable again
        holders = await overlap(routers, prompt(300 + i))
        assert holders == {wid: 160 // BS}


async def test_a_dead_worker_is_excluded_at_once_and_its_requests_routed_elsewhere(spawn, clients) -> None:  # type: ignore[no-untyped-def]
    routers, workers = clients
    # The victim holds its registration for 60 s after it dies: only the router's own reaction can help.
    victim_proc = spawn("commutator.decode", "--speedup-ratio", "0", "--block-size", str(BS), "--lease-ttl-s", "60")
    await workers.wait_for_instances(1, 60)
    [victim] = workers.instances
    start_workers(spawn, 2)
    spawn("commutator.router")
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 3)
    # The victim caches the prefix every later request shares, so the kv router prefers it.
    assert await generate(workers, "warm", prompt(500, suffix=1), instance_id=victim) == 4
    await until(lambda: _has_full(routers, prompt(500)))
    r = await routers.call("Route", router_pb2.RouteRequest(token_ids=prompt(500, suffix=2)))
    assert r.worker_id == victim
    victim_proc.signal(signal.SIGKILL)
    await asyncio.to_thread(victim_proc.proc.wait)
    for i in range(12):  # every one of these would have gone to the dead worker
        assert await generate(routers, f"after{i}", prompt(500, suffix=10 + i)) == 4
    assert victim in workers.instances  # still registered: its lease has not expired
    r = await routers.call("Route", router_pb2.RouteRequest(token_ids=prompt(500, suffix=2)))
    assert r.outcome == router_pb2.ROUTE_OUTCOME_ROUTED and r.worker_id != victim


async def test_an_inhibited_worker_is_routed_to_again_once_its_health_check_answers(
    spawn, etcd_server: EtcdProcess, unique: str
) -> None:  # type: ignore[no-untyped-def]
    from commutator.router.config import RouterConfig
    from commutator.router.core import Router

    worker = spawn("commutator.decode", "--speedup-ratio", "0", "--block-size", str(BS))
    d = Discovery(EtcdBackend([etcd_server.endpoint]))
    await d.start()
    router = Router(RouterConfig(router_mode="round-robin", health_probe_interval_s=0.2), d, None, unique)
    await router.start()
    try:
        await router.workers.wait_for_instances(1, 60)
        [wid] = router.workers.instances
        router.inhibit(wid, "a test says so")
        assert router.route("", [1, 2, 3]).outcome.value == "no_workers"  # nothing else to route to
        # It is alive, so its health check answers and it is routed to again.
        await until(lambda: asyncio.sleep(0, result=wid not in router.scheduler.inhibited), 10)
        assert router.route("", [1, 2, 3]).worker.key == (wid, 0)  # type: ignore[union-attr]
        # Inhibited again, then gone from discovery: forgotten, probe and all.
        router.inhibit(wid, "again")
        worker.signal(signal.SIGTERM)
        await router.workers.instance_set.wait_for(lambda m: wid not in m, 30)
        assert wid not in router.scheduler.inhibited and not router._probes
    finally:
        await router.close()
        await d.close()


async def test_a_dead_routers_consumer_holds_back_no_purge_and_a_drained_one_deletes_its_own(
    spawn, clients, nats_server, unique
) -> None:  # type: ignore[no-untyped-def]
    from commutator.common import subjects
    from commutator.common.events import NatsEventPlane

    routers, workers = clients
    start_workers(spawn, 1)
    dead = spawn("commutator.router", "--snapshot-interval-s", "1")
    await routers.wait_for_instances(1, 60)
    [dead_id] = routers.instances
    await router_sees(routers, workers, 1)
    for i in range(5):
        await generate(routers, f"before{i}", prompt(800 + i), max_tokens=20)
    await until(lambda: caught_up(routers, workers))
    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    stream = subjects.kv_events_stream(unique, "decode")
    dead_floor = (await plane.consumer_ack_floors(stream))[f"router-{dead_id:x}"]
    assert dead_floor > 0
    dead.signal(signal.SIGKILL)
    await routers.instance_set.wait_for(lambda m: dead_id not in m, 15)
    live = spawn("commutator.router", "--snapshot-interval-s", "1")
    await routers.wait_for_instances(1, 60)
    [live_id] = routers.instances
    await router_sees(routers, workers, 1)
    for i in range(5):
        await generate(routers, f"after{i}", prompt(900 + i), max_tokens=20)
    # The live router's snapshots purge past what the dead one consumed (its consumer still exists).
    assert f"router-{dead_id:x}" in await plane.consumer_ack_floors(stream)

    async def purged_past_the_dead_floor() -> bool:
        return (await plane.stream_state(stream)).first_seq > dead_floor + 1

    await until(purged_past_the_dead_floor, 20)
    # A router that drains deletes its consumer: nothing waits for it.
    assert f"router-{live_id:x}" in await plane.consumer_ack_floors(stream)
    live.signal(signal.SIGTERM)
    assert await live.wait(30) == 0
    assert f"router-{live_id:x}" not in await plane.consumer_ack_floors(stream)
    await plane.close()


async def test_the_kv_stream_is_bounded_by_the_index_it_feeds(spawn, clients, nats_server, unique) -> None:  # type: ignore[no-untyped-def]
    from commutator.common import subjects
    from commutator.common.events import NatsEventPlane

    routers, workers = clients
    start_workers(spawn, 1, "--num-blocks", "65536")
    await workers.wait_for_instances(1, 60)
    plane = NatsEventPlane(nats_server.url)
    await plane.connect()
    stream = subjects.kv_events_stream(unique, "decode")
    # A worker creates the stream sized for its own cache ...
    assert (await plane.stream_state(stream)).max_bytes == subjects.kv_stream_max_bytes(65536)
    start_workers(spawn, 1, "--num-blocks", "65536")
    spawn("commutator.router")
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 2)

    # ... and a router sizes it to the whole index (both workers' caches).
    async def sized() -> bool:
        return (await plane.stream_state(stream)).max_bytes == subjects.kv_stream_max_bytes(2 * 65536)

    await until(sized, 15)
    await plane.close()


async def test_adaptive_routing_measures_its_arms_and_confirms_the_index(spawn, clients, router_metric) -> None:  # type: ignore[no-untyped-def]
    """--router-adaptive on a real router service: every request's first token is an observation of
    its arm, and the workers' cached tokens confirm what the index predicted."""
    routers, workers = clients
    start_workers(spawn, 2)
    port = free_port()
    spawn(
        "commutator.router",
        "--router-adaptive",
        "--adaptive-weights",
        "0.5,2",
        "--adaptive-explore",
        "0.5",
        "--metrics-port",
        str(port),
    )
    await routers.wait_for_instances(1, 60)
    await router_sees(routers, workers, 2)
    for group in range(4):  # each group's prefix is cached somewhere by its first request
        assert await generate(routers, f"a{group}-0", prompt(group, suffix=1)) == 4
        await until(lambda g=group: _has_full(routers, prompt(g)))
    for i in range(40):
        assert await generate(routers, f"a{i % 4}-{i + 1}", prompt(i % 4, suffix=i + 2)) == 4
    weight = await router_metric(port, 'commutator_router_adaptive{kind="overlap_weight"}')
    accuracy = await router_metric(port, 'commutator_router_adaptive{kind="index_accuracy"}')
    assert weight in (0.5, 2.0)  # an arm's weight, the index fully trusted
    decode_weight = await router_metric(port, 'commutator_router_adaptive{kind="decode_weight"}')
    assert decode_weight in (1.0, 0.5, 0.25)  # --adaptive-decode-weights' default arms
    overlap = await router_metric(port, 'commutator_router_prompt_blocks_total{kind="overlap"}')
    assert overlap >= 40 * (160 // BS - 1)  # the index predicted hits for the repeats...
    assert accuracy == 1.0  # ...and every one was a hit: one request at a time, the index up to date
