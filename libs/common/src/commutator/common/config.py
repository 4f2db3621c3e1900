"""Configuration: frozen dataclasses whose every field is a flag and one env var.

A service declares its settings as a frozen dataclass whose fields are made
with :func:`option`; fields may also be other such dataclasses (groups), whose
fields become flags of the same command line. Each field ``foo_bar`` is the
flag ``--foo-bar`` and the environment variable ``COMMUTATOR_FOO_BAR``. A flag
beats the variable, which beats the default. A boolean field is ``--foo`` /
``--no-foo``, except one named ``no_foo`` (default False), which is the single
switch ``--no-foo`` (``COMMUTATOR_NO_FOO=0`` is its way back). :func:`load` parses argv and the
environment into the frozen object; :func:`describe` gives the effective values
for the startup log.

    @dataclass(frozen=True, slots=True)
    class RouterConfig:
        runtime: RuntimeConfig = group(RuntimeConfig)
        overlap_weight: float = option(1.0, "Weight of cached blocks in the cost.")

    config = load(RouterConfig, prog="commutator.router")
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "describe",
    "env_var",
    "flag_name",
    "group",
    "load",
    "masked_repr",
    "option",
    "parser",
    "redact_urls",
]

ENV_PREFIX = "COMMUTATOR_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

C = TypeVar("C")


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message names flag and variable."""


def option(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    metavar: str | None = None,
    secret: bool = False,
) -> Any:
    """A config field: ``default``, a help text, optional allowed ``choices``.

    ``secret`` fields (passwords, tokens, keys) are shown as ``***`` by :func:`describe`, left out of the
    config object's ``repr``, and never quoted in error messages.
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "metavar": metavar, "secret": secret}
    if isinstance(default, list | dict | set):
        raise TypeError("config defaults must be immutable (use a tuple)")
    return dataclasses.field(default=default, metadata=meta, repr=not secret)


def group(cls: type[Any]) -> Any:
    """A field holding a nested config dataclass whose fields are flags too."""
    return dataclasses.field(default_factory=cls, metadata={"group": True})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_var(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _leaf_fields(cls: type[Any]) -> list[tuple[tuple[str, ...], dataclasses.Field[Any], Any]]:
    """(path, field, resolved type) for every non-group field, depth first."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):
            for path, sub, tp in _leaf_fields(hints[f.name]):
                out.append(((f.name, *path), sub, tp))
        else:
            out.append(((f.name,), f, hints[f.name]))
    return out


def _base_type(tp: Any) -> tuple[Any, bool]:
    """The scalar type of a field and whether ``None`` is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(raw: str, tp: Any, source: str, secret: bool = False) -> Any:
    base, optional = _base_type(tp)
    if optional and raw.strip().lower() in ("", "none"):
        return None
    try:
        if base is bool:
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if base is int:
            return int(raw, 0)
        if base is float:
            return float(raw)
        if base is str:
            return raw
        if typing.get_origin(base) is tuple:
            # tuple[int, ...] and the like: comma-separated, each item read as the element type.
            elem = (typing.get_args(base) or (str,))[0]
            return tuple(_convert(s.strip(), elem, source) for s in raw.split(",") if s.strip())
    except ValueError as exc:
        if secret:  # the exception's text may quote the value
            raise ConfigError(f"{source}: cannot read its value as {getattr(base, '__name__', base)}") from None
        raise ConfigError(f"{source}: cannot read {raw!r}: {exc}") from None
    raise TypeError(f"unsupported config type {tp!r}")


def parser(cls: type[Any], prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``cls`` (groups flattened)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description or (cls.__doc__ or "").strip().split("\n")[0] or None,
    )
    seen: set[str] = set()
    for path, f, tp in _leaf_fields(cls):
        name = path[-1]
        if name in seen:
            raise TypeError(f"config field {name!r} appears twice in {cls.__name__}")
        seen.add(name)
        base, _ = _base_type(tp)
        help_text = f"{f.metadata.get('help', '')} (default: {f.default!r}; env {env_var(name)})"
        kwargs: dict[str, Any] = {
            "dest": "__".join(path),
            "default": argparse.SUPPRESS,
            "help": help_text.replace("%", "%%"),
        }
        if base is bool and name.startswith("no_") and f.default is False:
            kwargs["action"] = "store_true"  # --no-foo alone; BooleanOptionalAction would add --no-no-foo
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = f.metadata.get("metavar") or name.upper()
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
        p.add_argument(flag_name(name), **kwargs)
    return p


def load(
    cls: type[C],
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    prog: str | None = None,
) -> C:
    """Build the frozen config ``cls`` from flags (``argv``) and the environment.

    Exits with a usage message (status 2) on an unknown flag or bad value, as
    command-line programs do.
    """
    p = parser(cls, prog=prog)
    ns = vars(p.parse_args(argv))
    env = os.environ if env is None else env
    try:
        return _build(cls, (), ns, env)
    except ConfigError as exc:
        p.error(str(exc))
        raise  # unreachable: p.error exits


def _build(cls: type[Any], prefix: tuple[str, ...], ns: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        if f.metadata.get("group"):
            values[f.name] = _build(hints[f.name], path, ns, env)
            continue
        tp = hints[f.name]
        key = "__".join(path)
        if key in ns:
            raw_value = ns[key]
            secret = bool(f.metadata.get("secret"))
            value = (
                raw_value if isinstance(raw_value, bool) else _convert(str(raw_value), tp, flag_name(f.name), secret)
            )
        elif env_var(f.name) in env:
            value = _convert(env[env_var(f.name)], tp, env_var(f.name), bool(f.metadata.get("secret")))
        else:
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{flag_name(f.name)} / {env_var(f.name)}: {value!r} is not one of {list(choices)}")
        values[f.name] = value
    return cls(**values)


def describe(config: Any) -> dict[str, Any]:
    """Flat ``{field: value}`` of a config (groups flattened), safe to log: ``secret`` fields show as
    ``***``, and so does the password of any URL with one (``nats://user:PASSWORD@host``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("group"):
            out.update(describe(value))
        elif f.metadata.get("secret") and value:
            out[f.name] = "***"
        elif isinstance(value, str):
            out[f.name] = redact_urls(value)
        elif isinstance(value, tuple):
            out[f.name] = tuple(redact_urls(v) if isinstance(v, str) else v for v in value)
        else:
            out[f.name] = value
    return out


def masked_repr(config: Any) -> str:
    """A config's ``repr`` with URL credentials masked and secrets as ``***``: the ``__repr__`` of a config
    class whose plain fields can hold credentials (URLs with ``user:password@``)."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("secret") and value:
            parts.append(f"{f.name}='***'")
        elif isinstance(value, str):
            parts.append(f"{f.name}={redact_urls(value)!r}")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(config).__name__}({', '.join(parts)})"


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:@/\s]*)(?::[^@/\s]*)?@")


def redact_urls(text: str) -> str:
    """``text`` with the credentials of every URL in it masked: ``nats://u:p@h`` -> ``nats://u:***@h``, and a
    bare token (``nats://TOKEN@h``) -> ``nats://***@h``."""
    if "@" not in text:
        return text

    def mask(m: re.Match[str]) -> str:
        has_password = m.group(0)[len(m.group("scheme")) + len(m.group("user")) :].startswith(":")
        user = m.group("user") if has_password else ""
        return f"{m.group('scheme')}{user + ':' if has_password else ''}***@"

    return _USERINFO.sub(mask, text)
