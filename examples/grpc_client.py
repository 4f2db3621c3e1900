"""Call Commutator's router service over gRPC: a token-level client, as a program of your own would.

    python examples/grpc_client.py localhost:50051
    python examples/grpc_client.py localhost:50051 --model tiny-llama --tokens 1,2,3,4 --max-tokens 16

The router service (``python -m commutator.router``; the ``router`` service of docker/compose.yaml
publishes it on port 50051) serves token-level clients directly; text in, text out is the frontend's
job. Two calls:

- ``Router.Route`` picks the worker for a prompt (the one with most of it cached, counting load) and
  returns it without sending the request anywhere: for clients that stream from workers themselves.
- ``Router.Generate`` routes the request and proxies the chosen worker's token stream; the router's
  load accounting follows the stream. Each message carries the tokens produced since the previous one,
  and the last one a finish reason.

Needs only ``grpcio`` and the generated ``commutator.v1`` stubs (``pip install`` Commutator's
``commutator-common``, or ``make setup`` in a checkout). Copy this file and change the request.
The router's errors arrive as gRPC status codes: UNAVAILABLE (no worker could be reached),
INVALID_ARGUMENT (a bad request), DEADLINE_EXCEEDED (the deadline below).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

import grpc
from commutator.v1 import common_pb2, router_pb2, router_pb2_grpc

DEADLINE_S = 60.0


async def route(stub: router_pb2_grpc.RouterStub, model: str, token_ids: list[int]) -> router_pb2.RouteResponse:
    """Which worker the router would send this prompt to (nothing is generated)."""
    request = router_pb2.RouteRequest(request_id=uuid.uuid4().hex, model=model, token_ids=token_ids)
    return await stub.Route(request, timeout=DEADLINE_S)


async def generate(
    stub: router_pb2_grpc.RouterStub, model: str, token_ids: list[int], max_tokens: int
) -> tuple[list[int], common_pb2.FinishReason.ValueType]:
    """Generate up to ``max_tokens`` tokens after ``token_ids``: (the tokens, the finish reason)."""
    request = common_pb2.GenerateRequest(
        request_id=uuid.uuid4().hex,
        model=model,
        token_ids=token_ids,
        sampling=common_pb2.SamplingOptions(temperature=0.0),
        stop=common_pb2.StopConditions(max_tokens=max_tokens),
    )
    tokens: list[int] = []
    finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
    async for response in stub.Generate(request, timeout=DEADLINE_S):
        tokens.extend(response.token_ids)
        if response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            finish = response.finish_reason
            if finish == common_pb2.FINISH_REASON_ERROR:
                raise RuntimeError(f"the engine failed the request: {response.error_message}")
    return tokens, finish


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("address", help="the router service, host:port (compose: localhost:50051)")
    parser.add_argument(
        "--model", default="commutator/tiny-llama", help="model name the workers serve (default: %(default)s)"
    )
    parser.add_argument("--tokens", default="1,17,42,99,7,256,31", help="prompt token ids, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens to generate (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        token_ids = [int(t) for t in args.tokens.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--tokens: expected comma-separated integers, got {args.tokens!r}")

    async with grpc.aio.insecure_channel(args.address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        try:
            decision = await route(stub, args.model, token_ids)
            outcome = router_pb2.RouteOutcome.Name(decision.outcome)
            if decision.outcome != router_pb2.ROUTE_OUTCOME_ROUTED:
                print(f"route: {outcome} (no worker serves {args.model!r}, or all are busy)", file=sys.stderr)
                return 1
            print(
                f"route: {outcome} worker={decision.worker_id:x} address={decision.address} "
                f"overlap_blocks={decision.overlap_blocks}"
            )
            tokens, finish = await generate(stub, args.model, token_ids, args.max_tokens)
        except grpc.aio.AioRpcError as exc:
            print(f"{args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    print(f"generate: {len(tokens)} tokens, finish={common_pb2.FinishReason.Name(finish)}: {tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
