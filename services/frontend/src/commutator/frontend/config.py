"""Settings of the frontend."""

from __future__ import annotations

from dataclasses import dataclass

from commutator.common.config import group, option
from commutator.common.runtime import RuntimeConfig
from commutator.router.config import RouterConfig

__all__ = ["FrontendConfig"]


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    """The OpenAI-compatible HTTP frontend (with the router embedded, or in front of a router service)."""

    runtime: RuntimeConfig = group(RuntimeConfig)
    router: RouterConfig = group(RouterConfig)
    http_host: str = option("0.0.0.0", "Interface the HTTP server binds")
    http_port: int = option(8000, "HTTP port of the OpenAI API")
    tls_cert_path: str = option("", "TLS certificate (PEM); with --tls-key-path the API is served over HTTPS")
    tls_key_path: str = option("", "TLS private key (PEM)")
    router_endpoint: str = option(
        "", "Discovery component of a standalone router service to send requests to (empty: route in-process)"
    )
    drain_grace_s: float = option(30.0, "On SIGTERM, how long in-flight requests may take to finish")
    max_body_bytes: int = option(8 * 1024 * 1024, "Largest accepted request body; larger ones get 413")
    model_cache_dir: str = option(
        "", "Where tokenizer files of served models are cached (empty: ~/.cache/commutator/frontend)"
    )
