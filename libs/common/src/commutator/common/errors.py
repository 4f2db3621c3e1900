"""Typed errors of Commutator, mapped to gRPC status codes once, at the wire.

Servers raise these (or return expected outcomes as values); clients get these
back from :mod:`commutator.common.grpc` instead of raw gRPC errors, so callers
never inspect status codes themselves.
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "CommutatorError",
    "DeadlineExceeded",
    "InstanceNotFound",
    "InvalidRequest",
    "NoInstances",
    "NotFound",
    "Overloaded",
    "RemoteError",
    "StartupError",
    "Unavailable",
    "Unsupported",
]


class CommutatorError(Exception):
    """Base of every typed error. ``code`` names the gRPC status it travels as."""

    code = "INTERNAL"
    unanswered = False
    """Set on an error of a gRPC call that no server answered: the peer could not be reached or its
    connection broke (its process died, say), as opposed to an error the server's code returned
    (:data:`ERROR_TRAILER`)."""


ERROR_TRAILER = "commutator-error"
"""Trailing metadata key a Commutator server puts on every error it returns (its error class), so that
a client can tell an answer from a broken connection (:attr:`CommutatorError.unanswered`)."""


class InvalidRequest(CommutatorError):
    """The caller sent something that can never succeed (bad token ids, bad values)."""

    code = "INVALID_ARGUMENT"


class NotFound(CommutatorError):
    """The named thing (request id, model, worker) does not exist."""

    code = "NOT_FOUND"


class Overloaded(CommutatorError):
    """The server is at capacity; the caller may retry elsewhere or later."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(CommutatorError):
    """The peer cannot be reached (down, draining, network)."""

    code = "UNAVAILABLE"


class NoInstances(Unavailable):
    """No instance of the endpoint is registered in discovery."""


class InstanceNotFound(NotFound):
    """A call addressed an instance id that is not (or no longer) registered."""


class DeadlineExceeded(CommutatorError):
    """The call's deadline passed before it completed."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(CommutatorError):
    """The call was cancelled (by the peer or locally)."""

    code = "CANCELLED"


class Unsupported(CommutatorError):
    """The peer does not implement this (e.g. a cache dump from an engine that cannot give one)."""

    code = "UNIMPLEMENTED"


class StartupError(Exception):
    """A role cannot start (an unusable model, an engine that is not installed, refused arguments).

    Not a wire error: the process prints the message, one line, and exits 1 before it registers.
    """


class RemoteError(CommutatorError):
    """The peer failed the call with an unexpected status (a bug or a fault there)."""

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code
