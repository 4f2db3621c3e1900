"""Every secret setting of every role stays out of its start-up log line, its config dump and repr.

The secret fields are found from their ``secret=True`` marker, so a secret option added later is
covered without touching this test."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from commutator.common import config as cfg
from commutator.common.logging import _JsonFormatter, _TextFormatter, fields
from commutator.decode.config import DecodeConfig
from commutator.frontend.config import FrontendConfig
from commutator.prefill.config import PrefillConfig
from commutator.router.config import RouterServiceConfig

pytestmark = pytest.mark.unit

ROLES = [FrontendConfig, RouterServiceConfig, DecodeConfig, PrefillConfig]
URL_PASSWORD = "urlpass-5e1f"


def _secret_fields(cls: type[Any]) -> list[str]:
    return [path[-1] for path, f, _ in cfg._leaf_fields(cls) if f.metadata.get("secret")]


def _config_with_secrets(cls: type[Any]) -> tuple[Any, list[str]]:
    env = {}
    secrets = []
    for name in _secret_fields(cls):
        value = f"s3cret-{name}-7d2a"
        env[cfg.env_var(name)] = value
        secrets.append(value)
    env["COMMUTATOR_NATS_TOKEN"] = ""  # a token and a user are two ways: keep the user
    secrets.remove("s3cret-nats_token-7d2a")
    env["COMMUTATOR_ETCD_USERNAME"] = "commutator"
    env["COMMUTATOR_NATS_USER"] = "commutator"
    env["COMMUTATOR_NATS_URL"] = f"nats://someone:{URL_PASSWORD}@127.0.0.1:4222,tls://tok-{URL_PASSWORD}@h:1"
    return cfg.load(cls, [], env=env), [*secrets, URL_PASSWORD]


@pytest.mark.parametrize("cls", ROLES, ids=lambda c: c.__name__)
def test_every_secret_is_masked_in_the_startup_line_the_dump_and_repr(cls: type[Any]) -> None:
    assert {"etcd_password", "nats_password", "nats_token"} <= set(_secret_fields(cls))
    config, secrets = _config_with_secrets(cls)
    assert config.runtime.discovery.etcd_password == "s3cret-etcd_password-7d2a"  # set, so masking is tested
    described = cfg.describe(config)
    assert described["etcd_password"] == "***" and described["nats_password"] == "***"
    assert described["nats_url"] == "nats://someone:***@127.0.0.1:4222,tls://***@h:1"

    # The start-up line serve_role writes, in both log formats.
    record = logging.LogRecord("commutator", logging.INFO, __file__, 1, "starting %s", ("x",), None)
    record.__dict__.update(fields(**described))
    lines = [_TextFormatter().format(record), _JsonFormatter().format(record)]
    json.loads(lines[1])
    dumps = [*lines, repr(config), str(config), repr(described)]
    for dump in dumps:
        for secret in secrets:
            assert secret not in dump, f"{secret!r} shown in {dump[:200]}"


def test_a_secret_that_cannot_be_read_is_not_quoted(capsys: pytest.CaptureFixture[str]) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True, slots=True)
    class Numeric:
        pin: int = cfg.option(0, "a numeric secret", secret=True)

    with pytest.raises(SystemExit):
        cfg.load(Numeric, [], env={"COMMUTATOR_PIN": "hunter2"})
    err = capsys.readouterr().err
    assert "COMMUTATOR_PIN: cannot read its value" in err and "hunter2" not in err


def test_redact_urls() -> None:
    assert cfg.redact_urls("nats://u:p@h:1, nats://t@h:2, tls://h:3") == "nats://u:***@h:1, nats://***@h:2, tls://h:3"
    assert cfg.redact_urls("no url user@host") == "no url user@host"
