"""The GPU check (issue 10): ``install`` puts the wheelhouse into the venv offline; ``run`` checks the
hf engine on CUDA and measures it through the embedded stack. See gpu_check.sh.

``run`` prints, for the tiny model: greedy parity of the hf engine with transformers' own
``generate`` (float32, token for token); the ``nixl`` KV transfer between two hf engines in this
process when the ``nixl`` package is installed here (prefill on A, a real NIXL WRITE into blocks
reserved on B, B decodes: its tokens must equal A's alone), or that this check was skipped when it
is not; then through the embedded stack (in-memory discovery and events, the frontend's HTTP API,
the official openai client): TTFT p50/p99 and output tokens/s at concurrency 1 and 8, in float32
and bfloat16.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Brought by the machine's torch/transformers stack: used as they are there, installed only when missing.
MACHINE_STACK = {
    "numpy", "tokenizers", "safetensors", "huggingface-hub", "hf-xet", "jinja2", "markupsafe", "filelock",
    "fsspec", "pyyaml", "packaging", "tqdm", "typing-extensions", "click",
}  # fmt: skip


def install(wheelhouse: Path) -> None:
    wanted = []
    for line in (wheelhouse / "requirements-gpu.txt").read_text().split():
        name = re.split(r"==", line)[0].lower()
        if name in MACHINE_STACK:
            try:
                importlib.metadata.version(name)
                continue
            except importlib.metadata.PackageNotFoundError:
                pass
        wanted.append(line)
    ours = [str(p) for p in sorted(wheelhouse.glob("commutator_*.whl"))]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheelhouse), "--no-deps"]
    subprocess.run([*cmd, *wanted, *ours], check=True)
    print(f"installed {len(wanted)} dependencies and {len(ours)} Commutator packages from {wheelhouse}")


def parity(device: str) -> None:
    import torch
    from commutator.engines.base import EngineRequest, SamplingParams, StopParams
    from commutator.engines.registry import EngineSpec, make_engine
    from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model
    from transformers import AutoModelForCausalLM

    path = ensure_tiny_model()
    prompts = [[(7 * i + 13 * k) % 4000 + 10 for i in range(n)] for k, n in enumerate((17, 64, 203))]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    want = []
    for p in prompts:
        with torch.no_grad():
            out = ref.generate(torch.tensor([p], device=device), max_new_tokens=32, do_sample=False)
        want.append(out[0, len(p) :].tolist())

    async def ours() -> list[list[int]]:
        engine = make_engine("hf", EngineSpec(path, MODEL_NAME, ("--device", device, "--dtype", "float32")))
        await engine.start()
        try:

            async def one(i: int, p: list[int]) -> list[int]:
                req = EngineRequest(f"p{i}", p, SamplingParams(), StopParams(max_tokens=32, ignore_eos=True))
                return [t async for o in engine.generate(req) for t in o.token_ids]

            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            await engine.shutdown()

    got = asyncio.run(ours())
    same = sum(g == w for g, w in zip(got, want, strict=True))
    print(f"greedy parity with transformers.generate on {device} (float32, 3 prompts batched): {same}/3 identical")
    if same != len(prompts):
        raise SystemExit("greedy outputs differ from transformers")


def nixl_check(device: str) -> bool:
    """The nixl KV transfer with the real package, if it is installed here; False if it ran and failed."""
    try:
        import nixl._api  # noqa: F401
    except ImportError as exc:
        reason = (str(exc) or type(exc).__name__).strip().splitlines()[0]
        print(f"NIXL check skipped: the nixl package is not installed here ({reason})")
        return True
    from commutator.worker.kv_transfer import KvTransferConfig, make_transfer

    version = "?"
    for dist in ("nixl", "nixl-cu12", "nixl-cu13"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    config = KvTransferConfig(kv_transfer="nixl", nixl_timeout_s=30.0)
    try:
        same, total = asyncio.run(nixl_round_trip(device, lambda: make_transfer(config)))
    except Exception as exc:
        print(f"NIXL check FAILED on {device} (nixl {version}): {type(exc).__name__}: {exc}")
        return False
    print(
        f"NIXL KV transfer between two hf engines on {device} (nixl {version}, UCX): {same}/{total} decoded identically"
    )
    return same == total


async def nixl_round_trip(device: str, transfer: Callable[[], Any]) -> tuple[int, int]:
    """Prefill on engine A, NIXL WRITE into blocks reserved on engine B, decode on B: (identical, prompts).

    ``transfer()`` builds a :class:`~commutator.worker.kv_transfer.TransferBackend` (the real ``nixl`` one
    here; a fake of NIXL's agent gives a CPU dry run of this function).
    """
    from commutator.engines.base import EngineRequest, KvImport, StopParams
    from commutator.engines.registry import EngineSpec, make_engine
    from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model

    path = ensure_tiny_model()
    args = ("--device", device, "--dtype", "float32", "--block-size", "16", "--num-blocks", "64")
    a = make_engine("hf", EngineSpec(path, MODEL_NAME, args))
    b = make_engine("hf", EngineSpec(path, MODEL_NAME, args))
    sender, receiver = transfer(), transfer()
    sender.check_engine(a, "prefill")
    receiver.check_engine(b, "decode")
    await a.start()
    await b.start()

    async def tokens(engine: Any, request: EngineRequest) -> list[int]:
        return [t async for o in engine.generate(request) for t in o.token_ids]

    same = 0
    prompts = [[(11 * i + 17 * k) % 4000 + 10 for i in range(n)] for k, n in enumerate((37, 130, 203))]
    try:
        await sender.start(a)
        await receiver.start(b)
        for k, p in enumerate(prompts):
            rid, stop = f"nixl-{k}", StopParams(max_tokens=24, ignore_eos=True)
            alone = await tokens(a, EngineRequest(f"alone-{k}", p, stop=stop))
            first = await tokens(a, EngineRequest(rid, p, stop=stop, prefill_only=True))
            request = EngineRequest(rid, p, stop=stop, kv_import=KvImport(first_token_id=first[0]))
            reserved = b.reserve_import(request)  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            moved = await sender.send(a, rid, len(p), receiver.descriptor("", reserved))
            write_ms = (time.perf_counter() - t0) * 1000
            notified = rid in receiver.drain_notifications()  # informative: nothing waits for it (see nixl_transfer)
            a.release_prefill(rid)  # type: ignore[attr-defined]
            decoded = await tokens(b, dataclasses.replace(request, kv_import=KvImport(first[0], reserved)))
            same += decoded == alone
            print(
                f"  prompt of {len(p)} tokens: {len(reserved)} blocks, {moved} bytes written in {write_ms:.2f} ms, "
                f"NIXL notification on B {'arrived' if notified else 'not yet there'}, "
                f"decoded on B {'identical to' if decoded == alone else 'DIFFERENT from'} A alone"
            )
    finally:
        await sender.close()
        await receiver.close()
        await a.shutdown()
        await b.shutdown()
    return same, len(prompts)


async def stack(device: str, dtype: str) -> None:
    import openai
    from commutator.common.discovery import DiscoveryConfig, MemoryStore
    from commutator.common.events import EventPlaneConfig, MemoryBroker
    from commutator.common.grpc import GrpcConfig
    from commutator.common.local_servers import free_port
    from commutator.common.runtime import RuntimeConfig
    from commutator.decode.config import DecodeConfig, WorkerConfig
    from commutator.decode.worker import DecodeWorker
    from commutator.engines.tiny_model import MODEL_NAME, ensure_tiny_model
    from commutator.frontend.config import FrontendConfig
    from commutator.frontend.server import Frontend

    store, broker = MemoryStore(), MemoryBroker()
    runtime = RuntimeConfig(
        discovery=DiscoveryConfig(discovery_backend="memory"),
        events=EventPlaneConfig(event_plane="memory"),
        metrics_port=-1,
    )
    worker = DecodeWorker(
        DecodeConfig(
            runtime=runtime,
            grpc=GrpcConfig(),
            worker=WorkerConfig(
                engine="hf",
                engine_args=f"--device {device} --dtype {dtype}",
                model_path=str(ensure_tiny_model()),
                model_name=MODEL_NAME,
            ),
        ),
        memory_store=store,
        memory_broker=broker,
    )
    port = free_port()
    frontend = Frontend(
        FrontendConfig(runtime=runtime, http_host="127.0.0.1", http_port=port), memory_store=store, memory_broker=broker
    )
    await worker.start()
    await frontend.start()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    try:
        for conc, n in ((1, 16), (8, 64)):
            prompts = [[(31 * i + 7 * k + conc) % 4000 + 10 for i in range(200)] for k in range(n + 1)]
            await measure(client, MODEL_NAME, prompts[:1], 1)  # warm-up
            ttfts, tokens_per_s = await measure(client, MODEL_NAME, prompts[1:], conc)
            p50, p99 = statistics.median(ttfts) * 1000, ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000
            print(
                f"stack, hf on {device} {dtype}, c={conc}: {n} requests, TTFT p50 {p50:.1f} ms p99 {p99:.1f} ms, "
                f"{tokens_per_s:.0f} output tok/s"
            )
    finally:
        await client.close()
        await frontend.drain()
        await worker.drain()


async def measure(client, model: str, prompts: list[list[int]], conc: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """Closed loop of ``conc`` clients over ``prompts``: sorted TTFTs (s) and output tokens/s."""
    ttfts: list[float] = []
    tokens = 0
    queue = list(prompts)

    async def one(p: list[int]) -> None:
        nonlocal tokens
        t0 = time.perf_counter()
        first = None
        stream = await client.completions.create(
            model=model,
            prompt=p,
            max_tokens=64,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
            if chunk.usage:
                tokens += chunk.usage.completion_tokens
        assert first is not None
        ttfts.append(first)

    async def client_loop() -> None:
        while queue:
            await one(queue.pop())

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(conc)))
    return sorted(ttfts), tokens / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ins = sub.add_parser("install")
    ins.add_argument("wheelhouse", type=Path)
    run = sub.add_parser("run")
    run.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.cmd == "install":
        install(args.wheelhouse)
        return 0
    import torch

    t0 = time.time()
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}, Python {sys.version.split()[0]}")
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: nothing checked")
            return 2
        print(f"device: {torch.cuda.get_device_name(0)}")
    parity(args.device)
    nixl_ok = nixl_check(args.device)
    for dtype in ("float32", "bfloat16"):
        asyncio.run(stack(args.device, dtype))
    print(f"GPU check done in {time.time() - t0:.0f} s")
    if not nixl_ok:
        print("the NIXL check failed (above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
