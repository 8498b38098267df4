"""Match ids name the node that started them, so a `match.join` reaches a match on another node
even when the listing (bounded, refreshed once a second) has not shown it."""

from __future__ import annotations

import time

from asobi.cluster.link import RedisLink
from asobi.cluster.listing import ClusterListing
from asobi.cluster.nodes import NodeDirectory, NodeInfo
from asobi.cluster.router import ClusterRouter, match_id_prefix
from asobi.cluster.seat_tokens import SeatTokens
from asobi.config import Settings
from asobi.directory import MatchElsewhere
from asobi.engine import Engine, EngineConfig
from asobi.hub import Hub
from asobi.local import LocalListing
from asobi.scripts import ScriptRegistry

SECRET = "match-id-test-secret-long-enough-for-hs256"


def router(tmp_path) -> tuple[ClusterRouter, NodeDirectory]:
    (tmp_path / "match.lua").write_text(
        "function init(s) return s end function tick(s) return s end "
        "function get_state(s) return s end"
    )
    settings = Settings.from_env({}, game_dir=tmp_path)
    registry = ScriptRegistry(tmp_path, settings.limits)
    registry.load_all()
    engine = Engine(registry, Hub(), EngineConfig(limits=settings.limits))
    # No Redis is contacted: the client connects on first use, and nothing here uses it.
    link = RedisLink("redis://127.0.0.1:1/0", "node-b")
    nodes = NodeDirectory(link, "ws://b/ws", lambda: {})
    now = time.time()
    nodes.nodes = {
        "node-a": NodeInfo("node-a", "ws://a/ws", now, now),
        "node-b": NodeInfo("node-b", "ws://b/ws", now, now),
    }
    listing = ClusterListing(LocalListing(engine), link, nodes)
    engine.match_id_prefix = match_id_prefix("node-b")
    return ClusterRouter(engine, listing, nodes, SeatTokens(SECRET)), nodes


def test_a_join_of_a_match_the_listing_has_not_shown_goes_to_the_node_its_id_names(
    tmp_path,
) -> None:
    routing, _ = router(tmp_path)
    try:
        routing.join("p1", "node-a~0123456789abcdef")
    except MatchElsewhere as elsewhere:
        assert (elsewhere.node_id, elsewhere.node_url) == ("node-a", "ws://a/ws")
        seat = SeatTokens(SECRET).verify(elsewhere.seat_token, "p1", "node-a")
        assert seat.match_id == "node-a~0123456789abcdef" and seat.join
    else:
        raise AssertionError("the join was not redirected to node-a")


def test_ids_of_gone_nodes_unprefixed_ids_and_own_ids_are_not_redirected(tmp_path) -> None:
    routing, _ = router(tmp_path)
    for match_id in ("node-c~0123", "0123456789abcdef", "node-b~0123"):
        assert routing._started_by(match_id) is None, match_id


def test_this_nodes_matches_carry_its_id_within_the_protocols_64_characters(tmp_path) -> None:
    routing, _ = router(tmp_path)
    match = routing.engine.start_match("m", routing.engine.registry.resolve_mode("m"), ["p1"])
    assert match.id.startswith("node-b~") and len(match.id) <= 64
    assert match_id_prefix("x" * 31) == "" and match_id_prefix("a~b") == ""
