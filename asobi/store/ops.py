"""What the store writes, and the SQL that reads and writes it, shared by both backends.

Every database job is a generator that yields `(sql, params)` and receives the rows; a backend
runs it inside one transaction (`Backend.transact`).  Writing the logic once this way keeps
SQLite (a blocking driver on a worker thread) and PostgreSQL (asyncpg) on exactly the same
statements; SQL is written with `?` placeholders and each backend adapts them.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from asobi.store.migrations import CREATE_VERSIONS, LATEST, MIGRATIONS, SchemaTooNew

Rows = list[tuple[Any, ...]]
Job = Generator[tuple[str, tuple[Any, ...]], Rows, Any]

GLOBAL_OWNER = ""  # storage rows without a player (player ids are never empty)
# Balances and amounts are integers from 0 to 2^53 - 1: the largest range a JavaScript client
# reads exactly from JSON, and far inside both databases' 64-bit BIGINT, so that a sum of a
# balance and an amount can never overflow into SQLite's floating point or PostgreSQL's error.
MAX_BALANCE = 2**53 - 1


@dataclass(slots=True)
class LedgerOp:
    player_id: str
    currency: str
    delta: int
    reason: str | None
    match_id: str | None


@dataclass(slots=True)
class ScoreOp:
    board: str
    player_id: str
    score: int


@dataclass(slots=True)
class StorageOp:
    owner: str
    collection: str
    key: str
    value: str | None  # JSON text; None deletes


@dataclass(slots=True)
class MatchMark:
    """A unit of work of a match's tick, `(tick, seq)`, and the `count` writes of it that follow.

    It guards them in their transaction: the match's mark moves to this key only if it is past
    the mark, and the writes are applied only then.  So after a crash the mark says exactly
    which re-run units were already applied, and two processes running the same match for a
    while (one frozen past its heartbeat, then back) never both apply a tick's writes."""

    match_id: str
    tick: int
    seq: int
    count: int = 0


Op = LedgerOp | ScoreOp | StorageOp | MatchMark


def units_of(batch_ops: list[Op]) -> list[list[Op]]:
    """The ops one at a time, except a match's unit, which stays with its guarding mark."""
    out: list[list[Op]] = []
    left = 0
    for op in batch_ops:
        if left:
            out[-1].append(op)
            left -= 1
            continue
        out.append([op])
        if isinstance(op, MatchMark):
            left = op.count
    return out


@dataclass(slots=True)
class BatchResult:
    duplicate: bool = False
    ledger: int = 0
    conflicts: list[LedgerOp] = field(default_factory=list)
    over_max: list[LedgerOp] = field(default_factory=list)
    fenced: list[MatchMark] = field(default_factory=list)  # units applied by another run


def now_ms() -> int:
    return int(time.time() * 1000)


# -- schema ---------------------------------------------------------------------------------------
def migrate(dialect: str) -> Job:
    """Bring the schema to `LATEST`; returns the versions applied."""
    if dialect == "postgresql":
        # Two servers starting together must not both migrate.
        yield ("SELECT pg_advisory_xact_lock(7231001)", ())
    yield (CREATE_VERSIONS, ())
    rows = yield ("SELECT version FROM schema_migrations", ())
    done = {r[0] for r in rows}
    if done and max(done) > LATEST:
        raise SchemaTooNew(
            f"database schema is at version {max(done)}, this server knows up to {LATEST}"
        )
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.sql(dialect):
            yield (statement, ())
        yield (
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            (migration.version, migration.name, now_ms()),
        )
        applied.append(migration.version)
    return applied


# -- write-behind batches -------------------------------------------------------------------------
# A grant that would take the balance past MAX_BALANCE updates nothing and returns no row.
_GRANT = (
    "INSERT INTO wallets (player_id, currency, balance) VALUES (?, ?, ?) "
    "ON CONFLICT (player_id, currency) DO UPDATE SET balance = wallets.balance + excluded.balance "
    f"WHERE wallets.balance + excluded.balance <= {MAX_BALANCE} "
    "RETURNING balance"
)
_DEBIT = (
    "UPDATE wallets SET balance = balance - ? "
    "WHERE player_id = ? AND currency = ? AND balance >= ? RETURNING balance"
)
_LEDGER = (
    "INSERT INTO ledger (player_id, currency, delta, balance, reason, match_id, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SCORE = (
    "INSERT INTO leaderboard (board, player_id, score, updated_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (board, player_id) DO UPDATE SET score = excluded.score, "
    "updated_at = excluded.updated_at WHERE excluded.score > leaderboard.score"
)
_STORE = (
    "INSERT INTO storage (owner, collection, key, value, updated_at) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (owner, collection, key) DO UPDATE SET value = excluded.value, "
    "updated_at = excluded.updated_at"
)
_UNSTORE = "DELETE FROM storage WHERE owner = ? AND collection = ? AND key = ?"
_MARK = (
    "INSERT INTO match_marks (match_id, tick, seq) VALUES (?, ?, ?) "
    "ON CONFLICT (match_id) DO UPDATE SET tick = excluded.tick, seq = excluded.seq "
    "WHERE match_marks.tick < excluded.tick "
    "OR (match_marks.tick = excluded.tick AND match_marks.seq < excluded.seq) "
    "RETURNING match_id"
)


def apply_batch(
    batch_id: str, ops: list[Op], announce: Sequence[tuple[str, tuple[Any, ...]]] = ()
) -> Job:
    """Write one batch atomically.  A batch id seen before is skipped, so a retry after a lost
    commit acknowledgement never applies the same grants twice.  `announce` runs last, in the
    same transaction, so other servers hear of the batch exactly when it commits
    (`asobi.store.sync`)."""
    ts = now_ms()
    seen = yield (
        "INSERT INTO applied_batches (id, applied_at) VALUES (?, ?) "
        "ON CONFLICT (id) DO NOTHING RETURNING id",
        (batch_id, ts),
    )
    result = BatchResult()
    if not seen:
        result.duplicate = True
        return result
    skip = 0
    for op in ops:
        if skip:
            skip -= 1  # a write of a unit whose tick another run of the match applied
            continue
        if isinstance(op, MatchMark):
            if not (yield (_MARK, (op.match_id, op.tick, op.seq))):
                result.fenced.append(op)
                skip = op.count
            continue
        if isinstance(op, LedgerOp):
            if op.delta >= 0:
                rows = yield (_GRANT, (op.player_id, op.currency, op.delta))
            else:
                amount = -op.delta
                rows = yield (_DEBIT, (amount, op.player_id, op.currency, amount))
            if not rows:
                # The grant of a player whose balance was not in memory (not connected) would
                # pass the maximum; or another server wrote the same wallet and the database
                # refuses to go negative.  Either way nothing is written, and it is reported.
                (result.over_max if op.delta >= 0 else result.conflicts).append(op)
                continue
            yield (
                _LEDGER,
                (op.player_id, op.currency, op.delta, rows[0][0], op.reason, op.match_id, ts),
            )
            result.ledger += 1
        elif isinstance(op, ScoreOp):
            yield (_SCORE, (op.board, op.player_id, op.score, ts))
        elif op.value is None:
            yield (_UNSTORE, (op.owner, op.collection, op.key))
        else:
            yield (_STORE, (op.owner, op.collection, op.key, op.value, ts))
    for statement in announce:  # noqa: UP028 (`yield from` a list would fail on send(rows))
        yield statement
    if int(batch_id[-3:], 16) == 0:  # now and then, forget old batch ids
        yield ("DELETE FROM applied_batches WHERE applied_at < ?", (ts - 24 * 3600 * 1000,))
    return result


# -- reads ----------------------------------------------------------------------------------------
def load_player(player_id: str) -> Job:
    wallet = yield ("SELECT currency, balance FROM wallets WHERE player_id = ?", (player_id,))
    storage = yield (
        "SELECT collection, key, value FROM storage WHERE owner = ?",
        (player_id,),
    )
    return wallet, storage


def load_boards() -> Job:
    rows = yield (
        "SELECT board, player_id, score FROM leaderboard ORDER BY board, score DESC, updated_at",
        (),
    )
    return rows


def load_global_storage() -> Job:
    rows = yield ("SELECT collection, key, value FROM storage WHERE owner = ?", (GLOBAL_OWNER,))
    return rows


def load_global_keys(keys: Sequence[tuple[str, str]]) -> Job:
    """The current rows of these global keys (a key without a row was deleted)."""
    found = []
    for collection, key in keys:
        rows = yield (
            "SELECT collection, key, value FROM storage WHERE owner = ? AND collection = ? "
            "AND key = ?",
            (GLOBAL_OWNER, collection, key),
        )
        found.extend(rows)
    return found


def ledger(player_id: str, limit: int) -> Job:
    rows = yield (
        "SELECT id, currency, delta, balance, reason, match_id FROM ledger "
        "WHERE player_id = ? ORDER BY id LIMIT ?",
        (player_id, limit),
    )
    return rows


def load_marks() -> Job:
    """Every match's last committed unit of work: match id -> (tick, seq)."""
    rows = yield ("SELECT match_id, tick, seq FROM match_marks", ())
    return {match_id: (int(tick), int(seq)) for match_id, tick, seq in rows}


def ping() -> Job:
    rows = yield ("SELECT 1", ())
    return rows


# -- accounts -------------------------------------------------------------------------------------
def create_account(player_id: str, username: str, password_hash: str) -> Job:
    """True when created, False when the username (case-insensitively) is taken."""
    rows = yield (
        "INSERT INTO accounts (player_id, username, username_key, password_hash, created_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING RETURNING player_id",
        (player_id, username, username.lower(), password_hash, now_ms()),
    )
    return bool(rows)


def find_account(username: str) -> Job:
    rows = yield (
        "SELECT player_id, password_hash FROM accounts WHERE username_key = ?",
        (username.lower(),),
    )
    return rows[0] if rows else None


def update_hash(player_id: str, password_hash: str) -> Job:
    yield ("UPDATE accounts SET password_hash = ? WHERE player_id = ?", (password_hash, player_id))
    return None
