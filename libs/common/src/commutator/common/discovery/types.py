"""What discovery stores: instances of endpoints and model cards (DESIGN.md 3)."""

from __future__ import annotations

import enum
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "ARTIFACT_NAME_MAX_BYTES",
    "Instance",
    "InstanceEvent",
    "InstanceInfo",
    "KeyEvent",
    "ModelCard",
    "ModelCardError",
    "ModelCardEvent",
    "WatchKind",
    "check_artifact_name",
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
    stream_port: int = 0
    """TCP port of the worker stream on the host of ``address`` (0: none; docs/worker-stream.md)."""
    token_bytes: bool = False
    """The instance reads a ``GenerateRequest``'s prompt from ``token_bytes`` (docs/worker-stream.md,
    "Prompts as bytes"); senders give the others ``token_ids``."""

    @property
    def stream_address(self) -> str:
        """``host:port`` of the worker stream over TCP, or "" when the instance offers none."""
        if self.stream_port <= 0:
            return ""
        host = self.address.rsplit(":", 1)[0]
        return f"{host}:{self.stream_port}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> InstanceInfo:
        obj = json.loads(data)
        if not isinstance(obj, dict) or "address" not in obj:
            raise ValueError("instance value must be a JSON object with an address")
        known = {
            k: obj[k]
            for k in (
                "address",
                "role",
                "model",
                "block_size",
                "kv_capacity_blocks",
                "dp_size",
                "metadata",
                "stream_port",
                "token_bytes",
            )
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


class ModelCardError(ValueError):
    """A model card that cannot be trusted: a field of the wrong type, or an unsafe artifact name."""


ARTIFACT_NAME_MAX_BYTES = 255
"""The longest artifact name, in UTF-8 bytes (NAME_MAX of common file systems)."""


def check_artifact_name(name: object) -> str:
    """``name`` if it is a plain file name, else :class:`ModelCardError` saying why.

    A plain file name is a non-empty string of at most :data:`ARTIFACT_NAME_MAX_BYTES`
    UTF-8 bytes with no path separator (``/`` or ``\\``, so never absolute), no
    NUL or other control character, and is neither ``.`` nor ``..``: joined to a
    folder it names a file directly inside that folder. Artifact names come
    from discovery, which any process with etcd access can write, so every
    reader of a card checks them before a name becomes a path.
    """
    if not isinstance(name, str):
        raise ModelCardError(f"artifact name {name!r:.80} is not a string")
    if name in ("", ".", ".."):
        why = "it is empty" if not name else f"{name!r} is not a file"
    elif "/" in name or "\\" in name:
        why = "it contains a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "it contains a NUL or control character"
    elif len(name.encode("utf-8", "surrogatepass")) > ARTIFACT_NAME_MAX_BYTES:
        why = f"it is longer than {ARTIFACT_NAME_MAX_BYTES} bytes"
    else:
        return name
    shown = repr(name) if len(name) <= 80 else f"{name[:64]!r}... ({len(name)} characters)"
    raise ModelCardError(f"artifact name {shown} is not a plain file name: {why}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class ModelCard:
    """What a frontend needs to serve a model it has never seen on disk.

    Large files (tokenizer.json can be megabytes, above etcd's value limit) are
    kept in the event plane's object store; ``artifacts`` maps a file name to
    its object name in bucket ``artifact_bucket``.

    A card read from discovery is untrusted input: :meth:`from_json` checks it
    with :meth:`validate`, so a card whose fields have the wrong types or whose
    artifact names are not plain file names never reaches a consumer.
    """

    name: str
    block_size: int
    context_length: int
    chat_template: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    artifact_bucket: str = ""
    artifacts: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ModelCard:
        """``self`` if every field has its type and every artifact name is a plain file name.

        Raises :class:`ModelCardError` (a ``ValueError``) naming the first bad field.
        ``block_size`` and ``context_length`` may be 0 (unknown).
        """
        if not isinstance(self.name, str) or not self.name.strip():
            raise ModelCardError(f"model card field 'name' must be a non-empty string, not {self.name!r}")
        for key in ("block_size", "context_length"):
            value = getattr(self, key)
            if not _is_int(value) or value < 0:
                raise ModelCardError(f"model card field {key!r} must be a non-negative integer, not {value!r}")
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ModelCardError(f"model card field 'chat_template' must be a string, not {self.chat_template!r}")
        if not isinstance(self.eos_token_ids, tuple) or not all(_is_int(t) for t in self.eos_token_ids):
            raise ModelCardError(f"model card field 'eos_token_ids' must be integers, not {self.eos_token_ids!r}")
        if not isinstance(self.artifact_bucket, str):
            raise ModelCardError(f"model card field 'artifact_bucket' must be a string, not {self.artifact_bucket!r}")
        if not isinstance(self.artifacts, dict):
            raise ModelCardError(f"model card field 'artifacts' must map file names to objects, not {self.artifacts!r}")
        for file_name, obj in self.artifacts.items():
            check_artifact_name(file_name)
            if not isinstance(obj, str) or not obj:
                raise ModelCardError(
                    f"model card field 'artifacts': the object of {file_name!r} must be a non-empty string, not {obj!r}"
                )
        if not isinstance(self.metadata, dict):
            raise ModelCardError(f"model card field 'metadata' must be a JSON object, not {self.metadata!r}")
        return self

    def to_json(self) -> bytes:
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ModelCard:
        """The card in ``data``, validated; ``ValueError`` (:class:`ModelCardError` for a bad card) otherwise.

        Unknown fields are ignored (a newer worker may publish more).
        """
        obj = json.loads(data)
        if not isinstance(obj, dict) or "name" not in obj:
            raise ModelCardError("model card must be a JSON object with a name")
        eos = obj.get("eos_token_ids", [])
        if not isinstance(eos, list):
            raise ModelCardError(f"model card field 'eos_token_ids' must be a list of integers, not {eos!r}")
        obj["eos_token_ids"] = tuple(eos)
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
        missing = {"block_size", "context_length"} - obj.keys()
        if missing:
            raise ModelCardError(f"model card lacks the field {sorted(missing)[0]!r}")
        return cls(**{k: v for k, v in obj.items() if k in allowed}).validate()


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
    """The card; ``None`` on deletion, and on a put of a card that was rejected (see ``error``)."""
    error: str | None = None
    """Why the card that was put could not be used (it never reaches ``card``)."""
