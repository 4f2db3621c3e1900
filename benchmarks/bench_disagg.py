"""Disaggregated serving with the mocker's timing model (issue 11): does inter-token latency stay
flat under long-prompt load, and where does conditional disaggregation beat always-remote?

Three stacks, each fresh, each on real etcd and NATS, workers at speed-up 1 with
``--context-length 32768``:

- ``aggregated``: 2 decode workers, every prompt prefilled where it decodes;
- ``conditional``: 1 decode + 1 prefill worker, prompts whose uncached part is over
  1,000 tokens prefilled remotely (the default ``--remote-prefill auto``);
- ``always-remote``: 1 decode + 1 prefill worker, every prompt prefilled remotely.

KV moves as an 8B model's in bf16 would (128 KiB per token) over a 25 Gb/s link
(the simulated transfer). Load: open loop, Poisson arrivals; each request is
long (a prompt length from benchmarks/traces/long_prompt.jsonl, halved and kept
within 4k-12k tokens) or short (256 tokens), 128 tokens out, every prompt unique.

Prints, per stack: TTFT p50/p99 of short and long requests, inter-token latency
p50/p99/p99.9 of short requests (the gaps between their streamed tokens) and the
share of those gaps over 50 ms, the share
of prompts prefilled remotely, and goodput (requests/s with TTFT <= 2 s and
time per output token <= 50 ms) and the CPU seconds of all the stack's processes
per request; writes docs/benchmarks/disagg.png.

``python benchmarks/bench_disagg.py [--rate 4] [--long-share 0.5] [--duration 60]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import urllib.request
from pathlib import Path

from commutator.cli.loadgen import RequestResult, run_open_loop, summarize
from commutator.cli.stacks import CommutatorStack, cpu_seconds
from commutator.cli.workloads import RequestSpec, _block_tokens
from commutator.engines.tiny_model import MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
SHORT, OUT = 256, 128
COMMON = ("--context-length", "32768", "--kv-bytes-per-token", "131072", "--transfer-bandwidth-gbps", "25")
STACKS = {
    "aggregated": {"workers": 2, "prefill_workers": 0, "worker_args": ("--remote-prefill", "never")},
    "conditional": {"workers": 1, "prefill_workers": 1, "worker_args": ("--remote-prefill", "auto")},
    "always-remote": {"workers": 1, "prefill_workers": 1, "worker_args": ("--remote-prefill", "always")},
}


def long_lengths() -> list[int]:
    rows = [json.loads(line) for line in (ROOT / "benchmarks/traces/long_prompt.jsonl").read_text().splitlines()]
    return [min(12_000, max(4_000, r["input_length"] // 2)) for r in rows]


def workload(rate: float, long_share: float, duration_s: float, seed: int = 7) -> list[RequestSpec]:
    rng = random.Random(seed)
    lengths = long_lengths()
    specs, t, k = [], 0.0, 0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return specs
        n = rng.choice(lengths) if rng.random() < long_share else SHORT
        k += 1
        body = {
            "prompt": _block_tokens(90_000_000 + k, n, salt=seed),
            "max_tokens": OUT,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        specs.append(RequestSpec("/completions", body, at_s=t, prompt_tokens=n))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def prefill_counts(ports: list[int]) -> dict[str, float]:
    out = {"local": 0.0, "remote": 0.0, "fallback": 0.0}
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            for line in r.read().decode().splitlines():
                for kind in out:
                    if line.startswith(f'commutator_disagg_prefills_total{{where="{kind}"'):
                        out[kind] += float(line.rsplit(" ", 1)[1])
    return out


async def run_stack(name: str, specs: list[RequestSpec]) -> dict[str, float]:
    cfg = STACKS[name]
    stack = CommutatorStack(
        speedup=1.0,
        router_mode="kv",
        workers=cfg["workers"],  # type: ignore[arg-type]
        prefill_workers=cfg["prefill_workers"],  # type: ignore[arg-type]
        worker_args=(*cfg["worker_args"], *COMMON),  # type: ignore[misc]
        prefill_args=COMMON,
    )
    await stack.start()
    try:
        pids = [p.pid for p in stack.procs]
        before = prefill_counts(stack.metrics_ports["decode"])
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        results, wall = await run_open_loop(stack.base_url, MODEL_NAME, specs)
        cpu1 = sum(cpu_seconds(pid) for pid in pids)
        after = prefill_counts(stack.metrics_ports["decode"])
    finally:
        await stack.stop()
    out = figures(results, wall, {k: after[k] - before[k] for k in after})
    out["cpu_ms_per_request"] = (cpu1 - cpu0) * 1000 / max(1, len(results))
    return out


def figures(results: list[RequestResult], wall: float, counts: dict[str, float]) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    short = [r for r in ok if r.prompt_tokens == SHORT]
    long = [r for r in ok if r.prompt_tokens != SHORT]
    gaps = [g * 1000 for r in short for g in r.chunk_gaps_s]
    total = sum(counts.values()) or 1.0
    summary = summarize(results, wall, ttft_slo_ms=2000, itl_slo_ms=50)
    return {
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "ttft_short_p50": pct([r.ttft_s * 1000 for r in short if r.ttft_s], 0.5),
        "ttft_short_p99": pct([r.ttft_s * 1000 for r in short if r.ttft_s], 0.99),
        "ttft_long_p50": pct([r.ttft_s * 1000 for r in long if r.ttft_s], 0.5),
        "ttft_long_p99": pct([r.ttft_s * 1000 for r in long if r.ttft_s], 0.99),
        "itl_short_p50": statistics.median(gaps) if gaps else float("nan"),
        "itl_short_p99": pct(gaps, 0.99),
        "itl_short_p999": pct(gaps, 0.999),
        "gaps_over_sla": sum(1 for g in gaps if g > 50) / len(gaps) if gaps else float("nan"),
        "remote_share": counts["remote"] / total,
        "fallbacks": counts["fallback"],
        "goodput": summary.goodput_per_s or 0.0,
        "offered": len(results) / wall if wall else 0.0,
    }


def plot(rows: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    x = range(len(names))
    w = 0.27
    a.bar([i - w for i in x], [rows[n]["itl_short_p50"] for n in names], w, label="p50")
    a.bar(list(x), [rows[n]["itl_short_p99"] for n in names], w, label="p99")
    a.bar([i + w for i in x], [rows[n]["itl_short_p999"] for n in names], w, label="p99.9")
    a.axhline(50, color="grey", linestyle="--", linewidth=1, label="SLA 50 ms")
    a.set_xticks(list(x), names)
    a.set_ylabel("ms")
    a.set_title("Inter-token latency, short requests")
    a.legend()
    for key, label, off in (
        ("ttft_short_p99", "short p99", -1.5),
        ("ttft_long_p50", "long p50", -0.5),
        ("ttft_long_p99", "long p99", 0.5),
    ):
        b.bar([i + off * 0.25 for i in x], [rows[n][key] for n in names], 0.25, label=label)
    b.axhline(2000, color="grey", linestyle="--", linewidth=1, label="SLA 2 s")
    b.set_xticks(list(x), names)
    b.set_ylabel("ms")
    b.set_title("Time to first token")
    b.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    ap.add_argument("--long-share", type=float, default=0.5)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--stacks", default=",".join(STACKS))
    ap.add_argument("--plot", type=Path, default=ROOT / "docs/benchmarks/disagg.png")
    args = ap.parse_args()
    specs = workload(args.rate, args.long_share, args.duration)
    n_long = sum(1 for s in specs if s.prompt_tokens != SHORT)
    print(
        f"{len(specs)} requests over {args.duration:.0f} s ({args.rate}/s), {n_long} long (4k-12k tokens), "
        f"the rest {SHORT} tokens; {OUT} tokens out; mocker at speed-up 1; KV 128 KiB/token over 25 Gb/s"
    )
    rows = {}
    for name in args.stacks.split(","):
        rows[name] = await run_stack(name, specs)
        print(f"  {name}: done", flush=True)
    print(
        "| stack | TTFT short p50 / p99 | TTFT long p50 / p99 | ITL short p50 / p99 / p99.9 | short gaps > 50 ms | "
        "remote share | goodput (TTFT<=2 s, TPOT<=50 ms) | errors | server CPU per request |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['ttft_short_p50']:.0f} / {r['ttft_short_p99']:.0f} ms | "
            f"{r['ttft_long_p50']:.0f} / {r['ttft_long_p99']:.0f} ms | "
            f"{r['itl_short_p50']:.1f} / {r['itl_short_p99']:.1f} / {r['itl_short_p999']:.1f} ms | "
            f"{r['gaps_over_sla']:.2%} | {r['remote_share']:.0%} | "
            f"{r['goodput']:.2f} of {r['offered']:.2f} req/s | {r['errors']:.0f} | "
            f"{r['cpu_ms_per_request']:.0f} ms |"
        )
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    asyncio.run(main())
