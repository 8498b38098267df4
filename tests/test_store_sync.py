"""What a node announces of its batches (asobi.store.sync, asobi.cluster.store_sync)."""

from __future__ import annotations

from pathlib import Path

import orjson

from asobi.cluster.store_sync import PAYLOAD_MAX, PostgresStoreSync
from asobi.store import Store, open_backend
from asobi.store.ops import LedgerOp, ScoreOp, StorageOp
from asobi.store.sync import NoSync, changes_of


def test_only_leaderboards_and_global_keys_are_announced() -> None:
    batch = [
        LedgerOp("p1", "gold", 5, None, None),
        StorageOp("p1", "profile", "main", "1"),  # player storage: the player's own server
        ScoreOp("arena", "p1", 10),
        StorageOp("", "config", "motd", '"a"'),
        StorageOp("", "config", "motd", None),  # one key, however often written
    ]
    changes = changes_of(batch)
    assert changes.scores == [("arena", "p1", 10)]
    assert changes.keys == [("config", "motd")]
    assert not changes_of(batch[:2]) and NoSync().announce(changes) == []


def test_a_large_batch_is_announced_in_notices_under_the_payload_limit(tmp_path: Path) -> None:
    sync = PostgresStoreSync(Store(open_backend(None, tmp_path)), "postgresql://x/y", "n1")
    batch = [ScoreOp("board-" + "b" * 50, f"player-{i:04d}" + "p" * 100, i) for i in range(1000)]
    batch += [StorageOp("", "c" * 64, f"{i}" + "k" * 120, "1") for i in range(100)]
    payloads = sync.payloads(changes_of(batch))
    assert len(payloads) > 1
    assert all(len(p.encode()) < PAYLOAD_MAX for p in payloads)
    notices = [orjson.loads(p) for p in payloads]
    assert {n["node"] for n in notices} == {"n1"}
    assert [tuple(s) for n in notices for s in n["scores"]] == [
        (op.board, op.player_id, op.score) for op in batch if isinstance(op, ScoreOp)
    ]
    assert len({tuple(k) for n in notices for k in n["keys"]}) == 100
    assert sync.announce(changes_of([])) == []
