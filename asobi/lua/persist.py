"""game.economy / game.leaderboard / game.storage: Lua arguments in, `{ok=...}`/`{error=...}` out.

The host side of the persistence calls.  Arguments arrive as Lua values; they are validated
here and handed to the match's current `UnitOfWork`.  Nothing raises into the match: every
refusal becomes `{error = code, message = text}`, and the calls that succeed return
`{ok = value}` (for a missing storage key or rank, `ok` is nil).  A Python exception must never
reach Lua: Lua would hand the script the exception object itself, a host object it could keep,
print or pass back.  `answer` is therefore the only entry point, and it converts the result too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from lupa.lua54 import LuaError

from asobi import names
from asobi.lua.convert import ConversionError, to_python
from asobi.store.errors import INVALID_ARGUMENT, TOO_LARGE, StoreError
from asobi.store.ops import GLOBAL_OWNER, MAX_BALANCE
from asobi.store.store import UnitOfWork

log = structlog.get_logger("asobi.persist")

MAX_AMOUNT = MAX_BALANCE
MAX_SCORE = 2**62
MAX_N = 100
MAX_REASON = 200


def _bad(message: str) -> StoreError:
    return StoreError(INVALID_ARGUMENT, message)


def _text(value: Any, what: str, rule: names.NameRule) -> str:
    if not rule.accepts(value):
        raise _bad(f"{what} must be a string matching {rule}")
    return value


def _pid(value: Any) -> str:
    return _text(value, "player_id", names.PLAYER_ID)


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{what} must be an integer")
    if not low <= value <= high:
        raise _bad(f"{what} must be between {low} and {high}")
    return value


def _reason(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_REASON:
        raise _bad(f"reason must be a string of at most {MAX_REASON} characters")
    return value


def _args(raw: tuple[Any, ...], count: int) -> list[Any]:
    values = [to_python(v, what=f"argument {i + 1}") for i, v in enumerate(raw[:count])]
    return values + [None] * (count - len(values))


def _ledger_entry(a: list[Any]) -> tuple[str, str, int, str | None]:
    """(player_id, currency, amount, reason), as grant and debit both take them."""
    return (
        _pid(a[0]),
        _text(a[1], "currency", names.CURRENCY),
        _int(a[2], "amount", 1, MAX_AMOUNT),
        _reason(a[3]),
    )


def _grant(w: UnitOfWork, a: list[Any]) -> Any:
    return w.grant(*_ledger_entry(a))


def _debit(w: UnitOfWork, a: list[Any]) -> Any:
    return w.debit(*_ledger_entry(a))


def _n(value: Any) -> int:
    return 10 if value is None else _int(value, "n", 1, MAX_N)


CALLS: dict[str, tuple[int, Callable[[UnitOfWork, list[Any]], Any]]] = {
    "economy.grant": (4, _grant),
    "economy.debit": (4, _debit),
    "economy.balance": (1, lambda w, a: w.balance(_pid(a[0]))),
    "leaderboard.submit": (
        3,
        lambda w, a: w.submit(
            _text(a[0], "board", names.BOARD),
            _pid(a[1]),
            _int(a[2], "score", -MAX_SCORE, MAX_SCORE),
        ),
    ),
    "leaderboard.top": (2, lambda w, a: w.top(_text(a[0], "board", names.BOARD), _n(a[1]))),
    "leaderboard.rank": (2, lambda w, a: w.rank(_text(a[0], "board", names.BOARD), _pid(a[1]))),
    "leaderboard.around": (
        3,
        lambda w, a: w.around(_text(a[0], "board", names.BOARD), _pid(a[1]), _n(a[2])),
    ),
    "storage.get": (
        2,
        lambda w, a: w.get(
            GLOBAL_OWNER,
            _text(a[0], "collection", names.COLLECTION),
            _text(a[1], "key", names.STORAGE_KEY),
        ),
    ),
    "storage.set": (
        3,
        lambda w, a: w.set(
            GLOBAL_OWNER,
            _text(a[0], "collection", names.COLLECTION),
            _text(a[1], "key", names.STORAGE_KEY),
            a[2],
        ),
    ),
    "storage.player_get": (
        3,
        lambda w, a: w.get(
            _pid(a[0]),
            _text(a[1], "collection", names.COLLECTION),
            _text(a[2], "key", names.STORAGE_KEY),
        ),
    ),
    "storage.player_set": (
        4,
        lambda w, a: w.set(
            _pid(a[0]),
            _text(a[1], "collection", names.COLLECTION),
            _text(a[2], "key", names.STORAGE_KEY),
            a[3],
        ),
    ),
}


def call(work: Callable[[], UnitOfWork], name: Any, raw: tuple[Any, ...]) -> dict[str, Any]:
    """Run one persistence call; `work` gives the callback's unit of work (created lazily)."""
    try:
        op = name.decode() if isinstance(name, bytes) else ""
        spec = CALLS.get(op)
        if spec is None:
            raise _bad(f"unknown persistence call {op[:64]!r}")
        count, fn = spec
        try:
            args = _args(raw, count)
        except ConversionError as exc:
            raise _bad(str(exc)) from None
        return {"ok": fn(work(), args)}
    except StoreError as exc:
        if exc.message == exc.code:
            return {"error": exc.code}
        return {"error": exc.code, "message": exc.message}


def answer(
    to_lua: Callable[[Any], Any],
    work: Callable[[], UnitOfWork],
    name: Any,
    raw: tuple[Any, ...],
    match_id: str,
) -> Any:
    """Run one persistence call and return its result as a Lua table; never raises.

    The value under `ok` is converted on its own, so the `{ok = ...}` wrapper does not count
    against the nesting limit: anything `storage.set` accepted comes back from `storage.get`.
    A stored value Lua cannot hold (deeper than the limit, an integer past 64 bits: written by
    hand or by an older server) is `{error = "too_large"}`.
    """
    try:
        result = call(work, name, raw)
    except Exception:
        log.exception("persist_failed", match_id=match_id, call=repr(name)[:80])
        result = {"error": "internal_error"}
    try:
        if "ok" not in result:
            return to_lua(result)
        table = to_lua({})
        try:
            table[b"ok"] = to_lua(result["ok"])
        except ConversionError as exc:
            return to_lua({"error": TOO_LARGE, "message": f"the stored value: {exc}"})
        return table
    except (LuaError, MemoryError):
        # The Lua state is out of memory: nil is all that can be handed back.
        return None
