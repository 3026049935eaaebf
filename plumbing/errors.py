"""What a caller of kubegate is told when a request does not go through."""

from __future__ import annotations


class KubegateError(Exception):
    """A request kubegate refused or could not carry out; the message says why."""


class RequestRefused(KubegateError):
    """The request was refused before anything started (wrong state, invalid change)."""
