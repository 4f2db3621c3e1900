"""Settings of the frontend."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import group, option
from commutator.common.runtime import RuntimeConfig
from commutator.frontend.protocol import DEFAULT_LIMITS
from commutator.router.config import RouterConfig

__all__ = ["FrontendConfig"]


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """The OpenAI-compatible HTTP frontend (with the router embedded, or in front of a router service)."""

    runtime: RuntimeConfig = group(RuntimeConfig)
    router: RouterConfig = group(RouterConfig)
    http_host: str = option("0.0.0.0", "Interface the HTTP server binds")
    http_port: int = option(8000, "HTTP port of the OpenAI API")
    processes: int = option(
        1,
        "Frontend processes sharing the HTTP port (SO_REUSEPORT), each with its own embedded router; more than 1"
        " turns on --router-replica-sync. Raise toward the core count when the frontend's CPU is the bottleneck",
    )
    tls_cert_path: str = option("", "TLS certificate (PEM); with --tls-key-path the API is served over HTTPS")
    tls_key_path: str = option("", "TLS private key (PEM)")
    api_keys_file: str = option(
        "",
        "File of API keys, one 'NAME KEY [N/s|N/m]' a line (README, 'API keys'). When set, every request but"
        " /health, /live, /metrics and /openapi.json needs 'Authorization: Bearer KEY' (401 without; 429 with"
        " Retry-After over the key's limit). Read at start-up (an invalid file stops it) and again on SIGHUP",
        metavar="PATH",
    )
    router_endpoint: str = option(
        "", "Discovery component of a standalone router service to send requests to (empty: route in-process)"
    )
    router_wait_s: float = option(
        10.0,
        "With --router-endpoint: how long a request waits for a router service when none is registered, or when "
        "its router failed mid-stream (it is then sent on with the tokens so far, --migration-limit times at most)",
    )
    http_read_timeout_s: float = option(
        60.0,
        "Longest a client may take to send a request's headers (then the connection is closed; a keep-alive"
        " connection idle this long is closed too) and, separately, its body (then 408). Slowloris clients hold"
        " a connection no longer than this",
    )
    drain_grace_s: float = option(30.0, "On SIGTERM, how long in-flight requests may take to finish")
    max_body_bytes: int = option(8 * 1024 * 1024, "Largest accepted request body; larger ones get 413")
    max_prompts_per_request: int = option(
        DEFAULT_LIMITS.max_prompts_per_request,
        "Most prompts in one /v1/completions request (more: 400). Each is tokenized on the event loop and opens"
        " at least one worker stream; the default matches --max-choices-per-request",
    )
    max_n: int = option(
        DEFAULT_LIMITS.max_n, "Largest 'n' (choices per prompt; more: 400). The default is OpenAI's own limit"
    )
    max_choices_per_request: int = option(
        DEFAULT_LIMITS.max_choices_per_request,
        "Most choices (prompts x n) in one request (more: 400). Each is a worker stream opened at once; the"
        " default, 256, is one mocker worker's whole batch (--max-num-seqs)",
    )
    max_inflight_requests: int = option(
        4096,
        "Most generation requests this frontend serves at once; more get 429 with Retry-After. The default keeps"
        " 16 workers of 256 sequences busy; past that, requests only queue in this process while each holds its"
        " body and streams",
    )
    no_tiktoken: bool = option(
        False,
        "Tokenize prompts with tokenizers only. By default a model whose tokenizer.json is byte-level BPE of a"
        " shape tiktoken can express (GPT-2, Llama 3, Qwen and alike) is tokenized by tiktoken, about 3x faster,"
        " after both agree on a check text; a sample of requests is compared with tokenizers and any difference"
        " turns it off",
    )
    model_cache_dir: str = option(
        "", "Where tokenizer files of served models are cached (empty: ~/.cache/commutator/frontend)"
    )
