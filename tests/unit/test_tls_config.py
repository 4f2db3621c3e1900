"""TLS settings: flags that go together, and files that are missing, unreadable or invalid, each
refused at start-up with the flag named (docs/security.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from commutator.common import config as cfg
from commutator.common.discovery import DiscoveryConfig, etcd_credentials
from commutator.common.errors import StartupError
from commutator.common.events import EventPlaneConfig, nats_ssl_context
from commutator.common.runtime import RuntimeConfig
from commutator.common.tls import MtlsConfig, load_tls

pytestmark = pytest.mark.unit


def test_tls_is_off_without_files_and_needs_all_three(capsys: pytest.CaptureFixture[str]) -> None:
    assert load_tls(MtlsConfig()) is None
    with pytest.raises(SystemExit) as e:
        cfg.load(RuntimeConfig, ["--mtls-cert", "a.pem", "--mtls-key", "a.key"], env={})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--mtls-cert, --mtls-key and --mtls-ca together" in err and "--mtls-ca / COMMUTATOR_MTLS_CA" in err
    with pytest.raises(SystemExit):
        cfg.load(RuntimeConfig, ["--mtls-server-name", "x"], env={})
    assert "--mtls-server-name needs" in capsys.readouterr().err


def test_credentials_that_go_together(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, message in [
        (["--etcd-username", "u"], "--etcd-username and --etcd-password"),
        (["--etcd-cert", "c.pem"], "--etcd-cert and --etcd-key"),
        (["--nats-user", "u"], "--nats-user and --nats-password"),
        (["--nats-key", "k.pem"], "--nats-cert and --nats-key"),
    ]:
        with pytest.raises(SystemExit):
            cfg.load(RuntimeConfig, argv, env={})
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cfg.load(RuntimeConfig, ["--nats-user", "u", "--nats-token", "t"], env={"COMMUTATOR_NATS_PASSWORD": "p"})
    assert "give one" in capsys.readouterr().err


def _with(pki: Any, **changes: str) -> MtlsConfig:
    base = {"mtls_cert": pki.server_cert, "mtls_key": pki.server_key, "mtls_ca": pki.ca}
    return MtlsConfig(**{**base, **changes})


def test_good_files_load(pki: Any) -> None:
    tls = load_tls(_with(pki))
    assert tls is not None
    assert tls.server_hostname("127.0.0.1") == "127.0.0.1" and tls.channel_options() == []
    named = load_tls(_with(pki, mtls_server_name="commutator.test"))
    assert named is not None and named.server_hostname("10.0.0.7") == "commutator.test"
    assert named.channel_options() == [("grpc.ssl_target_name_override", "commutator.test")]


def test_bad_files_are_refused_naming_the_flag(pki: Any, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    unreadable = tmp_path / "unreadable.pem"
    unreadable.write_text(Path(pki.ca).read_text())
    unreadable.chmod(0)
    cases = [
        (_with(pki, mtls_cert=str(tmp_path / "missing.pem")), "--mtls-cert", "cannot read"),
        (_with(pki, mtls_key=str(empty)), "--mtls-key", "empty"),
        (_with(pki, mtls_cert=str(garbage)), "--mtls-cert", "not a PEM certificate"),
        (_with(pki, mtls_key=pki.client_key), "--mtls-key", "do not match"),  # another certificate's key
        (_with(pki, mtls_ca=str(garbage)), "--mtls-ca", "no PEM CA certificate"),
    ]
    import os

    if os.geteuid() != 0:  # root reads anything
        cases.append((_with(pki, mtls_ca=str(unreadable)), "--mtls-ca", "cannot read"))
    for config, flag, why in cases:
        with pytest.raises(StartupError) as e:
            load_tls(config)
        assert flag in str(e.value) and why in str(e.value), str(e.value)


def test_etcd_and_nats_tls_files_are_checked(pki: Any, tmp_path: Path) -> None:
    assert etcd_credentials(DiscoveryConfig()) is None
    assert etcd_credentials(DiscoveryConfig(etcd_ca=pki.ca, etcd_cert=pki.client_cert, etcd_key=pki.client_key))
    with pytest.raises(StartupError, match=r"--etcd-ca .*cannot read"):
        etcd_credentials(DiscoveryConfig(etcd_ca=str(tmp_path / "nope.pem")))
    assert nats_ssl_context(EventPlaneConfig()) is None
    ctx = nats_ssl_context(EventPlaneConfig(nats_ca=pki.ca))
    assert ctx is not None and ctx.check_hostname
    with pytest.raises(StartupError, match=r"--nats-cert .*--nats-key .*do not match"):
        nats_ssl_context(EventPlaneConfig(nats_ca=pki.ca, nats_cert=pki.client_cert, nats_key=pki.server_key))


def test_etcd_endpoints_with_credentials_are_refused_without_echoing_them() -> None:
    from commutator.common.discovery import EtcdBackend

    with pytest.raises(ValueError) as e:
        EtcdBackend(["http://root:hunter2@127.0.0.1:2379"])
    assert "hunter2" not in str(e.value) and "--etcd-password" in str(e.value)
