"""The store's in-memory model, step by step, with no database and no event loop.

The writer's part is played by hand: take the head of the queue, answer it as a database would,
report the answer back.  What is checked is the ordering the write-behind design rests on.
"""

from __future__ import annotations

import pytest

from asobi.store.errors import StoreError
from asobi.store.model import Barrier, Load, StoreModel
from asobi.store.ops import BatchResult, LedgerOp, MatchMark


def test_a_load_sees_earlier_writes_in_the_database_and_later_ones_replayed() -> None:
    model = StoreModel()
    early = model.unit("m1")
    early.grant("p1", "gold", 5, "before")  # not resident: only queued
    early.commit()
    load = model.acquire("p1")
    assert isinstance(load, Load) and model.acquire("p1") is load  # one load per player
    late = model.unit("m1")
    late.grant("p1", "gold", 7, "while loading")
    late.commit()
    assert list(model.queue) == [early.ops[0], load, late.ops[0]]
    # The writer: the batch before the load stops at the load.
    batch = model.next_batch()
    assert batch.ops == early.ops
    model.batch_written(batch, BatchResult())
    assert model.head() is load
    model.load_answered(load, [("gold", 5)], [])  # the database has the early grant
    assert model.wallet("p1") == {"gold": 12}  # the late grant replayed on top
    assert model.head() == late.ops[0]


def test_a_released_load_installs_nothing() -> None:
    model = StoreModel()
    load = model.acquire("p1")
    assert load is not None
    model.release("p1")
    model.load_answered(load, None, None)
    assert not model.resident("p1") and not model.queue


def test_a_failed_load_leaves_the_queue_and_says_why() -> None:
    model = StoreModel()
    load = model.acquire("p1")
    assert load is not None
    error = model.load_failed(load, ValueError("bad row"))
    assert "bad row" in error and not model.queue
    with pytest.raises(StoreError, match="loading the player's data failed"):
        model.wallet("p1")


def test_a_retried_batch_keeps_its_id_and_ops() -> None:
    model = StoreModel(batch_max=2)
    model.acquire("p1")
    load = model.head()
    assert isinstance(load, Load)
    model.load_answered(load, [], [])
    for n in range(3):
        work = model.unit(None)
        work.grant("p1", "gold", n + 1, None)
        work.commit()
    first = model.next_batch()
    assert model.next_batch() is first and len(first.ops) == 2  # not written yet: same batch
    model.batch_written(first, BatchResult())
    second = model.next_batch()
    assert second.id != first.id and len(second.ops) == 1
    assert model.pending_ops == 1 and model.durable_ops == 2


def test_barriers_are_reached_only_once_what_came_before_is_written() -> None:
    model = StoreModel()
    model.acquire("p1")
    load = model.head()
    assert isinstance(load, Load)
    model.load_answered(load, [], [])
    work = model.unit(None)
    work.grant("p1", "gold", 1, None)
    work.commit()
    barrier = model.add_barrier()
    assert model.pop_barriers() == []
    model.batch_written(model.next_batch(), BatchResult())
    assert model.pop_barriers() == [barrier] and isinstance(barrier, Barrier)


def test_debits_are_checked_against_memory_and_writes_refused_when_behind() -> None:
    model = StoreModel(max_pending=2)
    load = model.acquire("p1")
    assert load is not None
    model.load_answered(load, [("gold", 3)], [])
    work = model.unit("m")
    with pytest.raises(StoreError):
        work.debit("p1", "gold", 4, None)
    assert work.debit("p1", "gold", 3, None) == 0
    work.grant("p1", "gold", 1, None)
    work.commit()
    assert model.wallet("p1") == {"gold": 1}
    assert [type(op) for op in model.queue] == [LedgerOp, LedgerOp]
    with pytest.raises(StoreError, match="behind"):
        model.unit("m").grant("p1", "gold", 1, None)


def test_commits_wake_the_writer() -> None:
    woken: list[int] = []
    model = StoreModel(on_queued=lambda: woken.append(1))
    work = model.unit(None)
    work.submit("arena", "p1", 10)
    work.commit()
    assert woken and model.top("arena", 1) == [{"player_id": "p1", "score": 10, "rank": 1}]


# -- other servers' writes (asobi.store.sync) ------------------------------------------------
def test_merged_scores_keep_the_best_whatever_order_they_arrive_in() -> None:
    model = StoreModel()
    work = model.unit("m1")
    work.submit("arena", "p1", 300)
    work.commit()
    model.merge_scores([("arena", "p1", 700), ("arena", "p2", 50)])
    model.merge_scores([("arena", "p1", 500)])  # older, lower: ignored
    assert model.top("arena", 5) == [
        {"rank": 1, "player_id": "p1", "score": 700},
        {"rank": 2, "player_id": "p2", "score": 50},
    ]


def test_a_refreshed_key_takes_the_database_value_unless_ours_is_still_queued() -> None:
    model = StoreModel()
    model.install([], [("config", "motd", '"old"'), ("config", "gone", "1")])
    ours = model.unit("m1")
    ours.set("", "config", "mine", "queued")
    ours.commit()
    # Another server wrote motd and mine and deleted gone; the database holds its values.
    rows = [("config", "motd", '"theirs"'), ("config", "mine", '"theirs"')]
    keys = [("config", "motd"), ("config", "mine"), ("config", "gone")]
    assert model.global_refreshed(rows, keys) == 2
    # Our write of `mine` is not in the database yet: it will be written after theirs and win.
    assert model.global_storage == {("config", "motd"): "theirs", ("config", "mine"): "queued"}
    model.batch_written(model.next_batch(), BatchResult())
    assert model.pending_global == {}
    # Once ours is written, a re-read takes whatever the database holds.
    model.global_refreshed([("config", "mine", '"later"')], [("config", "mine")])
    assert model.global_storage[("config", "mine")] == "later"


def test_a_full_refresh_drops_keys_the_database_no_longer_has() -> None:
    model = StoreModel()
    model.install([], [("a", "1", "1"), ("a", "2", "2")])
    assert model.global_refreshed([("a", "2", "20"), ("a", "3", "3")], None) == 3
    assert model.global_storage == {("a", "2"): 20, ("a", "3"): 3}


def test_a_match_unit_is_written_behind_its_mark_and_never_split_from_it() -> None:
    """The mark of a tick's unit goes first and guards the unit's writes in their transaction,
    so a batch that reaches `batch_max` inside a unit takes the rest of the unit with it."""
    model = StoreModel(batch_max=3)
    unit = model.unit("m1", (7, 0))
    for n in range(4):
        unit.grant("p1", "gold", 1, f"t7-{n}")
    unit.commit()
    after = model.unit("m1", (8, 0))
    after.grant("p1", "gold", 1, "t8")
    after.commit()
    mark = model.queue[0]
    assert isinstance(mark, MatchMark)
    assert (mark.match_id, mark.tick, mark.seq, mark.count) == ("m1", 7, 0, 4)
    batch = model.next_batch()
    assert batch.ops == [mark, *unit.ops]  # five ops, past batch_max, the unit whole
    model.batch_written(batch, BatchResult())
    assert model.next_batch().ops == [model.queue[0], *after.ops]


def test_writes_the_database_turned_away_are_read_again_with_later_ones_replayed() -> None:
    """A fenced unit (another run of the match applied its tick) was applied to memory when it
    was committed: the player's data is read again behind the queue, and what they were
    granted meanwhile is replayed on the rows, so memory ends where the database will."""
    model = StoreModel()
    model.acquire("p1")
    model.load_answered(model.queue[0], [("gold", 10)], [])
    fenced = model.unit("m1", (8, 0))
    fenced.grant("p1", "gold", 5, "t8")
    fenced.commit()
    batch = model.next_batch()
    assert model.wallet("p1") == {"gold": 15}
    model.batch_written(batch, BatchResult(fenced=[batch.ops[0]]))
    reread = model.head()
    assert isinstance(reread, Load) and reread.reread
    later = model.unit()
    later.grant("p1", "gold", 1, "shop")
    later.commit()
    assert model.wallet("p1") == {"gold": 16}  # memory serves and takes writes meanwhile
    # The database has the other run's tick 8 (+3) instead of this one's.
    model.load_answered(reread, [("gold", 13)], [])
    assert model.wallet("p1") == {"gold": 14}
    assert model.resident("p1") and not model.loading


def test_a_failed_reread_leaves_the_player_resident() -> None:
    model = StoreModel()
    model.acquire("p1")
    model.load_answered(model.queue[0], [("gold", 10)], [])
    model.reread("p1")
    model.reread("p1")  # one read is enough
    assert len(model.queue) == 1
    model.load_failed(model.queue[0], ValueError("unreadable row"))
    assert model.wallet("p1") == {"gold": 10} and not model.load_errors
