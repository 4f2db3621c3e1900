"""The figures of ``bench compare`` as markdown, from ``compare.json``: a table per scenario, ratios
(ours / theirs, paired within each repetition), CPU per request of every process, the two-client
table, and the plots.

The page holds figures and the settings that produced them; the method and the reading of the
figures are in the prose of docs/benchmarks.md, around the region this fills (``splice``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from commutator.cli import report
from commutator.cli.compare_stats import (
    Getter,
    RunRecord,
    cell,
    cpu_budget,
    cpu_getter,
    errors,
    get,
    latency,
    med,
    num,
    ratio_cell,
    rps,
    sse_events_per_req,
)
from commutator.cli.loadgen import RequestResult

__all__ = ["BEGIN", "END", "one_line", "page", "plots", "splice"]

SYSTEMS = ("commutator", "dynamo")
BEGIN = "<!-- figures: begin (written by make bench-compare; edits here are overwritten) -->"
END = "<!-- figures: end -->"
Col = tuple[str, Getter, int]  # header, getter, digits

FE_MS = cpu_getter("kinds", "frontend", "ms_per_req")
FE_PCT = cpu_getter("kinds", "frontend", "pct_core")
WORKERS_MS = cpu_getter("kinds", "worker", "ms_per_req")
INFRA_MS = cpu_getter("kinds", "infra", "ms_per_req")
STACK_MS = cpu_getter("stack", "ms_per_req")
CLIENT_MS = cpu_getter("client", "ms_per_req")
CLIENT_PCT = cpu_getter("client", "pct_core")
MACHINE_PCT = cpu_getter("machine", "pct_core")
OTHER_PCT = cpu_getter("other", "pct_core")


def one_line(d: RunRecord) -> str:
    """The figures of one measurement, for the progress log."""
    s = d["summary"]
    cpu = d.get("cpu") or {}
    roles = ", ".join(
        f"{k} {v['ms_per_req']:.2f}" for k, v in (cpu.get("roles") or {}).items() if v.get("ms_per_req") is not None
    )
    client = cpu.get("client") or {}
    itl = s["itl_ms"]
    return (
        f"{s['requests_per_s']:7.1f} req/s  TTFT p50/p99 {num(s['ttft_ms']['p50'])}/{num(s['ttft_ms']['p99'])} ms  "
        f"ITL p50/p99 {num(itl.get('p50'), 2)}/{num(itl.get('p99'), 2)} ms  errors {int(errors(d))}  "
        f"CPU ms/req: {roles}; client {num(client.get('ms_per_req'), 2)} ({num(client.get('pct_core'), 0)}% of a core)"
    )


# -- tables ---------------------------------------------------------------------------------------
def _table(
    heads: Sequence[str], cols: Sequence[Col], rows: Sequence[tuple[Sequence[str], list[RunRecord]]]
) -> list[str]:
    """One row per (leading cells, runs) with runs; then a cell per column: median [min-max]."""
    out = ["| " + " | ".join([*heads, *(c[0] for c in cols)]) + " |", "|" + "---|" * (len(heads) + len(cols))]
    for lead, runs in rows:
        if runs:
            out.append("| " + " | ".join([*lead, *(cell(med(runs, g), d) for _, g, d in cols)]) + " |")
    return out


def _ratio_table(
    head: str, cols: Sequence[tuple[str, Getter]], rows: Sequence[tuple[str, list[RunRecord], list[RunRecord]]]
) -> list[str]:
    out = [
        "Commutator / Dynamo, per repetition, then median [min-max] (below 1: Commutator lower; for req/s, "
        "above 1: Commutator faster):",
        "",
        "| " + " | ".join([head, *(c[0] for c in cols)]) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    for label, ours, theirs in rows:
        if ours and theirs:
            out.append("| " + " | ".join([label, *(ratio_cell(ours, theirs, g) for _, g in cols)]) + " |")
    return out


def _role_labels(runs: Sequence[RunRecord]) -> list[str]:
    labels: list[str] = []
    for r in runs:
        for label in (r.get("cpu") or {}).get("roles", {}):
            if label not in labels:
                labels.append(label)
    return labels


def _cpu_table(rows: Sequence[tuple[str, str, list[RunRecord]]]) -> list[str]:
    """CPU per completed request by process (ms, and % of one core), per (scenario, system)."""
    out = [
        "| scenario | system | frontend | workers | etcd + NATS | every process (ms/req) | stack | client "
        "| rest of the machine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def both(runs: list[RunRecord], kind: str) -> str:
        ms = med(runs, cpu_getter(*kind.split("."), "ms_per_req"))
        pct = med(runs, cpu_getter(*kind.split("."), "pct_core"))
        return "-" if ms[0] != ms[0] else f"{cell(ms, 2)} ({num(pct[0], 0)}%)"

    for scenario, system, runs in rows:
        if not runs or not any(r.get("cpu") for r in runs):
            continue
        each = ", ".join(
            f"{label} {num(med(runs, cpu_getter('roles', label, 'ms_per_req'))[0], 2)}" for label in _role_labels(runs)
        )
        out.append(
            f"| {scenario} | {system} | {both(runs, 'kinds.frontend')} | {both(runs, 'kinds.worker')} "
            f"| {both(runs, 'kinds.infra')} | {each} | {both(runs, 'stack')} | {both(runs, 'client')} "
            f"| {num(med(runs, OTHER_PCT)[0], 0)}% |"
        )
    out += [
        "",
        "ms of CPU per completed request (median [min-max]), and in brackets the share of one core over the "
        "window (100% = one core busy throughout). Rest of the machine: busy time of processes outside both "
        "the stack and the client (the kernel's own work, anything else running).",
    ]
    return out


def _runs(section: dict[str, Any], key: str) -> list[RunRecord]:
    runs: list[RunRecord] = section.get("runs", {}).get(key, [])
    return runs


LATENCY_COLS: list[Col] = [
    ("TTFT p50 ms", latency("ttft_ms", "p50"), 1),
    ("TTFT p99 ms", latency("ttft_ms", "p99"), 1),
    ("ITL p50 ms", latency("itl_ms", "p50"), 2),
    ("ITL p99 ms", latency("itl_ms", "p99"), 2),
]
CPU_COLS: list[Col] = [
    ("frontend CPU ms/req", FE_MS, 2),
    ("stack CPU ms/req", STACK_MS, 2),
    ("client CPU ms/req", CLIENT_MS, 2),
    ("client % of a core", CLIENT_PCT, 0),
    ("machine busy %", MACHINE_PCT, 0),
]


# -- sections -------------------------------------------------------------------------------------
def _closed_lines(out: dict[str, Any]) -> list[str]:
    sec, st = out["overhead"], out["settings"]
    if not sec.get("runs"):
        return []
    levels: list[int] = sec.get("concurrency", [])
    rows = [([n, str(c)], _runs(sec, f"{n}/c{c}")) for c in levels for n in SYSTEMS]
    cols: list[Col] = [("req/s", rps, 1), ("errors", errors, 0), *LATENCY_COLS, *CPU_COLS]
    lines = [
        "### (b) Closed loop, speed-up 100",
        "",
        f"Concurrency {', '.join(map(str, levels))}; {st['overhead_duration']:g} s per level after "
        f"{st['warmup']:g} s of warm-up.",
        "",
        *_table(["system", "conc"], cols, rows),
        "",
        *_ratio_table(
            "conc",
            [
                ("req/s", rps),
                ("TTFT p50", latency("ttft_ms", "p50")),
                ("TTFT p99", latency("ttft_ms", "p99")),
                ("ITL p50", latency("itl_ms", "p50")),
                ("frontend CPU/req", FE_MS),
                ("stack CPU/req", STACK_MS),
                ("client CPU/req", CLIENT_MS),
            ],
            [(str(c), _runs(sec, f"commutator/c{c}"), _runs(sec, f"dynamo/c{c}")) for c in levels],
        ),
        "",
        *_cpu_table([(f"c={c}", n, _runs(sec, f"{n}/c{c}")) for c in levels for n in SYSTEMS]),
        "",
    ]
    return lines


def _open_lines(out: dict[str, Any]) -> list[str]:
    ol, st = out["open_loop"], out["settings"]
    rates: dict[str, float] = ol.get("rates", {})
    if not rates:
        return []
    probe = ol.get("probe")
    lines = [
        "### (a) Open loop, speed-up 100: the same offered rate for both",
        "",
        f"Dynamo's saturation, measured first in this run (its best closed-loop rate over concurrency "
        f"{', '.join(str(c) for c in ol.get('concurrency', []))}"
        + (f" and a probe at {probe['concurrency']}" if probe else "")
        + f"): **{num(ol.get('saturation_rps'))} req/s**. Offered: "
        + ", ".join(f"{float(k):.0%} = {v:g} req/s" for k, v in rates.items())
        + f", Poisson arrivals for {st['open_duration']:g} s after {st['warmup']:g} s of warm-up, the same "
        "arrival times and requests for both stacks in a repetition.",
        "",
    ]
    cols: list[Col] = [
        ("achieved req/s", rps, 1),
        ("errors", errors, 0),
        *LATENCY_COLS,
        ("send lag p99 ms", latency("send_lag_ms", "p99"), 1),
        *CPU_COLS,
    ]
    rows = [([f"{float(f):.0%} ({r:g}/s)", n], _runs(ol, f"{n}/{f}")) for f, r in rates.items() for n in SYSTEMS]
    lines += _table(["offered", "system"], cols, rows)
    lines += [
        "",
        *_ratio_table(
            "offered",
            [
                ("TTFT p50", latency("ttft_ms", "p50")),
                ("TTFT p99", latency("ttft_ms", "p99")),
                ("ITL p50", latency("itl_ms", "p50")),
                ("ITL p99", latency("itl_ms", "p99")),
                ("frontend CPU/req", FE_MS),
                ("workers CPU/req", WORKERS_MS),
                ("stack CPU/req", STACK_MS),
                ("client CPU/req", CLIENT_MS),
            ],
            [(f"{float(f):.0%}", _runs(ol, f"commutator/{f}"), _runs(ol, f"dynamo/{f}")) for f in rates],
        ),
        "",
        *_cpu_table([(f"{float(f):.0%}", n, _runs(ol, f"{n}/{f}")) for f in rates for n in SYSTEMS]),
        "",
    ]
    return lines


def _slow_lines(out: dict[str, Any]) -> list[str]:
    ss, st = out["slow_stream"], out["settings"]
    if not ss.get("runs"):
        return []
    modes = {"closed": f"closed c={ss.get('concurrency')}"}
    if ss.get("runs", {}).get("commutator/steady") or ss.get("runs", {}).get("dynamo/steady"):
        modes["steady"] = f"closed c={ss.get('concurrency')}, steady"
    if ss.get("rate"):
        modes["open"] = f"open {ss['rate']:g}/s"
    cols: list[Col] = [
        ("req/s", rps, 1),
        ("errors", errors, 0),
        *LATENCY_COLS,
        ("chunk gap p99 ms", latency("chunk_ms", "p99"), 2),
        ("frontend CPU ms/req", FE_MS, 2),
        ("frontend % of a core", FE_PCT, 0),
        ("stack CPU ms/req", STACK_MS, 2),
        ("client CPU ms/req", CLIENT_MS, 2),
    ]
    return [
        "### (c) Slow stream, speed-up 1",
        "",
        f"{ss.get('isl')}-token prompts, {ss.get('osl')} tokens out, {st['slow_duration']:g} s per run after "
        f"{st['warmup']:g} s of warm-up."
        + (
            f" *Steady*: a second closed loop, {st.get('slow_steady_duration', 0):g} s measured after "
            f"{st.get('slow_settle', 0):g} s of discarded load, once the waves of the users' synchronized start "
            "have come apart."
            if "steady" in modes
            else ""
        ),
        "",
        *_table(
            ["run", "system"], cols, [([lbl, n], _runs(ss, f"{n}/{m}")) for m, lbl in modes.items() for n in SYSTEMS]
        ),
        "",
        *_ratio_table(
            "run",
            [
                ("frontend CPU/req", FE_MS),
                ("TTFT p99", latency("ttft_ms", "p99")),
                ("ITL p99", latency("itl_ms", "p99")),
                ("chunk gap p99", latency("chunk_ms", "p99")),
                ("stack CPU/req", STACK_MS),
                ("req/s", rps),
            ],
            [(lbl, _runs(ss, f"commutator/{m}"), _runs(ss, f"dynamo/{m}")) for m, lbl in modes.items()],
        ),
        "",
        *_cpu_table([(lbl, n, _runs(ss, f"{n}/{m}")) for m, lbl in modes.items() for n in SYSTEMS]),
        "",
    ]


def _budget(part: str) -> Getter:
    return lambda r: cpu_budget(r)[part]


def _clients_lines(out: dict[str, Any]) -> list[str]:
    cl, st = out["clients"], out["settings"]
    if not cl.get("runs"):
        return []
    combos: list[tuple[str, str]] = [(c, a) for c, a in cl.get("combos", [])]
    cols: list[Col] = [
        ("req/s", rps, 1),
        ("errors", errors, 0),
        ("TTFT p50 ms", latency("ttft_ms", "p50"), 1),
        ("TTFT p99 ms", latency("ttft_ms", "p99"), 1),
        ("SSE events/req", sse_events_per_req, 1),
        ("client CPU ms/req", CLIENT_MS, 2),
        ("client % of a core", CLIENT_PCT, 0),
        ("stack CPU ms/req", STACK_MS, 2),
        ("frontend CPU ms/req", FE_MS, 2),
        ("frontend % of a core", FE_PCT, 0),
        ("rest ms/req", _budget("other_ms"), 2),
        ("machine busy cores", _budget("cores_busy"), 2),
    ]
    rows = [([c, a, n], _runs(cl, f"{n}/{c}/{a}")) for c, a in combos for n in SYSTEMS]
    return [
        "### (d) Two clients, closed loop at concurrency 64, speed-up 100",
        "",
        f"The harness's client (`loadgen`: uvloop, orjson) and `benchmarks/independent_client.py` (plain asyncio, "
        f"the standard json module, its own SSE parser), {st['clients_duration']:g} s each after {st['warmup']:g} s "
        "of warm-up, on the same stack one after the other. API chat: text prompts of about 1,000 tokens, 75% "
        "a prefix shared within 32 groups: `loadgen`'s in lines of 40 words from a 22-word list, `independent`'s "
        "one line of the tokenizer's whole-word tokens, `independent-lines`' the same in lines of "
        f"{cl.get('line_words', 40)} words; completions: token ids. 64 tokens out.",
        "",
        *_table(["client", "API", "system"], cols, rows),
        "",
        *_ratio_table(
            "client, API",
            [
                ("req/s", rps),
                ("frontend CPU/req", FE_MS),
                ("stack CPU/req", STACK_MS),
                ("client CPU/req", CLIENT_MS),
                ("stack + client + rest CPU/req", _budget("total_ms")),
                ("machine busy cores", _budget("cores_busy")),
            ],
            [(f"{c}, {a}", _runs(cl, f"commutator/{c}/{a}"), _runs(cl, f"dynamo/{c}/{a}")) for c, a in combos],
        ),
        "",
        "On a saturated machine, requests/s = 1000 x busy cores / (stack + client + rest) ms per request: "
        "the req/s ratio is the inverse of the ratio of the whole CPU per request, client included.",
        "",
    ]


def _share_of(bound: float) -> Getter:
    """A run's cached share as a fraction of ``bound`` (None when the bound is 0)."""

    def g(r: RunRecord) -> float | None:
        return (get(r, "summary", "cached_share") or 0.0) / bound if bound else None

    return g


def _routing_modes(out: dict[str, Any], ro: dict[str, Any]) -> list[str]:
    """The modes of ours the run measured, in the order it ran them (older results: the fixed list)."""
    modes = list(out["settings"].get("routing_modes") or ("kv", "kv-adaptive", "round-robin", "random", "least-loaded"))
    return [m for m in modes if any(k.endswith(f"/commutator/{m}") for k in ro.get("runs", {}))]


def _routing_lines(out: dict[str, Any]) -> list[str]:
    ro, st = out["routing"], out["settings"]
    if not ro.get("runs"):
        return []
    cols: list[Col] = [
        ("cached share %", lambda r: 100 * (get(r, "summary", "cached_share") or 0.0), 1),
        ("TTFT p50 ms", latency("ttft_ms", "p50"), 1),
        ("TTFT p99 ms", latency("ttft_ms", "p99"), 1),
        ("ITL p50 ms", latency("itl_ms", "p50"), 2),
        ("ITL p99 ms", latency("itl_ms", "p99"), 2),
        ("goodput req/s", lambda r: get(r, "summary", "goodput_per_s"), 2),
        ("req/s", rps, 2),
        ("errors", errors, 0),
        ("frontend CPU ms/req", FE_MS, 2),
    ]
    lines = [
        "### Routing quality, speed-up 1",
        "",
        f"{ro['workers']} mocker workers of {ro['num_blocks']} KV blocks (64 tokens) each, fresh stacks, open loop "
        f"at the trace's send times, {st['routing_reps']} repetition(s). Prompts longer than "
        f"{ro['max_prompt_tokens']} tokens are cut to it and outputs capped at {ro['max_output']} (the tiny "
        f"model's context is 4,096). Goodput: requests per second with TTFT at most {ro['ttft_slo_ms']:g} ms and "
        f"a mean inter-token time at most {ro['itl_slo_ms']:g} ms. *Share of bound*: the cached share as a "
        "fraction of the pooled cache's (one cache of every worker's blocks, each prefix held once) and of the "
        "affinity bound's (each request on the worker holding its longest prefix, load ignored), both replayed "
        "offline over the same requests through the mocker's block pool (`commutator bench bound`).",
        "",
    ]
    for key, tr in ro.get("traces", {}).items():
        b = tr["bound"]
        pooled, affinity = b["pooled"]["hit_share"], b["bound"]["hit_share"]
        rows = []
        modes = _routing_modes(out, ro)
        for system in SYSTEMS:
            for mode in modes:
                runs = _runs(ro, f"{key}/{system}/{mode}")
                if runs:
                    rows.append(([mode, system], runs))
        lines += [
            f"#### {key}",
            "",
            f"{tr['about']}; {tr['duration_s']:g} s replayed, {tr['requests']} requests ({tr['cut_prompts']} "
            f"prompts cut). Offline, same requests: pooled cache **{100 * pooled:.1f}%**, affinity bound "
            f"{100 * affinity:.1f}%, round-robin {100 * b['round_robin']['hit_share']:.1f}%, random "
            f"{100 * b['random']['hit_share']:.1f}%, infinite cache {100 * b['infinite_cache_share']:.1f}%.",
            "",
            *_table(
                ["router", "system"],
                [
                    *cols[:1],
                    ("share of pooled", _share_of(pooled), 2),
                    ("share of affinity bound", _share_of(affinity), 2),
                    *cols[1:],
                ],
                rows,
            ),
            "",
            *_ratio_table(
                "router",
                [
                    ("cached share", lambda r: get(r, "summary", "cached_share")),
                    ("TTFT p50", latency("ttft_ms", "p50")),
                    ("TTFT p99", latency("ttft_ms", "p99")),
                    ("ITL p50", latency("itl_ms", "p50")),
                    ("goodput", lambda r: get(r, "summary", "goodput_per_s")),
                ],
                [
                    (f"ours {m} / Dynamo kv", _runs(ro, f"{key}/commutator/{m}"), _runs(ro, f"{key}/dynamo/kv"))
                    for m in modes
                ],
            ),
            "",
        ]
    return lines


def _machine_lines(out: dict[str, Any]) -> list[str]:
    m = out["machine"]
    before, after = m["loadavg_before"], m.get("loadavg_after", ())
    st = out["settings"]
    reps = {
        "overhead": st["reps"],
        "slow-stream": st["reps"],
        "clients": st["client_reps"],
        "routing": st["routing_reps"],
    }
    ran = ", ".join(f"{name} {reps[name]}" for name in out.get("sections", reps) if name in reps)
    lines = [
        f"Written by `make bench-compare` on {out['started'][:16].replace('T', ' ')} in "
        f"{out['wall_s'] / 60:.1f} min; repetitions: {ran}. Raw figures: `{st['out']}/compare.json`.",
        "",
        f"- {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, Linux {m['kernel']}, Python {m['python']}",
        f"- NVIDIA Dynamo {out['dynamo_version']} (`ai-dynamo`, `ai-dynamo-runtime` from PyPI); {m['nats_server']}; "
        f"{m['etcd']}",
        f"- load average before {tuple(round(x, 2) for x in before)}, after {tuple(round(x, 2) for x in after)}",
    ]
    if before[0] > 0.5 * (m["cores"] or 1):
        lines.append(
            f"- **The machine was busy before the run** (1-minute load {before[0]:.1f} on {m['cores']} cores): "
            "the figures are noisy; the [min-max] spreads show how much."
        )
    return [*lines, ""]


def page(out: dict[str, Any], plot_paths: Sequence[Path]) -> str:
    """The figures region of docs/benchmarks.md (between ``BEGIN`` and ``END``)."""
    lines = [
        *_machine_lines(out),
        *_open_lines(out),
        *_closed_lines(out),
        *_slow_lines(out),
        *_clients_lines(out),
        *_routing_lines(out),
    ]
    if plot_paths:
        lines += ["### Plots", "", *(f"![{p.stem}](benchmarks/{p.name})" for p in plot_paths), ""]
    return "\n".join(lines)


def splice(doc: str, figures: str) -> str:
    """``doc`` with the text between its ``BEGIN`` and ``END`` markers replaced by ``figures``."""
    try:
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
    except ValueError:
        raise ValueError(f"the page has no figures region ({BEGIN} ... {END})") from None
    return f"{head}{BEGIN}\n\n{figures.strip()}\n\n{END}{tail}"


# -- plots ----------------------------------------------------------------------------------------
def plots(out_dir: Path, samples: dict[str, list[RequestResult]], out: dict[str, Any] | None = None) -> list[Path]:
    """TTFT CDFs of the open loop at its highest rate, of the slow stream, and of each routing trace;
    each routing trace's hit share over time beside its offline bounds. ``samples``: "<section> <system>
    [<what>]" -> results ("routing <trace> <system> <mode>" for the routing section)."""

    def ms(results: list[RequestResult]) -> list[float]:
        return [r.ttft_s * 1000 for r in results if r.ok and r.ttft_s is not None]

    paths = []
    for section, name, title in (
        ("open", "open_loop_ttft.png", "TTFT, open loop at the highest offered rate (all repetitions)"),
        ("closed", "closed_loop_ttft_c16.png", "TTFT, closed loop at concurrency 16 (all repetitions)"),
        ("slow", "slow_stream_ttft.png", "TTFT, slow stream, closed loop (all repetitions)"),
    ):
        series = {k.split(" ", 1)[1]: ms(v) for k, v in samples.items() if k.split(" ", 1)[0] == section}
        if series:
            report.plot_latency_cdf(out_dir / name, series, title, "ms")
            paths.append(out_dir / name)
    traces = (out or {}).get("routing", {}).get("traces", {})
    for key, tr in traces.items():
        runs = {k.split(" ", 2)[2]: v for k, v in samples.items() if k.startswith(f"routing {key} ")}
        if not runs:
            continue
        p = out_dir / f"routing_{key}_ttft.png"
        report.plot_latency_cdf(p, {k: ms(v) for k, v in runs.items()}, f"TTFT, {key} trace, speed-up 1", "ms")
        paths.append(p)
        window = (out or {})["routing"]["window_s"]
        shares = {k: report.hit_share_windows(v, window) for k, v in runs.items()}
        shares["pooled cache (offline)"] = tr["bound"]["pooled"]["windows"]
        shares["affinity bound (offline)"] = tr["bound"]["bound"]["windows"]
        p = out_dir / f"routing_{key}_hit_share.png"
        report.plot_hit_share(p, shares, f"Cached share over time, {key} trace ({window:g} s windows)")
        paths.append(p)
    return paths
