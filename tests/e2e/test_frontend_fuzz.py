"""Fuzzing the frontend: schemathesis against its live ``/openapi.json``, then hand-written hostile
requests (huge numbers, deep nesting, invalid UTF-8, 10k stop strings, a 50 MB body, wrong content
types and encodings, slowloris), against a real stack: the frontend (with ``--api-keys-file``) and a
mocker worker as separate processes on real etcd and NATS.

Expected: no 5xx answer, the frontend process alive throughout, its memory (RSS) bounded. This is the
short form (part of the e2e suite, about a minute); ``make fuzz`` runs the long form
(``COMMUTATOR_FUZZ=long``: many more examples). The figures are printed and written to
``build/fuzz/report.json``.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import os
import subprocess
import sys
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from commutator.common.local_servers import EtcdProcess, NatsProcess, free_port

pytestmark = pytest.mark.e2e

LONG = os.environ.get("COMMUTATOR_FUZZ") == "long"
MAX_EXAMPLES = 1000 if LONG else 12
MODEL = "commutator/tiny-llama"
KEY = "sk-fuzz-0123456789abcdefgh"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT_S = 2.0  # the frontend's --http-read-timeout-s here: slowloris clients are cut after it
REPORT = Path(__file__).resolve().parents[2] / "build" / "fuzz" / "report.json"
FIGURES: dict[str, Any] = {"requests": 0, "status_5xx": 0, "statuses": {}, "findings": []}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def count(status: int, what: str) -> None:
    FIGURES["requests"] += 1
    FIGURES["statuses"][str(status)] = FIGURES["statuses"].get(str(status), 0) + 1
    if status >= 500:
        FIGURES["status_5xx"] += 1
        FIGURES["findings"].append(f"{status}: {what}")


@pytest.fixture(scope="module")
def fuzz_stack(
    role_process, etcd_server: EtcdProcess, nats_server: NatsProcess, tmp_path_factory
) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "keys.txt"
    keys.write_text(f"fuzz {KEY}\n")
    env = dict(os.environ)
    env.update(
        {
            "COMMUTATOR_ETCD_ENDPOINTS": etcd_server.endpoint,
            "COMMUTATOR_NATS_URL": nats_server.url,
            "COMMUTATOR_NAMESPACE": f"fuzz{os.getpid()}",
            "COMMUTATOR_LOG": "info",
            "PYTHONUNBUFFERED": "1",
        }
    )
    port = free_port()
    worker = role_process("commutator.decode", ["--speedup-ratio", "0"], env, tmp / "worker.log")
    frontend = role_process(
        "commutator.frontend",
        [
            *("--http-host", "127.0.0.1", "--http-port", str(port), "--api-keys-file", str(keys)),
            *("--http-read-timeout-s", str(READ_TIMEOUT_S)),
            # Small fan-out limits keep a fuzzed request cheap; the parser and its bounds are the same.
            *("--max-n", "4", "--max-choices-per-request", "8", "--max-prompts-per-request", "8"),
        ],
        env,
        tmp / "frontend.log",
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 1}).encode()
    while True:
        try:
            req = urllib.request.Request(f"{base}/v1/completions", data=body, headers=AUTH)
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        assert frontend.proc.poll() is None, frontend.log()
        assert time.monotonic() < deadline, "the stack never served a request"
        time.sleep(0.2)
    FIGURES["rss_kib_before"] = rss_kib(frontend.proc.pid)
    yield {"base": base, "port": port, "frontend": frontend, "tmp": tmp}
    worker.stop()
    frontend.stop()


def test_schemathesis_finds_no_server_error(fuzz_stack) -> None:  # type: ignore[no-untyped-def]
    tmp: Path = fuzz_stack["tmp"]
    report = tmp / "schemathesis"
    cmd = [
        str(Path(sys.executable).parent / "schemathesis"),
        "run",
        f"{fuzz_stack['base']}/openapi.json",
        *("--header", f"Authorization: Bearer {KEY}"),
        # One worker: hypothesis compiles lambdas' source to describe them, and CPython 3.11's compile()
        # is not safe in threads at once ("AST constructor recursion depth mismatch").
        *("--max-examples", str(MAX_EXAMPLES), "--seed", "1", "--workers", "1"),
        *("--checks", "not_a_server_error,status_code_conformance,content_type_conformance"),
        *("--checks", "response_schema_conformance,negative_data_rejection"),
        *("--phases", "examples,coverage,fuzzing", "--suppress-health-check", "all"),
        *("--request-timeout", "30", "--report", "har", "--report-dir", str(report)),
        "--generation-codec",
        "utf-8",
    ]
    # In its own folder: schemathesis keeps a cache (.schemathesis/) where it runs.
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False, cwd=tmp)
    har = next(report.glob("har-*.json"), None)
    assert har is not None, done.stdout[-5000:] + done.stderr[-5000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    for e in entries:
        count(e["response"]["status"], f"schemathesis {e['request']['method']} {e['request']['url']}")
    FIGURES["schemathesis_requests"] = len(entries)
    FIGURES["schemathesis_exit"] = done.returncode
    assert fuzz_stack["frontend"].proc.poll() is None, "the frontend exited"
    assert entries and all(e["response"]["status"] < 500 for e in entries)
    assert done.returncode == 0, done.stdout[-8000:]


def _big_number_bodies() -> list[tuple[str, bytes]]:
    out = []
    for chat in (True, False):
        base = (
            '{"model": "%s", "messages": [{"role": "user", "content": "hi"}]'
            if chat
            else '{"model": "%s", "prompt": "hi"'
        ) % MODEL
        fields = ["max_tokens", "n", "seed", "min_tokens", "top_k", "temperature", "top_p"]
        fields += ["top_logprobs", "max_completion_tokens"] if chat else ["logprobs"]
        for f in fields:
            for v in ("1e308", "-1e308", str(2**70), str(-(2**70)), "1e309", str(10**400), "NaN", "Infinity", "1e-400"):
                extra = ', "logprobs": true' if f == "top_logprobs" else ""
                out.append((f"{f}={v[:12]}", f'{base}, "{f}": {v}{extra}}}'.encode()))
        out.append(("stop ids 2**70", f'{base}, "stop": [{2**70}]}}'.encode()))
        out.append(("prompt ids 2**70", f'{{"model": "{MODEL}", "prompt": [{2**70}, 1]}}'.encode()))
    return out


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _gzip_bomb(size: int) -> bytes:
    z = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    chunk = b"0" * (1 << 20)
    return b"".join(z.compress(chunk) for _ in range(size >> 20)) + z.flush()


def _j(**fields: Any) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


M = MODEL.encode()
CHAT_HI = b'"messages": [{"role": "user", "content": "x"}]'
GZIP = {"Content-Encoding": "gzip"}


@functools.cache
def hostile() -> list[tuple[str, bytes, dict[str, str]]]:
    """The hostile requests (made on first use: the bomb takes a moment to compress)."""
    return [
        *((name, body, {}) for name, body in _big_number_bodies()),
        ("10k nested arrays as the body", _nested(10_000), {}),
        ("10k nested arrays in messages", b'{"model": "%s", "messages": %s}' % (M, _nested(10_000)), {}),
        ("10k nested arrays in prompt", b'{"model": "%s", "prompt": %s}' % (M, _nested(10_000)), {}),
        ("10k nested objects", b'{"a":' * 10_000 + b"1" + b"}" * 10_000, {}),
        (
            "1000 nested arrays in a tool",
            b'{"model": "%s", %s, "tools": [{"a": %s}]}' % (M, CHAT_HI, _nested(1000)),
            {},
        ),
        ("invalid UTF-8 in a string", b'{"model": "%s", "prompt": "\xff\xfe\xc3("}' % M, {}),
        ("invalid UTF-8 as the model", b'{"model": "\xc0\xaf", "prompt": "x"}', {}),
        ("lone surrogate (escaped) in a prompt", b'{"model": "%s", "prompt": "a\\ud800b"}' % M, {}),
        (
            "lone surrogate in a message",
            b'{"model": "%s", "messages": [{"role": "user", "content": "\\udfff"}]}' % M,
            {},
        ),
        ("lone surrogate in a stop string", b'{"model": "%s", "prompt": "x", "stop": ["\\ud800"]}' % M, {}),
        ("NUL bytes", _j(prompt="a\u0000b", max_tokens=2), {}),
        ("10k stop strings", _j(prompt="x", stop=[f"s{i}" for i in range(10_000)]), {}),
        ("10k stop token ids", _j(prompt="x", stop=list(range(10_000))), {}),
        ("100k messages", _j(messages=[{"role": "user", "content": "a"}] * 100_000), {}),
        ("a 7 MB prompt", _j(prompt="word " * 1_400_000, max_tokens=1), {}),
        ("a 1M-token prompt", _j(prompt=[5] * 1_000_000, max_tokens=1), {}),
        ("text/plain", _j(prompt="x", max_tokens=1), {"Content-Type": "text/plain"}),
        ("form-encoded", b"model=x&prompt=y", {"Content-Type": "application/x-www-form-urlencoded"}),
        (
            "multipart",
            b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b--\r\n",
            {"Content-Type": "multipart/form-data; boundary=b"},
        ),
        ("no body", b"", {}),
        ("not JSON", b"\x00\x01\x02garbage", {"Content-Type": "application/json"}),
        ("JSON scalar", b"42", {}),
        ("gzip that is not gzip", b"not gzip at all", GZIP),
        ("deflate that is not deflate", b"\x00\x01not deflate", {"Content-Encoding": "deflate"}),
        ("unknown content encoding", b"{}", {"Content-Encoding": "zstd-but-not-really"}),
        ("a gzip bomb (1 GB of zeros)", _gzip_bomb(1 << 30), GZIP),
        ("valid gzip JSON", gzip.compress(_j(prompt="x", max_tokens=1)), GZIP),
    ]


async def _hostile_round(base: str) -> dict[str, int]:
    """Every hostile request once, on both generation routes; the status of each (-1: no answer)."""
    answers: dict[str, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        for path in ("/v1/completions", "/v1/chat/completions"):
            for name, body, headers in hostile():
                hdrs = {"Content-Type": "application/json", **AUTH, **headers}
                async with http.post(f"{base}{path}", data=body, headers=hdrs) as r:
                    await r.read()
                    answers[f"{path} {name}"] = r.status
        # 50 MB: refused from its Content-Length before it is read (aiohttp drops the rest as it comes).
        big = b'{"model": "%s", "prompt": "' % MODEL.encode() + b"a" * (50 << 20) + b'"}'
        try:
            async with http.post(f"{base}/v1/completions", data=big, headers=AUTH) as r:
                answers["50 MB body"] = r.status
        except aiohttp.ClientError:  # the server closed before the client had sent it all
            answers["50 MB body"] = -1
        for name, headers in (
            ("a 100 kB header", {**AUTH, "X-Big": "a" * 100_000}),
            ("an invalid UTF-8 key", {"Authorization": "Bearer \udcff\udcfe"}),
            ("no key", {}),
        ):
            try:
                async with http.get(f"{base}/v1/models", headers=headers) as r:
                    answers[name] = r.status
            except (aiohttp.ClientError, UnicodeEncodeError):
                answers[name] = -1
    for name, status in answers.items():
        count(status, name)
    return answers


async def test_hostile_bodies_get_4xx_and_never_5xx_and_memory_stays_bounded(fuzz_stack) -> None:  # type: ignore[no-untyped-def]
    pid = fuzz_stack["frontend"].proc.pid
    answers = await _hostile_round(fuzz_stack["base"])
    FIGURES["hostile"] = answers
    FIGURES["rss_kib_after_first_hostile_round"] = first = rss_kib(pid)
    rounds = 5 if LONG else 2
    for _ in range(rounds - 1):  # the same requests again: memory they took once is reused, not added to
        assert await _hostile_round(fuzz_stack["base"]) == answers
    FIGURES["hostile_rounds"] = rounds
    FIGURES["rss_kib_after_last_hostile_round"] = last = rss_kib(pid)
    assert {k: v for k, v in answers.items() if v >= 500 or v < 0} == {}
    assert answers["50 MB body"] == 413
    assert answers["/v1/completions 10k stop strings"] == 400
    assert answers["/v1/chat/completions 10k nested arrays in messages"] == 400
    assert answers["/v1/completions invalid UTF-8 in a string"] == 400
    assert answers["/v1/completions text/plain"] == 200  # a JSON body is read as JSON whatever its label
    for path in ("/v1/completions", "/v1/chat/completions"):  # bodies are never inflated: no bomb goes off
        for name in (
            "gzip that is not gzip",
            "valid gzip JSON",
            "a gzip bomb (1 GB of zeros)",
            "unknown content encoding",
        ):
            assert answers[f"{path} {name}"] == 415, name
    assert answers["no key"] == answers["an invalid UTF-8 key"] == 401
    assert fuzz_stack["frontend"].proc.poll() is None
    assert last - first < 32 * 1024, (first, last)


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_slowloris_clients_are_cut_and_others_are_served(fuzz_stack) -> None:  # type: ignore[no-untyped-def]
    port, base = fuzz_stack["port"], fuzz_stack["base"]
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    # 20 clients that send their headers a byte at a time, 20 whose body never finishes.
    header_drips = [await _raw(port) for _ in range(20)]
    stalled = [await _raw(port) for _ in range(20)]
    for _, w in stalled:
        w.write(request + b'{"model": "')
        await w.drain()

    async def drip(w: asyncio.StreamWriter) -> float:
        for i in range(len(request)):
            try:
                w.write(request[i : i + 1])
                await w.drain()
            except (ConnectionError, OSError):
                return loop.time() - t0
            await asyncio.sleep(0.1)
        return -1.0  # sent every header byte: never cut

    drips = [asyncio.create_task(drip(w)) for _, w in header_drips]
    # Others are served meanwhile.
    async with aiohttp.ClientSession() as http:
        for _ in range(10):
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2}
            async with http.post(f"{base}/v1/completions", json=body, headers=AUTH) as r:
                assert r.status == 200
                count(r.status, "served during slowloris")
            await asyncio.sleep(0.1)
    cut_after = await asyncio.gather(*drips)
    answers = []
    for r, _ in stalled:
        try:
            head = await asyncio.wait_for(r.read(4096), READ_TIMEOUT_S * 5)
            answers.append(int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1") else 0)
        except (TimeoutError, ConnectionError, IndexError, ValueError):
            answers.append(0)
    for _, w in header_drips + stalled:
        w.close()
    FIGURES["slowloris"] = {
        "header_clients_cut_after_s": sorted(round(c, 1) for c in cut_after),
        "stalled_body_answers": answers,
    }
    for a in answers:
        count(a, "slowloris stalled body")
    assert all(0 < c < READ_TIMEOUT_S * 4 for c in cut_after), cut_after
    assert answers == [408] * len(stalled)
    assert fuzz_stack["frontend"].proc.poll() is None


def test_the_frontend_survived_with_bounded_memory(fuzz_stack) -> None:  # type: ignore[no-untyped-def]
    frontend = fuzz_stack["frontend"]
    alive = frontend.proc.poll() is None
    FIGURES["crashes"] = 0 if alive else 1
    FIGURES["rss_kib_after"] = rss_kib(frontend.proc.pid) if alive else None
    log = frontend.log()
    FIGURES["unhandled_errors_logged"] = log.count("unhandled error serving")
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps(FIGURES, indent=2))
    print("\nfuzz figures:", json.dumps({k: v for k, v in FIGURES.items() if k != "hostile"}, indent=2))
    assert alive, log[-5000:]
    assert FIGURES["status_5xx"] == 0, FIGURES["findings"]
    assert "Traceback" not in log, log[-5000:]
    # Bounded: the largest bodies (8 MB of text, 1M token ids, 100k messages) leave a high-water mark
    # (allocator arenas) that later rounds reuse (checked above); nothing grows per request.
    assert FIGURES["rss_kib_after"] - FIGURES["rss_kib_before"] < 128 * 1024, FIGURES
