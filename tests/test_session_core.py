"""The session state machine and the session layer's timers, with an injected clock.

No sockets, no event loop, no sleeps: each test builds a real `App` (real scripts, real Lua
matches, the store's in-memory side), feeds `Session`s frames and times, carries out their I/O
requests by hand and reads the frames they wrote to a list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from asobi.accounts import AccountError
from asobi.app import App
from asobi.config import Settings
from asobi.session import AccountRequest, LoadRequest, Session, expire_seats

DUEL = """
match_size = 2
function init(state) state.n = 0 return state end
function join(state, player_id) return state end
function leave(state, player_id) return state end
function handle_input(state, player_id, input) state.n = state.n + 1 return state end
function tick(state) return state end
function get_state(state, player_id) return {n = state.n} end
"""


class ListPeer:
    """A connection that keeps what it was sent."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.closed_with: tuple[int, str] | None = None

    def send_frame(self, frame: bytes, *, droppable: bool = False) -> bool:
        self.frames.append(orjson.loads(frame))
        return True

    def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)

    def types(self) -> list[str]:
        return [f["type"] for f in self.frames if f["type"] != "match.state"]

    def last(self, kind: str) -> dict[str, Any]:
        return next(f for f in reversed(self.frames) if f["type"] == kind)


def _frame(kind: str, payload: dict[str, Any] | None = None, cid: str | None = None) -> str:
    body: dict[str, Any] = {"type": kind, "payload": payload or {}}
    if cid is not None:
        body["cid"] = cid
    return orjson.dumps(body).decode()


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Any]:
    apps: list[App] = []

    def make(**overrides: Any) -> App:
        game = tmp_path / f"game{len(apps)}"
        game.mkdir()
        (game / "match.lua").write_text(DUEL)
        settings = Settings.from_env(
            {},
            game_dir=game,
            data_dir=tmp_path / "data",
            secret="test-secret-with-enough-length-for-hs256",
            **overrides,
        )
        app = App.create(settings)
        apps.append(app)
        return app

    yield make
    for app in apps:
        if app.accounts is not None:
            app.accounts.close()
        for match in list(app.engine.matches.values()):
            app.engine.finish(match, {"reason": "test over"}, notify=False)


def _connect(app: App, now: float, player_id: str | None = None) -> tuple[Session, ListPeer]:
    """A session for a guest (or for `player_id`), its data load answered at once."""
    peer = ListPeer()
    session = Session(app, peer, "test", now=now)
    if player_id is None:
        session.receive(_frame("auth.guest"), now)
    else:
        token = app.signer.issue(player_id)
        session.receive(_frame("session.connect", {"token": token}), now)
    for request in session.take_requests():
        assert isinstance(request, LoadRequest)
        session.load_done(request.player_id, None, now)
    assert session.player_id is not None
    return session, peer


def test_the_auth_time_limit_closes_only_unauthenticated_connections(make_app) -> None:
    app = make_app(connect_timeout_s=10.0)
    lazy_peer, quick_peer = ListPeer(), ListPeer()
    lazy = Session(app, lazy_peer, now=100.0)
    quick = Session(app, quick_peer, now=100.0)
    assert lazy.next_deadline() == 110.0
    quick.receive(_frame("auth.guest"), 105.0)
    assert quick.next_deadline() is None or quick.next_deadline() != 110.0
    lazy.tick(109.999)
    assert lazy_peer.closed_with is None
    lazy.tick(110.0)
    assert lazy_peer.closed_with is not None
    code, reason = lazy_peer.closed_with
    assert code == 1008 and "within 10 s" in reason
    quick.tick(110.0)
    assert quick_peer.closed_with is None
    assert lazy.next_deadline() is None


def test_the_frame_rate_limit_refills_with_time(make_app) -> None:
    app = make_app(rate_limit_per_s=5.0, rate_limit_burst=5)
    session, peer = _connect(app, 0.0)
    for i in range(5):
        session.receive(_frame("session.heartbeat", cid=str(i)), 1.0)
    session.receive(_frame("session.heartbeat", cid="over"), 1.0)
    assert peer.frames[-1]["payload"]["code"] == "rate_limited"
    session.receive(_frame("session.heartbeat", cid="later"), 1.5)  # tokens come back with time
    assert (peer.frames[-1]["type"], peer.frames[-1].get("cid")) == ("session.heartbeat", "later")


def test_oversized_and_binary_messages_are_refused_before_parsing(make_app) -> None:
    app = make_app(max_frame_bytes=100)
    session, peer = _connect(app, 0.0)
    session.receive(b"\x00\x01", 0.0)
    assert peer.frames[-1]["payload"]["code"] == "binary_not_supported"
    session.receive(_frame("session.heartbeat", {"pad": "x" * 200}), 0.0)
    assert peer.frames[-1]["payload"]["code"] == "payload_too_large"


def test_frames_wait_for_the_players_data_then_run_in_order(make_app) -> None:
    app = make_app()
    peer = ListPeer()
    session = Session(app, peer, now=0.0)
    session.receive(_frame("auth.guest"), 0.0)
    (request,) = session.take_requests()
    assert isinstance(request, LoadRequest) and request.player_id == session.player_id
    session.receive(_frame("session.heartbeat", cid="a"), 0.5)
    session.receive(_frame("matchmaker.add", {"mode": "duel"}, cid="b"), 0.6)
    assert peer.types() == ["auth.token", "session.connected"]  # held while loading
    assert session.next_deadline() == pytest.approx(3.0)
    session.load_done(request.player_id, None, 1.0)
    assert peer.types()[2:] == ["session.heartbeat", "matchmaker.queued"]
    assert session.next_deadline() is None
    assert app.matchmaker.queued("duel") == 1


def test_a_slow_load_lets_the_held_frames_through_at_its_time_limit(make_app) -> None:
    app = make_app()
    peer = ListPeer()
    session = Session(app, peer, now=0.0)
    session.receive(_frame("auth.guest"), 0.0)
    (request,) = session.take_requests()
    session.receive(_frame("session.heartbeat", cid="held"), 0.1)
    session.tick(2.9)
    assert "session.heartbeat" not in peer.types()
    session.tick(3.0)
    assert peer.types()[-1] == "session.heartbeat"
    session.load_done(request.player_id, None, 4.0)  # late: ignored, nothing replayed twice
    assert peer.types().count("session.heartbeat") == 1


def test_accounts_are_io_requests_and_their_answers_open_the_session(make_app) -> None:
    app = make_app()
    peer = ListPeer()
    session = Session(app, peer, now=0.0)
    session.receive(_frame("auth.register", {"username": "alice", "password": "pw"}, "r"), 0.0)
    (request,) = session.take_requests()
    assert isinstance(request, AccountRequest) and request.register
    assert request.username == "alice" and peer.frames == []
    session.account_done(request, None, AccountError("taken", "username is taken"), 0.1)
    assert peer.frames[-1]["payload"]["code"] == "username_taken"
    assert peer.frames[-1]["cid"] == "r"
    session.receive(_frame("auth.login", {"username": "alice", "password": "pw"}, "l"), 0.2)
    (login,) = session.take_requests()
    assert isinstance(login, AccountRequest) and not login.register
    session.account_done(login, "p-alice", None, 0.3)
    assert peer.types() == ["error", "auth.token", "session.connected"]
    assert session.player_id == "p-alice"


def test_a_newer_connection_replaces_the_older(make_app) -> None:
    app = make_app()
    first, first_peer = _connect(app, 0.0, "p-1")
    second, second_peer = _connect(app, 1.0, "p-1")
    assert first_peer.closed_with is not None and first_peer.closed_with[0] == 4000
    first.closed(1.5)  # the replaced socket going away must not end the new session
    second.receive(_frame("matchmaker.add", {"mode": "duel"}, "q"), 2.0)
    assert second_peer.types()[-1] == "matchmaker.queued"
    assert len(app.hub) == 1


def _matched_pair(
    app: App, now: float
) -> tuple[tuple[Session, ListPeer], tuple[Session, ListPeer]]:
    a = _connect(app, now, "p-a")
    b = _connect(app, now, "p-b")
    for session, _ in (a, b):
        session.receive(_frame("matchmaker.add", {"mode": "duel"}), now)
    assert "matchmaker.matched" in a[1].types() and "matchmaker.matched" in b[1].types()
    return a, b


def test_a_held_seat_is_kept_for_the_grace_period_then_given_up(make_app) -> None:
    app = make_app(reconnect_grace_s=15.0)
    (a, a_peer), _ = _matched_pair(app, 0.0)
    match_id = a_peer.last("matchmaker.matched")["payload"]["match_id"]
    a.closed(100.0)
    assert app.presence.is_held("p-a")
    assert expire_seats(app, 114.999) == []
    assert app.router.match_of("p-a") is not None
    assert expire_seats(app, 115.0) == ["p-a"]
    assert app.router.match_of("p-a") is None
    assert app.router.match_of("p-b") is not None
    assert app.router.match_of("p-b").match_id == match_id  # type: ignore[union-attr]


def test_a_resume_within_the_grace_period_takes_the_seat_back(make_app) -> None:
    app = make_app(reconnect_grace_s=15.0)
    (a, a_peer), _ = _matched_pair(app, 0.0)
    resume = a_peer.last("session.connected")["payload"]["resume_token"]
    match_id = a_peer.last("matchmaker.matched")["payload"]["match_id"]
    a.closed(100.0)
    peer = ListPeer()
    again = Session(app, peer, now=110.0)
    token = app.signer.issue("p-a")
    again.receive(_frame("session.connect", {"token": token, "resume_token": resume}), 110.0)
    assert peer.last("session.connected")["payload"]["resumed"] is True
    assert peer.last("match.rejoined")["payload"]["match_id"] == match_id
    assert expire_seats(app, 200.0) == []  # the hold ended with the resume
    again.receive(_frame("match.input", {"input": {"k": 1}}, "i"), 111.0)
    assert "error" not in peer.types()


def test_without_a_grace_period_a_closed_session_leaves_at_once(make_app) -> None:
    app = make_app(reconnect_grace_s=0.0)
    (a, _), (_, _b_peer) = _matched_pair(app, 0.0)
    a.closed(1.0)
    assert app.router.match_of("p-a") is None
    assert app.router.match_of("p-b") is not None  # the match runs on for the other player
    assert not app.presence.is_held("p-a")


def test_tickets_expire_on_the_matchmakers_clock(make_app) -> None:
    app = make_app(ticket_ttl_s=60.0)
    clock = [1000.0]
    app.matchmaker.clock = lambda: clock[0]
    session, peer = _connect(app, 0.0, "p-alone")
    session.receive(_frame("matchmaker.add", {"mode": "duel"}, "q"), 0.0)
    ticket = peer.last("matchmaker.queued")["payload"]["ticket_id"]
    assert app.matchmaker.expire(1059.9) == []
    (expired,) = app.matchmaker.expire(1060.0)
    assert expired.ticket_id == ticket
    assert peer.last("matchmaker.expired")["payload"] == {"ticket_id": ticket, "mode": "duel"}
    assert app.matchmaker.queued("duel") == 0


def test_a_closed_connection_drops_its_tickets(make_app) -> None:
    app = make_app()
    session, _ = _connect(app, 0.0, "p-gone")
    session.receive(_frame("matchmaker.add", {"mode": "duel"}), 0.0)
    assert app.matchmaker.queued("duel") == 1
    session.closed(1.0)
    assert app.matchmaker.queued("duel") == 0
