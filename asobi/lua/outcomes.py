"""What budgeted Lua calls hand back to the host, as Python values (`asobi.lua.runtime`).

A call never raises into the engine: it succeeds with values or fails with a message.  These are
the shapes of those outcomes and the conversions of what Lua returned into them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from asobi.lua.convert import ConversionError, to_python

_MAX_ERROR_CHARS = 2000

# `MatchLua.call_each` per id: (data, None, None), (None, JSON text, None) or (None, None, error).
EachResult = tuple[Any, bytes | None, str | None]


class CallResult(NamedTuple):
    """Outcome of one budgeted call: `values` on success, `error` (a message) on failure.

    A named tuple: one is made per Lua call (every tick and input), and it is built in less
    than half the time of a frozen dataclass."""

    ok: bool
    values: tuple[Any, ...] = ()
    error: str = ""

    @property
    def value(self) -> Any:
        return self.values[0] if self.values else None


class InputsResult(NamedTuple):
    """What `MatchLua.call_inputs` did: `made` calls (0: no budget left for one), the expected
    cost of the next call, the state after the last call that succeeded, the last call's
    outcome."""

    made: int
    peak: float
    state: Any
    last: CallResult


def call_result(out: tuple[Any, ...]) -> CallResult:
    """What B.call returned (true, results... or false, message) as a CallResult."""
    if out[0] is True:
        return CallResult(True, out[1:])
    return CallResult(False, error=error_text(out[1] if len(out) > 1 else b"unknown error"))


def error_text(raw: Any) -> str:
    """Lua error messages arrive as bytes; keep them readable and bounded."""
    if isinstance(raw, bytes):
        text = raw.decode(errors="replace")
    elif isinstance(raw, BaseException):
        text = error_text(raw.args[0]) if raw.args else type(raw).__name__
    else:
        text = str(raw)
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + "... (truncated)"
    return text


def each_results(out: tuple[Any, ...], start: int, what: str) -> list[EachResult]:
    """`B.call_each`'s results from `out[start:]` (per id: true, value; ENCODED, JSON text; or
    false, message), values converted to plain data named `what` in errors."""
    results: list[EachResult] = []
    for pos in range(start, len(out), 2):
        outcome = out[pos]
        if outcome is True:
            try:
                results.append((to_python(out[pos + 1], what=what), None, None))
            except (ConversionError, TypeError) as exc:
                results.append((None, None, str(exc)))
        elif outcome is False:
            results.append((None, None, error_text(out[pos + 1])))
        else:  # ENCODED: the result's JSON text
            results.append((None, out[pos + 1], None))
    return results
