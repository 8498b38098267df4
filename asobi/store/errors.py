"""Errors persistence calls report to Lua and to clients, as stable short codes."""

from __future__ import annotations


class StoreError(Exception):
    """A persistence call that cannot be honoured; `code` is what Lua sees as `{error = code}`."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(message or code)
        self.code = code
        self.message = message or code


INSUFFICIENT_FUNDS = "insufficient_funds"
NOT_LOADED = "not_loaded"
UNAVAILABLE = "unavailable"
INVALID_ARGUMENT = "invalid_argument"
TOO_LARGE = "too_large"
NOT_CONFIGURED = "not_configured"


class BackendUnavailable(Exception):
    """The database could not be reached or refused the operation."""
