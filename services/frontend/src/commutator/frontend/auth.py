"""API keys for the OpenAI API (``--api-keys-file``): who may call ``/v1/*``, and how often.

Pure (no aiohttp, no asyncio): :func:`load_api_keys` reads the file into :class:`ApiKeys`,
whose :meth:`ApiKeys.check` takes the ``Authorization`` header and the time and says
whether the request may go on. The HTTP shell (``server.py``) turns a refusal into
401 / 429 in OpenAI's format.

The file, one key a line (blank lines and lines that start with ``#`` ignored)::

    # name    key                                   limit (optional)
    alice     sk-alice-0123456789abcdef              10/s
    batch     sk-batch-0123456789abcdef              600/m
    ci        sk-ci-0123456789abcdefgh

``name`` (letters, digits, ``._-``, up to 64) is what logs and metrics show, never
the key. ``key``: 16 to 256 printable ASCII characters, no spaces. ``limit``:
``N/s`` or ``N/m`` requests, a token bucket that holds ``N`` (at least 1) and
refills at that rate; absent: no limit. Names and keys are unique. Any other line
is a start-up error naming the file and line (not the key).

Keys are compared in constant time: the presented key is digested with
HMAC-SHA256 under a random per-process secret and the digest looked up; the
time taken depends on neither the key's content nor how much of it matches.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ApiKey", "ApiKeys", "ApiKeysError", "AuthResult", "TokenBucket", "load_api_keys", "parse_api_keys"]

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_KEY = re.compile(r"[\x21-\x7e]{16,256}")  # printable ASCII, no space
_LIMIT = re.compile(r"(\d+(?:\.\d+)?)/([sm])")
_PER_UNIT_S = {"s": 1.0, "m": 60.0}
_MAX_KEYS = 100_000


class ApiKeysError(ValueError):
    """The keys file cannot be used; the message names the file and line, never a key."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    key: str
    rate_per_s: float | None = None
    """Refill rate of the key's token bucket; ``None``: no limit."""
    burst: float = 0.0
    """Requests the bucket holds (``N`` of ``N/s`` or ``N/m``)."""

    def __repr__(self) -> str:  # never the key, whatever prints this
        return f"ApiKey(name={self.name!r}, rate_per_s={self.rate_per_s!r}, burst={self.burst!r})"


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; each request takes one. Time is passed in."""

    __slots__ = ("_last", "_tokens", "burst", "rate_per_s")

    def __init__(self, rate_per_s: float, burst: float, now: float) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._tokens = burst
        self._last = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken; otherwise the seconds until one will be there (none taken)."""
        elapsed = max(0.0, now - self._last)
        self._last = max(self._last, now)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate_per_s)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate_per_s


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome of :meth:`ApiKeys.check`: ``name`` of the key (None when none matched),
    ``retry_after_s`` > 0 when the key is over its limit."""

    name: str | None
    retry_after_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.name is not None and self.retry_after_s == 0.0


class ApiKeys:
    """The keys of one frontend process and their rate limits (buckets live as long as this object)."""

    def __init__(self, keys: Iterable[ApiKey], now: float = 0.0) -> None:
        self._secret = secrets.token_bytes(32)
        self._by_digest: dict[bytes, ApiKey] = {}
        self._buckets: dict[str, TokenBucket] = {}
        for k in keys:
            self._by_digest[self._digest(k.key.encode())] = k
            if k.rate_per_s is not None:
                self._buckets[k.name] = TokenBucket(k.rate_per_s, k.burst, now)
        self.names = tuple(sorted(k.name for k in self._by_digest.values()))

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:10]) + (f", ... ({len(self.names) - 10} more)" if len(self.names) > 10 else "")
        return f"ApiKeys({len(self)} keys: {shown})"

    def _digest(self, key: bytes) -> bytes:
        return hmac.new(self._secret, key, hashlib.sha256).digest()

    def identify(self, authorization: str | None) -> ApiKey | None:
        """The key an ``Authorization: Bearer <key>`` header carries, or None (absent, malformed, unknown)."""
        if not authorization:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return None
        presented = token.strip().encode("utf-8", "surrogateescape")
        # The lookup compares keyed digests, never key bytes: what an attacker can time reveals nothing
        # about a key (they cannot compute the digest of a guess without the per-process secret).
        return self._by_digest.get(self._digest(presented))

    def check(self, authorization: str | None, now: float) -> AuthResult:
        """Whether a request with this ``Authorization`` header may go on at time ``now`` (seconds)."""
        key = self.identify(authorization)
        if key is None:
            return AuthResult(None)
        bucket = self._buckets.get(key.name)
        wait = bucket.take(now) if bucket is not None else 0.0
        return AuthResult(key.name, wait)

    def carry_buckets_from(self, old: ApiKeys) -> None:
        """Keep the buckets of keys whose name and limit did not change (a reload must not reset limits)."""
        for name, bucket in self._buckets.items():
            prev = old._buckets.get(name)
            if prev is not None and (prev.rate_per_s, prev.burst) == (bucket.rate_per_s, bucket.burst):
                self._buckets[name] = prev


def _limit(text: str, where: str) -> tuple[float, float]:
    m = _LIMIT.fullmatch(text)
    if m is None:
        raise ApiKeysError(f"{where}: the limit must be N/s or N/m (requests per second or minute), got {text!r}")
    n = float(m.group(1))
    if not math.isfinite(n) or n <= 0 or n > 1e9:
        raise ApiKeysError(f"{where}: the limit must be a number of requests in (0, 1e9], got {text!r}")
    return n / _PER_UNIT_S[m.group(2)], max(1.0, n)


def parse_api_keys(text: str, source: str = "<keys>") -> list[ApiKey]:
    """The keys in ``text`` (the file format above); raises :class:`ApiKeysError` naming ``source`` and line."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{lineno}"
        parts = line.split()
        if len(parts) not in (2, 3):
            raise ApiKeysError(f"{where}: expected 'NAME KEY [LIMIT]', got {len(parts)} fields")
        name, key = parts[0], parts[1]
        if not _NAME.fullmatch(name):
            raise ApiKeysError(f"{where}: the name must be 1 to 64 letters, digits, '.', '_' or '-'")
        if not _KEY.fullmatch(key):
            # Never echo the key: its length says enough.
            raise ApiKeysError(
                f"{where}: the key of {name!r} must be 16 to 256 printable ASCII characters, got {len(key)} characters"
            )
        if name in names:
            raise ApiKeysError(f"{where}: the name {name!r} appears twice")
        if key in seen:
            raise ApiKeysError(f"{where}: the key of {name!r} is also the key of an earlier line")
        rate, burst = _limit(parts[2], where) if len(parts) == 3 else (None, 0.0)
        names.add(name)
        seen.add(key)
        keys.append(ApiKey(name, key, rate, burst))
        if len(keys) > _MAX_KEYS:
            raise ApiKeysError(f"{source}: more than {_MAX_KEYS} keys")
    if not keys:
        raise ApiKeysError(f"{source}: no keys (every /v1 request would be refused)")
    return keys


def load_api_keys(path: str | Path, now: float = 0.0) -> ApiKeys:
    """:class:`ApiKeys` from the file at ``path``; :class:`ApiKeysError` when it cannot be read or is invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ApiKeysError(f"cannot read the API keys file {str(path)!r}: {exc}") from None
    return ApiKeys(parse_api_keys(text, str(path)), now)
