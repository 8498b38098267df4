"""Exactly once across processes, in the database itself: a unit of a match's tick is applied
only if the match's mark in the same transaction moves past the unit's key.  Two runs of one
match (a process frozen past its heartbeat and another that adopted the match meanwhile) may
both commit tick 8: whichever commits second finds the mark there and applies nothing."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from asobi.store import ops
from asobi.store.ops import LedgerOp, MatchMark, units_of
from asobi.store.store import Store, open_backend
from tests.conftest import TEST_DATABASE_URL


@pytest.fixture
async def backend(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = open_backend(TEST_DATABASE_URL or None, tmp_path)
    await db.open()
    await db.transact(ops.migrate(db.dialect))
    yield db
    await db.close()


def _unit(match_id: str, tick: int, player: str) -> list[ops.Op]:
    grant = LedgerOp(player, "gold", 1, f"t{tick}", match_id)
    return [MatchMark(match_id, tick, 0, 1), grant]


async def _reasons(backend, player: str) -> list[str]:  # type: ignore[no-untyped-def]
    rows = await backend.transact(ops.ledger(player, 100))
    return sorted(str(row[4]) for row in rows)


async def test_a_tick_committed_by_two_runs_of_a_match_is_applied_once(backend) -> None:  # type: ignore[no-untyped-def]
    # Fresh ids: a PostgreSQL test database outlives the run.
    player, match = f"fence-{uuid.uuid4().hex[:12]}", f"fm-{uuid.uuid4().hex[:12]}"

    async def commit(*units: list[ops.Op]) -> ops.BatchResult:
        batch = [op for unit in units for op in unit]
        result: ops.BatchResult = await backend.transact(ops.apply_batch(uuid.uuid4().hex, batch))
        return result

    first = await commit(_unit(match, 7, player), _unit(match, 8, player))
    assert first.fenced == [] and first.ledger == 2
    # The other run of the same match, behind: tick 8 again (fenced), then tick 9 (new).
    second = await commit(_unit(match, 8, player), _unit(match, 9, player))
    assert [(m.tick, m.seq) for m in second.fenced] == [(8, 0)]
    assert second.ledger == 1
    # The first run, frozen and back, commits tick 9 too: fenced; its tick 10 goes in.
    third = await commit(_unit(match, 9, player), _unit(match, 10, player))
    assert [(m.tick, m.seq) for m in third.fenced] == [(9, 0)]
    assert await _reasons(backend, player) == ["t10", "t7", "t8", "t9"]
    # Writes that are no match's unit are never fenced.
    loose = LedgerOp(player, "gold", 5, "shop", None)
    assert (await commit([loose])).ledger == 1


def test_a_failed_batch_is_retried_unit_by_unit() -> None:
    loose = LedgerOp("p", "gold", 1, "shop", None)
    unit = _unit("m", 3, "p")
    assert units_of([loose, *unit, loose]) == [[loose], unit, [loose]]


async def test_a_store_whose_unit_was_fenced_shows_what_the_database_holds(
    tmp_path: Path,
) -> None:
    """The other run's tick 8 granted 3 and this store's tick 8 granted 5: the database kept
    the first, and the store, which had shown 5 since the commit, reads the wallet again."""
    player, match = f"fence-{uuid.uuid4().hex[:12]}", f"fm-{uuid.uuid4().hex[:12]}"
    store = Store(open_backend(TEST_DATABASE_URL or None, tmp_path))
    await store.start()
    try:
        await store.acquire(player)
        other = [MatchMark(match, 8, 0, 1), LedgerOp(player, "gold", 3, "t8", match)]
        await store.backend.transact(ops.apply_batch(uuid.uuid4().hex, other))
        unit = store.unit(match, (8, 0))
        unit.grant(player, "gold", 5, "t8")
        store.commit(unit)
        assert store.wallet(player) == {"gold": 5}
        await store.flush()  # the unit, fenced
        await store.flush()  # the read queued behind it
        assert store.wallet(player) == {"gold": 3}
        assert await _reasons(store.backend, player) == ["t8"]
    finally:
        await store.stop()
