"""game.economy against a real server: transactional with the callback, never overdrawn."""

from __future__ import annotations

import asyncio

from tests.conftest import Logs, run_queue_wait, take_lateness
from tests.store_helpers import BANK, bank_player, call, send_only, state_where

FILES = {"bank.lua": BANK}


async def test_grant_debit_balance_and_ledger(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    assert await call(a, "balance") == {"ok": {}}
    assert await call(a, "grant", amount=100, reason="welcome") == {"ok": 100}
    assert await call(a, "debit", amount=30, reason="sword") == {"ok": 70}
    assert await call(a, "debit", amount=71) == {"error": "insufficient_funds"}
    assert await call(a, "grant", currency="gems", amount=5) == {"ok": 5}
    assert await call(a, "balance") == {"ok": {"gold": 70, "gems": 5}}
    # Bad arguments come back as errors, the match goes on.
    for bad in (0, -5, 1.5, "10", None):
        r = await call(a, "grant", amount=bad)
        assert r["error"] == "invalid_argument", (bad, r)
    assert (await call(a, "raw", a1="no spaces allowed", a2="gold", a3=1))["error"] == (
        "invalid_argument"
    )
    store = server.app.store
    await store.flush(5)
    rows = await store.ledger(a.player_id)
    assert [(r[1], r[2], r[3], r[4]) for r in rows] == [
        ("gold", 100, 100, "welcome"),
        ("gold", -30, 70, "sword"),
        ("gems", 5, 5, None),
    ]
    assert all(r[5] for r in rows)  # match id recorded


async def test_failed_callback_rolls_back_writes_with_state(start_server, logs: Logs) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    assert await call(a, "grant", amount=50) == {"ok": 50}
    before = (await a.states(1))[0]["done"]
    # The callback debits, then errors: the debit, its answer and the state change all vanish.
    await send_only(a, "debit", amount=20, fail=True)
    await logs.wait_for("callback_failed", lambda e: "failing on purpose" in e["error"])
    # Same with a callback that runs past its time budget after debiting.
    await send_only(a, "debit", amount=20, spin=True)
    await logs.wait_for("callback_failed", lambda e: "budget" in e["error"])
    assert await call(a, "balance") == {"ok": {"gold": 50}}
    state = (await a.states(1))[0]
    assert state["done"] == before + 1  # only the balance call above counted
    await server.app.store.flush(5)
    assert [r[2] for r in await server.app.store.ledger(a.player_id)] == [50]


async def test_two_matches_debiting_one_wallet_never_overdraw(start_server) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    b = await bank_player(server)
    assert a.player_id != b.player_id
    assert await call(a, "grant", amount=150) == {"ok": 150}
    # 100 debits of 1 from each match against the same 150 coins, 10 per tick, interleaved.
    await asyncio.gather(
        send_only(a, "drain", pid=a.player_id, count=100, per_tick=10),
        send_only(b, "drain", pid=a.player_id, count=100, per_tick=10),
    )
    sa, sb = await asyncio.gather(
        state_where(a, lambda s: s["left"] == 0), state_where(b, lambda s: s["left"] == 0)
    )
    ok = sa["drained"]["ok"] + sb["drained"]["ok"]
    refused = sa["drained"]["insufficient"] + sb["drained"]["insufficient"]
    assert (ok, refused) == (150, 50)
    assert sa["drained"]["other"] == sb["drained"]["other"] == 0
    assert sa["drained"]["ok"] > 0 and sb["drained"]["ok"] > 0  # both matches really debited
    assert await call(a, "balance") == {"ok": {"gold": 0}}
    store = server.app.store
    await store.flush(5)
    rows = await store.ledger(a.player_id)
    assert len(rows) == 151 and sum(r[2] for r in rows) == 0
    assert min(r[3] for r in rows) == 0  # the balance recorded after each entry never went below


async def test_database_outage_fails_calls_and_recovers(start_server, logs: Logs) -> None:
    server = await start_server(FILES)
    a = await bank_player(server)
    assert await call(a, "grant", amount=10) == {"ok": 10}
    store = server.app.store
    await store.flush(5)
    async with block_database(store):
        # Accepted before the outage is noticed; kept and written once the database is back.
        assert await call(a, "grant", amount=1) == {"ok": 11}
        await logs.wait_for("store_unavailable", timeout=10)
        r = await call(a, "grant", amount=1)
        assert r["error"] == "unavailable" and "unavailable" in r["message"]
        assert (await call(a, "balance")) == {"ok": {"gold": 11}}  # reads come from memory
        # The match kept ticking on time while the database hung (the server's own measure).
        take_lateness(server.app)
        waited = run_queue_wait()
        await a.states(10, timeout=2.0)
        lateness = take_lateness(server.app)
        stolen = max(run_queue_wait() - waited, 0.0)  # waiting for a CPU: 0 on an idle machine
        assert len(lateness) >= 9 and max(lateness) < 0.1 + stolen, (lateness, stolen)
    await logs.wait_for("store_recovered", timeout=10)
    assert await call(a, "grant", amount=1) == {"ok": 12}
    await store.flush(10)
    assert [r[3] for r in await store.ledger(a.player_id)] == [10, 11, 12]


class block_database:
    """Hold the database's write lock from another connection: writers time out."""

    def __init__(self, store) -> None:
        self.store = store
        self._release = None

    async def __aenter__(self) -> None:
        backend = self.store.backend
        if backend.dialect == "sqlite":
            import sqlite3

            conn = sqlite3.connect(backend.path, isolation_level=None)
            conn.execute("BEGIN EXCLUSIVE")

            async def release() -> None:
                conn.execute("ROLLBACK")
                conn.close()

        else:
            import asyncpg

            conn = await asyncpg.connect(backend.url)
            tx = conn.transaction()
            await tx.start()
            await conn.execute("LOCK TABLE wallets, applied_batches IN ACCESS EXCLUSIVE MODE")

            async def release() -> None:
                await tx.rollback()
                await conn.close()

        self._release = release

    async def __aexit__(self, *exc: object) -> None:
        await self._release()
