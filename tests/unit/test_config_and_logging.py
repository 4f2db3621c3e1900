from __future__ import annotations

import io
import json
import logging
from dataclasses import FrozenInstanceError, dataclass

import pytest
from commutator.common.config import ConfigError, describe, group, load, option
from commutator.common.logging import TRACE, LogSpecError, fields, parse_spec, setup_logging

pytestmark = pytest.mark.unit


@dataclass(frozen=True, slots=True)
class Inner:
    etcd_endpoints: tuple[str, ...] = option(("127.0.0.1:2379",), "etcd endpoints")
    lease_ttl_s: int = option(5, "lease TTL")


@dataclass(frozen=True, slots=True)
class Service:
    inner: Inner = group(Inner)
    http_port: int = option(8000, "HTTP port")
    overlap_weight: float = option(1.0, "weight")
    router_mode: str = option("kv", "mode", choices=("kv", "random"))
    use_tls: bool = option(False, "TLS")
    api_key: str = option("", "key", secret=True)
    tls_cert_path: str | None = option(None, "certificate")


def test_defaults_env_and_flags_in_that_order() -> None:
    assert load(Service, [], env={}) == Service()
    env = {
        "COMMUTATOR_HTTP_PORT": "9000",
        "COMMUTATOR_LEASE_TTL_S": "7",
        "COMMUTATOR_USE_TLS": "yes",
        "COMMUTATOR_ETCD_ENDPOINTS": "a:1, b:2",
    }
    c = load(Service, [], env=env)
    assert (c.http_port, c.inner.lease_ttl_s, c.use_tls, c.inner.etcd_endpoints) == (9000, 7, True, ("a:1", "b:2"))
    c = load(
        Service,
        ["--http-port", "9100", "--no-use-tls", "--router-mode", "random", "--tls-cert-path", "/x.pem"],
        env=env,
    )
    assert (c.http_port, c.use_tls, c.router_mode, c.tls_cert_path) == (9100, False, "random", "/x.pem")
    with pytest.raises(FrozenInstanceError):
        c.http_port = 1  # type: ignore[misc]


@dataclass(frozen=True, slots=True)
class Lists:
    eos_token_ids: tuple[int, ...] = option((), "ids")
    weights: tuple[float, ...] = option((1.0,), "weights")


def test_tuple_items_are_read_as_their_element_type(capsys: pytest.CaptureFixture[str]) -> None:
    c = load(Lists, ["--eos-token-ids", "2, 0x10", "--weights", "0.5,2"], env={})
    assert c.eos_token_ids == (2, 16) and c.weights == (0.5, 2.0)
    assert load(Lists, [], env={"COMMUTATOR_WEIGHTS": "3"}).weights == (3.0,)
    with pytest.raises(SystemExit):
        load(Lists, ["--weights", "1,x"], env={})
    assert "cannot read 'x'" in capsys.readouterr().err


def test_bad_values_exit_with_a_message_naming_flag_and_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        load(Service, [], env={"COMMUTATOR_HTTP_PORT": "eighty"})
    assert e.value.code == 2
    assert "COMMUTATOR_HTTP_PORT: cannot read 'eighty'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load(Service, [], env={"COMMUTATOR_ROUTER_MODE": "fastest"})
    assert "is not one of ['kv', 'random']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load(Service, ["--router-mode", "fastest"], env={})
    with pytest.raises(SystemExit):
        load(Service, ["--no-such-flag"], env={})


def test_describe_flattens_and_hides_secrets() -> None:
    d = describe(load(Service, ["--api-key", "s3cret"], env={}))
    assert d["api_key"] == "***" and d["lease_ttl_s"] == 5 and d["http_port"] == 8000


def test_every_flag_has_help_with_its_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load(Service, ["--help"], env={})
    out = capsys.readouterr().out
    for flag, env in [("--http-port", "COMMUTATOR_HTTP_PORT"), ("--lease-ttl-s", "COMMUTATOR_LEASE_TTL_S")]:
        assert flag in out and env in out


@dataclass(frozen=True, slots=True)
class Switches:
    kv_events: bool = option(True, "events")
    no_uvloop: bool = option(False, "asyncio's loop")


def test_a_no_field_is_one_switch_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    assert load(Switches, [], env={}) == Switches()
    assert load(Switches, ["--no-uvloop", "--no-kv-events"], env={}) == Switches(kv_events=False, no_uvloop=True)
    assert load(Switches, [], env={"COMMUTATOR_NO_UVLOOP": "1"}).no_uvloop is True
    assert load(Switches, [], env={"COMMUTATOR_NO_UVLOOP": "0"}).no_uvloop is False
    with pytest.raises(SystemExit):
        load(Switches, ["--no-no-uvloop"], env={})
    capsys.readouterr()
    with pytest.raises(SystemExit):
        load(Switches, ["--help"], env={})
    out = capsys.readouterr().out
    assert "--no-uvloop" in out and "COMMUTATOR_NO_UVLOOP" in out and "--no-no-uvloop" not in out
    assert "--kv-events, --no-kv-events" in out


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_log_spec_parsing() -> None:
    assert parse_spec("info") == (logging.INFO, {})
    assert parse_spec("debug,commutator.router=trace") == (logging.DEBUG, {"commutator.router": TRACE})
    assert parse_spec("commutator.frontend=warning") == (logging.INFO, {"commutator.frontend": logging.WARNING})
    with pytest.raises(LogSpecError, match="unknown log level 'loud'"):
        parse_spec("loud")


def test_structured_text_and_json_lines() -> None:
    buf = io.StringIO()
    setup_logging("info,commutator.test=debug", "text", stream=buf)
    log = logging.getLogger("commutator.test")
    log.debug("registered", extra=fields(key="/services/a", lease="1f"))
    logging.getLogger("commutator.quiet").debug("hidden")
    assert "DEBUG commutator.test: registered key=/services/a lease=1f" in buf.getvalue()
    assert "hidden" not in buf.getvalue()
    buf = io.StringIO()
    setup_logging("info", "json", stream=buf)
    logging.getLogger("commutator.test").warning("drained", extra=fields(in_flight=3))
    line = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert (line["level"], line["msg"], line["in_flight"]) == ("warning", "drained", 3)
    setup_logging("info", "text")
