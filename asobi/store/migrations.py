"""Schema versions, applied in order at start.  Append new versions; never edit applied ones.

Each version is a list of statements per dialect.  The two dialects differ only where SQL does
(an auto-increment column); `{ID}` marks that spot.
"""

from __future__ import annotations

from dataclasses import dataclass

_ID = {
    "sqlite": "INTEGER PRIMARY KEY AUTOINCREMENT",
    "postgresql": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
}
_BLOB = {"sqlite": "BLOB", "postgresql": "BYTEA"}


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]

    def sql(self, dialect: str) -> list[str]:
        return [
            s.replace("{ID}", _ID[dialect]).replace("{BLOB}", _BLOB[dialect])
            for s in self.statements
        ]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "accounts, wallets, ledger, leaderboards, storage",
        (
            """CREATE TABLE accounts (
                player_id TEXT PRIMARY KEY,
                username TEXT NOT NULL,
                username_key TEXT NOT NULL UNIQUE,
                password_hash TEXT NOT NULL,
                created_at BIGINT NOT NULL)""",
            """CREATE TABLE wallets (
                player_id TEXT NOT NULL,
                currency TEXT NOT NULL,
                balance BIGINT NOT NULL CHECK (balance >= 0),
                PRIMARY KEY (player_id, currency))""",
            """CREATE TABLE ledger (
                id {ID},
                player_id TEXT NOT NULL,
                currency TEXT NOT NULL,
                delta BIGINT NOT NULL,
                balance BIGINT NOT NULL,
                reason TEXT,
                match_id TEXT,
                created_at BIGINT NOT NULL)""",
            "CREATE INDEX ledger_player ON ledger (player_id, id)",
            """CREATE TABLE leaderboard (
                board TEXT NOT NULL,
                player_id TEXT NOT NULL,
                score BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                PRIMARY KEY (board, player_id))""",
            """CREATE TABLE storage (
                owner TEXT NOT NULL,
                collection TEXT NOT NULL,
                key TEXT NOT NULL,
                value TEXT NOT NULL,
                updated_at BIGINT NOT NULL,
                PRIMARY KEY (owner, collection, key))""",
            """CREATE TABLE applied_batches (
                id TEXT PRIMARY KEY,
                applied_at BIGINT NOT NULL)""",
        ),
    ),
    Migration(
        2,
        "match journal (latest snapshot per match) and the last unit of work each match committed",
        (
            """CREATE TABLE match_journal (
                match_id TEXT PRIMARY KEY,
                tick BIGINT NOT NULL,
                saved_at BIGINT NOT NULL,
                meta TEXT NOT NULL,
                state {BLOB} NOT NULL)""",
            """CREATE TABLE match_marks (
                match_id TEXT PRIMARY KEY,
                tick BIGINT NOT NULL,
                seq BIGINT NOT NULL)""",
        ),
    ),
    Migration(
        3,
        "recorded matches for replay: first snapshot, one row per tick, script sources by hash",
        (
            """CREATE TABLE match_records (
                match_id TEXT PRIMARY KEY,
                started_at BIGINT NOT NULL,
                meta TEXT NOT NULL,
                state {BLOB} NOT NULL,
                ended_tick BIGINT,
                result TEXT)""",
            """CREATE TABLE match_record_ticks (
                match_id TEXT NOT NULL,
                tick BIGINT NOT NULL,
                body {BLOB} NOT NULL,
                PRIMARY KEY (match_id, tick))""",
            """CREATE TABLE script_sources (
                hash TEXT PRIMARY KEY,
                name TEXT NOT NULL,
                source {BLOB} NOT NULL)""",
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

CREATE_VERSIONS = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL)"""


class SchemaTooNew(Exception):
    """The database was migrated by a newer server than this one."""
