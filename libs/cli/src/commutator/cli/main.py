"""``commutator``: one command for the whole stack.

commutator up                  # embedded: one process, in-memory discovery and events
commutator up --distributed    # real etcd + nats-server, one process per role
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="commutator", description=__doc__.split("\n")[1].strip())
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="bring up the whole stack: OpenAI API, router, mocker workers")
    up.add_argument(
        "--distributed", action="store_true", help="real etcd and nats-server (started here), one process per role"
    )
    up.add_argument("--workers", type=int, default=2, help="decode workers (default 2)")
    up.add_argument(
        "--engine", default="mocker", help="engine of the workers: mocker, hf, vllm, sglang, trtllm (default mocker)"
    )
    up.add_argument("--engine-args", default="", help="arguments for the engine's own parser, one quoted string")
    up.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        help="prefill workers (disaggregated serving of long prompts; default 0)",
    )
    up.add_argument(
        "--kv-transfer",
        default="simulated",
        choices=("simulated", "grpc", "nixl"),
        help="how prefill workers move KV to decode workers (default simulated: the mocker's)",
    )
    up.add_argument("--http-port", type=int, default=8000, help="port of the OpenAI API (default 8000)")
    up.add_argument("--http-host", default="127.0.0.1", help="interface of the OpenAI API (default 127.0.0.1)")
    up.add_argument(
        "--speedup-ratio",
        type=float,
        default=1.0,
        help="mocker speed: simulated time divided by this; 0: no delays (default 1)",
    )
    up.add_argument("--router-mode", default="kv", help="kv, round-robin, random, least-loaded (default kv)")
    up.add_argument("--model-path", default="", help="model folder (default: the tiny test model)")
    up.add_argument("--namespace", default="commutator", help="discovery namespace (default commutator)")
    from commutator.cli import bench

    bench.add_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "up":
        from commutator.cli.up import up_main

        return up_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
