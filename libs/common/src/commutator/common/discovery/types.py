"""What discovery stores: instances of endpoints and model cards (DESIGN.md 3)."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "Instance",
    "InstanceEvent",
    "InstanceInfo",
    "KeyEvent",
    "ModelCard",
    "ModelCardEvent",
    "WatchKind",
    "instance_key",
    "instance_prefix",
    "model_card_key",
    "model_card_prefix",
    "parse_instance_key",
]

_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_ENDPOINT = re.compile(r"^[A-Za-z0-9_-]+$")


def _check(kind: str, value: str, pattern: re.Pattern[str] = _NAME) -> None:
    if not pattern.match(value):
        raise ValueError(
            f"invalid {kind} name {value!r}: use letters, digits, '_' and '-' (names become NATS subject tokens)"
        )


def instance_prefix(namespace: str, component: str | None = None, endpoint: str | None = None) -> str:
    """The key prefix of every instance of ``namespace[/component[/endpoint]]``."""
    _check("namespace", namespace)
    if component is None:
        return f"/services/{namespace}/"
    _check("component", component)
    if endpoint is None:
        return f"/services/{namespace}/{component}/"
    _check("endpoint", endpoint, _ENDPOINT)
    return f"/services/{namespace}/{component}/{endpoint}-"


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    """``/services/{namespace}/{component}/{endpoint}-{instance_id:x}``."""
    return f"{instance_prefix(namespace, component, endpoint)}{instance_id:x}"


def parse_instance_key(key: str) -> tuple[str, str, str, int]:
    """``(namespace, component, endpoint, instance_id)`` of an instance key."""
    parts = key.split("/")
    if len(parts) != 5 or parts[0] or parts[1] != "services":
        raise ValueError(f"not an instance key: {key!r}")
    endpoint, sep, hex_id = parts[4].rpartition("-")
    if not sep:
        raise ValueError(f"instance key without an id: {key!r}")
    return parts[2], parts[3], endpoint, int(hex_id, 16)


def model_card_prefix(namespace: str) -> str:
    _check("namespace", namespace)
    return f"/models/{namespace}/"


def model_card_key(namespace: str, model: str, instance_id: int) -> str:
    """``/models/{namespace}/{model}/{instance_id:x}``: one card per publishing instance."""
    return f"{model_card_prefix(namespace)}{_escape_model(model)}/{instance_id:x}"


def unescape_model(escaped: str) -> str:
    return escaped.replace("%2F", "/").replace("%25", "%")


def _escape_model(model: str) -> str:
    # Model names such as "org/name" contain slashes; keys keep one level per part.
    if not model.strip():
        raise ValueError("model name must not be empty")
    return model.replace("%", "%25").replace("/", "%2F")


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """The JSON value of an instance key."""

    address: str
    role: str = ""
    model: str = ""
    block_size: int = 0
    kv_capacity_blocks: int = 0
    dp_size: int = 1
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> InstanceInfo:
        obj = json.loads(data)
        if not isinstance(obj, dict) or "address" not in obj:
            raise ValueError("instance value must be a JSON object with an address")
        known = {
            k: obj[k]
            for k in ("address", "role", "model", "block_size", "kv_capacity_blocks", "dp_size", "metadata")
            if k in obj
        }
        return cls(**known)


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered endpoint of one process."""

    namespace: str
    component: str
    endpoint: str
    instance_id: int
    info: InstanceInfo

    @property
    def key(self) -> str:
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)

    @classmethod
    def from_kv(cls, key: str, value: bytes) -> Instance:
        ns, comp, ep, iid = parse_instance_key(key)
        return cls(ns, comp, ep, iid, InstanceInfo.from_json(value))


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a frontend needs to serve a model it has never seen on disk.

    Large files (tokenizer.json can be megabytes, above etcd's value limit) are
    kept in the event plane's object store; ``artifacts`` maps a file name to
    its object name in bucket ``artifact_bucket``.
    """

    name: str
    block_size: int
    context_length: int
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    artifact_bucket: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelCard:
        obj = json.loads(data)
        if not isinstance(obj, dict) or "name" not in obj:
            raise ValueError("model card must be a JSON object with a name")
        obj["eos_token_ids"] = tuple(obj.get("eos_token_ids", ()))
        allowed = {
            "name",
            "block_size",
            "context_length",
            "chat_template",
            "eos_token_ids",
            "artifact_bucket",
            "artifacts",
            "metadata",
        }
        return cls(**{k: v for k, v in obj.items() if k in allowed})


class WatchKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """A change under a watched prefix. ``value`` is empty for deletions."""

    kind: WatchKind
    key: str
    value: bytes = b""


@dataclass(frozen=True, slots=True)
class InstanceEvent:
    kind: WatchKind
    instance: Instance


@dataclass(frozen=True, slots=True)
class ModelCardEvent:
    kind: WatchKind
    model: str
    instance_id: int
    card: ModelCard | None
    """The card; ``None`` on deletion."""
