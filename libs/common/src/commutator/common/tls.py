"""Mutual TLS between Commutator's roles (docs/security.md).

One set of files serves every connection a process makes or accepts between roles: its gRPC
server and channels, and the worker stream over TCP. Each process presents ``--mtls-cert`` (as a
server, and as a client), and accepts a peer only with a certificate that chains to ``--mtls-ca``:
servers require client certificates. A client checks the server's certificate for the host it
dials (workers advertise IP addresses, so their certificates carry IP SANs), or for
``--mtls-server-name`` when given (every server's certificate carrying that one DNS name).

The three files go together: all set, TLS on; none set, plaintext. They are read and checked once,
at start-up (:func:`load_tls`, :class:`StartupError` naming the flag on a missing, unreadable or
invalid file). The plaintext path holds no TLS object and checks nothing per message.

:func:`client_ssl_context` builds the client side of TLS to etcd and NATS from their own flags.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc
from commutator.common.config import ConfigError, env_var, flag_name, option
from commutator.common.errors import StartupError

__all__ = ["MtlsConfig", "MutualTls", "client_ssl_context", "load_tls", "open_channel", "read_file"]


@dataclass(frozen=True, slots=True)
class MtlsConfig:
    """Mutual TLS between the roles (gRPC and the worker stream)."""

    mtls_cert: str = option(
        "",
        "PEM certificate (chain) this process presents as server and as client; with --mtls-key and --mtls-ca "
        "(all three or none: none means plaintext)",
        metavar="PATH",
    )
    mtls_key: str = option("", "PEM private key of --mtls-cert (not encrypted)", metavar="PATH")
    mtls_ca: str = option(
        "", "PEM CA certificate(s) every peer's certificate (servers' and clients') must chain to", metavar="PATH"
    )
    mtls_server_name: str = option(
        "",
        "Name checked in every server's certificate instead of the host dialled (default: the advertised host "
        "or IP, which the certificate must carry as a SAN)",
        metavar="NAME",
    )

    def __post_init__(self) -> None:
        given = [n for n in ("mtls_cert", "mtls_key", "mtls_ca") if getattr(self, n)]
        if given and len(given) < 3:
            missing = [n for n in ("mtls_cert", "mtls_key", "mtls_ca") if n not in given]
            raise ConfigError(
                f"mutual TLS needs --mtls-cert, --mtls-key and --mtls-ca together: "
                f"{', '.join(flag_name(n) for n in given)} given without "
                f"{', '.join(f'{flag_name(n)} / {env_var(n)}' for n in missing)}"
            )
        if self.mtls_server_name and not given:
            raise ConfigError("--mtls-server-name needs --mtls-cert, --mtls-key and --mtls-ca (it is off without them)")

    @property
    def enabled(self) -> bool:
        return bool(self.mtls_cert)


def read_file(path: str, flag: str) -> bytes:
    """The bytes of ``path``, or :class:`StartupError` naming ``flag``."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"{flag} {path}: cannot read: {exc.strerror or exc}") from None
    if not data.strip():
        raise StartupError(f"{flag} {path}: the file is empty")
    return data


def _no_password() -> str:
    return ""  # an encrypted key then fails to load (instead of prompting on a terminal)


def _load_chain(ctx: ssl.SSLContext, cert: str, key: str, cert_flag: str, key_flag: str) -> None:
    read_file(cert, cert_flag)
    read_file(key, key_flag)
    try:
        ctx.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        raise StartupError(
            f"{cert_flag} {cert} / {key_flag} {key}: not a PEM certificate and its (unencrypted) private key, "
            f"or they do not match: {exc.reason or exc}"
        ) from None


def _load_ca(ctx: ssl.SSLContext, ca: str, flag: str) -> None:
    data = read_file(ca, flag)
    try:
        ctx.load_verify_locations(cadata=data.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise StartupError(f"{flag} {ca}: no PEM CA certificate in it: {exc}") from None


def client_ssl_context(ca: str, cert: str, key: str, *, what: str, flags: tuple[str, str, str]) -> ssl.SSLContext:
    """A client-side context that checks the server against ``ca`` (the system's CAs when empty) and the
    host name, presenting ``cert``/``key`` when given. ``flags`` name (ca, cert, key) in errors."""
    ca_flag, cert_flag, key_flag = flags
    if bool(cert) != bool(key):
        raise StartupError(f"{what}: {cert_flag} and {key_flag} go together")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(ctx, ca, ca_flag)
    if cert:
        _load_chain(ctx, cert, key, cert_flag, key_flag)
    return ctx


class MutualTls:
    """The loaded certificates of :class:`MtlsConfig`: gRPC credentials and SSL contexts for both sides.

    Built once by :func:`load_tls`; immutable, shared by every server and client of the process."""

    def __init__(self, config: MtlsConfig) -> None:
        flags = tuple(flag_name(n) for n in ("mtls_cert", "mtls_key", "mtls_ca"))
        self.server_name = config.mtls_server_name
        self._cert = read_file(config.mtls_cert, flags[0])
        self._key = read_file(config.mtls_key, flags[1])
        self._ca = read_file(config.mtls_ca, flags[2])
        # The stdlib contexts check the files (PEM, key matching the certificate, CA readable) with clear errors,
        # before gRPC, which reports bad files only as failed handshakes later.
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.minimum_version = ssl.TLSVersion.TLSv1_2
        server.verify_mode = ssl.CERT_REQUIRED
        _load_chain(server, config.mtls_cert, config.mtls_key, flags[0], flags[1])
        _load_ca(server, config.mtls_ca, flags[2])
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED by default
        client.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_chain(client, config.mtls_cert, config.mtls_key, flags[0], flags[1])
        _load_ca(client, config.mtls_ca, flags[2])
        self.server_ssl = server
        """For servers of the worker stream: requires a client certificate from the CA."""
        self.client_ssl = client
        """For clients of the worker stream: checks the server against the CA and :meth:`server_hostname`."""

    def server_hostname(self, host: str) -> str:
        """The name a client checks in the certificate of the server it reaches at ``host``."""
        return self.server_name or host

    def server_credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials that require and verify a client certificate."""
        return grpc.ssl_server_credentials(
            [(self._key, self._cert)], root_certificates=self._ca, require_client_auth=True
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials presenting this process's certificate."""
        return grpc.ssl_channel_credentials(
            root_certificates=self._ca, private_key=self._key, certificate_chain=self._cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options: the server-name override, when configured."""
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def __repr__(self) -> str:
        return f"MutualTls(server_name={self.server_name!r})"


def load_tls(config: MtlsConfig) -> MutualTls | None:
    """The loaded certificates, or None when TLS is off; :class:`StartupError` on bad files."""
    return MutualTls(config) if config.enabled else None


def open_channel(address: str, tls: MutualTls | None, options: list[tuple[str, object]]) -> grpc.aio.Channel:
    """A ``grpc.aio`` channel to ``address``: over mutual TLS when ``tls`` is set, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=[*options, *tls.channel_options()])
