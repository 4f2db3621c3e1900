"""docker/compose.yaml for real: the images built, the stack up, driven by real clients (`make test-compose`).

One module-scoped stack: scripts/compose-test-env.sh prepares Docker and the third-party images (test-only
stand-ins from Debian packages where no registry is reachable), `docker-compose build` builds the project's
images from docker/Dockerfile, `docker-compose up -d` starts everything health-gated, and the tests then
talk to it as users do: the OpenAI client through the load balancer, examples/grpc_client.py against the
router service, `docker kill` on a frontend. `docker-compose down -v` must leave nothing behind. How long
each phase took goes to build/compose/timings.json.

Runs as root (apt-get, dockerd); selected with `-m compose`, left out of the default run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.compose, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker" / "compose.yaml"
TIMINGS = ROOT / "build" / "compose" / "timings.json"
DOCKER = "/usr/bin/docker"  # Debian's CLI: BuildKit built in (another docker on the PATH may lack buildx)
MODEL = "commutator/tiny-llama"
FRONTENDS = ("frontend-a", "frontend-b")
ROUTED = ("commutator_router_decisions_total", (("outcome", "routed"),))
NO_EOS = {"ignore_eos": True}  # the mocker's pseudo-random tokens may be EOS: max_tokens is then exact


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    project: str
    mode: str  # embedded (the frontends route in-process) or router-service
    lb_port: int
    router_port: int
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker-compose", "-f", str(COMPOSE_FILE), "-p", self.project, *args], self.env, timeout, check)

    def container(self, service: str) -> str:
        ids = self.compose("ps", "-q", service).stdout.split()
        assert ids, f"no container for {service}"
        return ids[0]

    def containers(self, service: str) -> list[str]:
        return self.compose("ps", "-q", service).stdout.split()

    def metrics(self, service: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The service's /metrics (status port 9090, inside its container): {(sample, labels): value}."""
        code = "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9090/metrics').read().decode())"
        text = run([DOCKER, "exec", self.container(service), "python", "-c", code], self.env, 30).stdout
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.lb_port}/v1"


def run(cmd: list[str], env: dict[str, str], timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def served(stack: Stack, endpoint: str, frontends: tuple[str, ...] = FRONTENDS) -> dict[str, float]:
    """Per frontend: requests to ``endpoint`` (chat, completions) answered 200 so far."""
    key = ("commutator_frontend_requests_total", (("endpoint", endpoint), ("status", "200")))
    return {f: stack.metrics(f).get(key, 0.0) for f in frontends}


def wait_for_model(stack: Stack, deadline_s: float) -> None:
    import urllib.request

    end = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(f"{stack.base_url()}/models", timeout=5) as r:
                last = r.read().decode()
                if MODEL in [m["id"] for m in json.loads(last)["data"]]:
                    return
        except OSError as exc:
            last = repr(exc)
        time.sleep(1)
    raise AssertionError(f"{MODEL} not served through the load balancer after {deadline_s} s: {last}")


TIMES: dict[str, float] = {}
"""Seconds per phase, written to build/compose/timings.json as the module's stacks go down."""


def compose_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = "/usr/bin:" + env.get("PATH", "")
    env.update(COMPOSE_DOCKER_CLI_BUILD="1", DOCKER_BUILDKIT="1")
    return env


def timed(name: str, fn: Callable[[], object]) -> None:
    t0 = time.monotonic()
    fn()
    TIMES[name] = round(time.monotonic() - t0, 1)


@pytest.fixture(scope="module")
def images() -> Iterator[None]:
    """Docker running, the third-party images present, the project's images built (once for the module)."""
    t0 = time.monotonic()
    env = compose_env()
    timed("prepare docker and base images", lambda: run([str(ROOT / "scripts" / "compose-test-env.sh")], env, 900))
    build = Stack(project="commutatorbuild", mode="", lb_port=0, router_port=0, env=env)
    timed("build project images", lambda: build.compose("build", timeout=900))
    yield
    TIMES["total"] = round(time.monotonic() - t0, 1)
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(TIMES, indent=2) + "\n")
    print(f"\ncompose test phases (s): {json.dumps(TIMES)}", file=sys.stderr)


@pytest.fixture(scope="module", params=["embedded", "router-service"])
def stack(request: pytest.FixtureRequest, images: None) -> Iterator[Stack]:
    """The stack up: frontends routing in-process, or through the router service (COMMUTATOR_ROUTER_ENDPOINT)."""
    mode = str(request.param)
    env = compose_env()
    s = Stack(
        project=f"commutatortest{os.getpid()}{mode[0]}",
        mode=mode,
        lb_port=free_port(),
        router_port=free_port(),
        env=env,
    )
    env.update(
        LB_PORT=str(s.lb_port),
        ROUTER_PORT=str(s.router_port),
        COMMUTATOR_ROUTER_ENDPOINT="router" if mode == "router-service" else "",
    )
    try:
        timed(f"{mode}: up (health-gated)", lambda: s.compose("up", "-d", timeout=300))
        timed(f"{mode}: model served through the LB", lambda: wait_for_model(s, 90))
        t_tests = time.monotonic()
        yield s
        TIMES[f"{mode}: tests"] = round(time.monotonic() - t_tests, 1)
    finally:
        logs = s.compose("logs", "--no-color", check=False).stdout
        (ROOT / "build" / "compose" / f"logs-{mode}.txt").write_text(logs)
        timed(f"{mode}: down -v", lambda: s.compose("down", "-v", "--remove-orphans", timeout=300))
        label = f"label=com.docker.compose.project={s.project}"
        left = {
            "containers": run([DOCKER, "ps", "-aq", "--filter", label], env, 30).stdout.split(),
            "networks": run([DOCKER, "network", "ls", "-q", "--filter", label], env, 30).stdout.split(),
            "volumes": run([DOCKER, "volume", "ls", "-q", "--filter", label], env, 30).stdout.split(),
        }
        assert left == {"containers": [], "networks": [], "volumes": []}, f"down -v left {left}"


def test_openai_api_through_the_load_balancer_reaches_both_frontends(stack: Stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url(), api_key="unused", max_retries=0, timeout=60)
    decided_before = stack.metrics("router").get(ROUTED, 0.0)
    chat_before = served(stack, "chat")
    completions_before = served(stack, "completions")
    n = 6
    for i in range(n):
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Hello number {i}"}], max_tokens=8, extra_body=NO_EOS
        )
        assert chat.choices[0].finish_reason == "length" and chat.usage and chat.usage.completion_tokens == 8
        assert chat.choices[0].message.content
        stream = client.completions.create(
            model=MODEL, prompt=f"Once upon a time {i}", max_tokens=6, stream=True, extra_body=NO_EOS
        )
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in chunks)
    chat_after = served(stack, "chat")
    completions_after = served(stack, "completions")
    chat_delta = {f: chat_after[f] - chat_before[f] for f in FRONTENDS}
    completions_delta = {f: completions_after[f] - completions_before[f] for f in FRONTENDS}
    assert sum(chat_delta.values()) == n and sum(completions_delta.values()) == n
    for f in FRONTENDS:
        assert chat_delta[f] + completions_delta[f] > 0, f"{f} served nothing: chat {chat_delta}, {completions_delta}"
    # Who routed them: the frontends' embedded routers, or the router service (COMMUTATOR_ROUTER_ENDPOINT=router).
    decided = stack.metrics("router").get(ROUTED, 0.0) - decided_before
    assert decided == (2 * n if stack.mode == "router-service" else 0)


def test_server_sent_events_stream_through_the_load_balancer(stack: Stack) -> None:
    """A long stream's chunks reach the client as the worker produces them, not in bursts at the end.

    (nginx has proxy_buffering off, and the frontend's SSE responses say X-Accel-Buffering: no as well.)
    """
    from openai import OpenAI

    client = OpenAI(base_url=stack.base_url(), api_key="unused", max_retries=0, timeout=60)
    t0 = time.monotonic()
    stream = client.completions.create(model=MODEL, prompt="Tell me", max_tokens=300, stream=True, extra_body=NO_EOS)
    arrivals = [time.monotonic() - t0 for chunk in stream if chunk.choices and chunk.choices[0].text]
    # 300 mocker passes of ~6 ms each: about 2 s in all, a chunk every few ms.
    spread = sum(b - a > 0.002 for a, b in itertools.pairwise(arrivals))
    assert len(arrivals) > 100 and arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1], len(arrivals))
    assert spread > len(arrivals) // 2, f"{spread} of {len(arrivals)} chunks arrived apart"


def test_grpc_example_calls_the_router_service(stack: Stack) -> None:
    """examples/grpc_client.py, as a user runs it: Router.Route, then Router.Generate, on the published port."""
    decisions_before = stack.metrics("router").get(ROUTED, 0.0)
    out = run(
        [
            sys.executable,
            str(ROOT / "examples" / "grpc_client.py"),
            f"127.0.0.1:{stack.router_port}",
            "--max-tokens",
            "12",
        ],
        stack.env,
        120,
    ).stdout
    m = re.search(r"route: ROUTE_OUTCOME_ROUTED worker=([0-9a-f]+) address=([^:\s]+):(\d+)", out)
    assert m, out
    # The address is a decode worker's container (its hostname is its short container id).
    decode_ids = {c[:12] for c in stack.containers("decode")}
    assert m.group(2) in decode_ids, (m.group(2), decode_ids)
    # 12 tokens, or fewer when the mocker's pseudo-random tokens hit EOS.
    g = re.search(r"generate: (\d+) tokens, finish=FINISH_REASON_(LENGTH|STOP): \[([0-9, ]*)\]", out)
    assert g, out
    count = int(g.group(1))
    tokens = [t for t in g.group(3).split(",") if t.strip()]
    assert count == len(tokens) and (count == 12 if g.group(2) == "LENGTH" else count <= 12), out
    # Both calls were decided by the router service (nothing else is routed meanwhile).
    assert stack.metrics("router").get(ROUTED, 0.0) - decisions_before == 2


def test_zz_killing_a_frontend_leaves_the_api_serving(stack: Stack) -> None:
    from openai import OpenAI

    before = served(stack, "chat", ("frontend-b",))["frontend-b"]
    killed = stack.container("frontend-a")
    run([DOCKER, "kill", killed], stack.env, 30)
    client = OpenAI(base_url=stack.base_url(), api_key="unused", max_retries=0, timeout=60)
    n = 6
    for i in range(n // 2):
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"still there {i}?"}], max_tokens=4, extra_body=NO_EOS
        )
        assert chat.choices[0].finish_reason == "length"
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"and now {i}?"}],
            max_tokens=4,
            stream=True,
            extra_body=NO_EOS,
        )
        assert list(stream)[-1].choices[0].finish_reason == "length"
    assert served(stack, "chat", ("frontend-b",))["frontend-b"] - before == n
    # frontend-a stayed down the whole time (docker kill is a manual stop: no restart policy applies).
    state = run([DOCKER, "inspect", "-f", "{{.State.Running}} {{.State.ExitCode}}", killed], stack.env, 30).stdout
    assert state.split() == ["false", "137"], state


def test_long_prompt_is_prefilled_by_the_prefill_worker(stack: Stack) -> None:
    """A prompt over the decode workers' --max-local-prefill-length (1000) goes through the prefill queue."""
    from openai import OpenAI

    def prefilled() -> float:
        return sum(
            v
            for (name, labels), v in stack.metrics("prefill").items()
            if name == "commutator_prefill_requests_total" and ("outcome", "done") in labels
        )

    before = prefilled()
    client = OpenAI(base_url=stack.base_url(), api_key="unused", max_retries=0, timeout=60)
    prompt = " ".join(f"word{i}" for i in range(700))  # about 2,300 tokens of the tiny model
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, extra_body=NO_EOS)
    assert out.choices[0].finish_reason == "length" and out.usage and out.usage.prompt_tokens > 1000
    assert prefilled() - before == 1
