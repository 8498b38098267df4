"""One client's conversation with the server, as a state machine that does no I/O.

A `Session` is fed what happened, each time with the time it happened: a message (`receive`), the
passing of time (`tick`, due at `next_deadline()`), the end of the connection (`closed`) and the
results of the I/O it asked for (`account_done`, `load_done`).  It answers with frames written to
its `Peer`, a synchronous sink (the same path match frames take, so replies and match frames keep
their order), and with I/O requests appended to `requests`: an account lookup with its password
hashing, a player's data load.  Carrying those out is the driver's job (`asobi.session_driver` on
asyncio; unit tests by hand with an injected clock), so the authentication time limit, the frame
rate limit, the load time limit and every protocol rule run here without sockets or sleeps.

It reaches the rest of the server only through the `asobi.directory` interfaces the `App` holds
(connections, seats, match router, listing, matchmaker), never through the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from asobi import names
from asobi.accounts import AccountError
from asobi.admin import AdminChannel
from asobi.app import App
from asobi.auth import InvalidToken
from asobi.directory import InvalidSeat, JoinRefused, MatchElsewhere, MatchInfo, Peer, Seat
from asobi.limits import TokenBucket
from asobi.matchmaker import QueueLimit, QueueUnavailable, UnknownMode
from asobi.protocol import (
    AUTH_FREE,
    ErrorCode,
    Frame,
    ProtocolError,
    check_input,
    encode,
    encode_error,
    optional_mode,
    optional_str,
    parse_frame,
    require_mode,
    require_str,
)
from asobi.state_frames import state_sync_choice

log = structlog.get_logger("asobi.session")

MAX_TOP = 100

CLOSE_POLICY = 1008
CLOSE_REPLACED = 4000
MAX_HELD_FRAMES = 256
LOAD_TIMEOUT_S = 3.0
JOIN_ERRORS = {
    "not_found": ErrorCode.MATCH_NOT_FOUND,
    "full": ErrorCode.MATCH_FULL,
    "refused": ErrorCode.JOIN_REFUSED,
    "in_match": ErrorCode.ALREADY_IN_MATCH,
}


@dataclass(eq=False)
class AccountRequest:
    """Register or log in (hashing a password): answer with `Session.account_done`."""

    frame: Frame
    register: bool
    username: Any
    password: Any


@dataclass(eq=False)
class LoadRequest:
    """Make the player's data resident: answer with `Session.load_done`."""

    player_id: str


Request = AccountRequest | LoadRequest


class Session:
    def __init__(self, app: App, peer: Peer, remote: str = "", *, now: float = 0.0) -> None:
        self.app = app
        self.peer = peer
        self.remote = remote
        self.player_id: str | None = None
        settings = app.settings
        self.max_frame = settings.max_frame_bytes
        self.rate_limit = settings.rate_limit_per_s
        self._bucket = TokenBucket(settings.rate_limit_per_s, settings.rate_limit_burst, now)
        self._now = now
        # Unauthenticated connections are closed at this time (None once authenticated).
        self.auth_deadline: float | None = now + settings.connect_timeout_s
        # I/O the driver should carry out, oldest first; it takes them with `take_requests`.
        self.requests: list[Request] = []
        self._handlers: dict[str, Callable[[Frame], None]] = {
            "auth.guest": self._auth_guest,
            "session.connect": self._connect,
            "session.heartbeat": self._heartbeat,
            "matchmaker.add": self._matchmaker_add,
            "matchmaker.remove": self._matchmaker_remove,
            "match.input": self._match_input,
            "match.leave": self._match_leave,
            "auth.register": self._auth_register,
            "auth.login": self._auth_login,
            "leaderboard.top": self._leaderboard_top,
            "match.list": self._match_list,
            "match.join": self._match_join,
            "match.resync": self._match_resync,
        }
        self.admin = AdminChannel(app, peer, remote)  # the console's admin.* frames
        self._handlers.update(self.admin.handlers())
        # Frames that arrive while the player's data is being loaded wait here (None: not
        # loading), so nothing they do reaches a match before their wallet is resident; they are
        # handled when the load ends or at `_load_deadline`, whichever comes first.
        self._frames_awaiting_load: list[str | bytes] | None = None
        self._loading: str | None = None
        self._load_deadline: float | None = None
        # Set once the connection is gone: a login that finishes later must not open a session.
        self._gone = False

    @property
    def authenticated(self) -> bool:
        return self.player_id is not None or self.admin.authorized

    # -- entry points -----------------------------------------------------------------------------
    def receive(self, message: str | bytes, now: float) -> None:
        """One WebSocket message: rate-limited, text only, size-capped, then handled."""
        self._now = now
        if not self._bucket.take(now):
            # Not parsed (that is the work being limited), so no cid to echo.
            self.send_error(
                ErrorCode.RATE_LIMITED,
                f"more than {self.rate_limit:g} frames per second",
                droppable=True,
            )
            return
        if isinstance(message, bytes):
            self.send_error(ErrorCode.BINARY_NOT_SUPPORTED, "send JSON text frames, not binary")
            return
        max_frame = self.max_frame
        if len(message) > max_frame or (
            len(message) * 4 > max_frame and len(message.encode()) > max_frame
        ):
            self.send_error(ErrorCode.PAYLOAD_TOO_LARGE, f"frames are limited to {max_frame} bytes")
            return
        self.handle(message)

    def next_deadline(self) -> float | None:
        """When `tick` must next be called (None: nothing is waiting on time)."""
        deadlines = [d for d in (self.auth_deadline, self._load_deadline) if d is not None]
        return min(deadlines) if deadlines else None

    def tick(self, now: float) -> None:
        """Time passed: close a connection that did not authenticate in time; stop waiting for a
        player's data that is slow to load (their held frames are handled without it)."""
        self._now = now
        if self.auth_deadline is not None and now >= self.auth_deadline:
            self.auth_deadline = None
            if not self.authenticated and not self._gone:
                log.info("auth_timeout", remote=self.remote)
                self.app.metrics.closed.labels("auth_timeout").inc()
                limit = f"{self.app.settings.connect_timeout_s:g} s"
                reason = f"not authenticated within {limit} (send auth.guest or session.connect)"
                self.peer.close(CLOSE_POLICY, reason)
        if self._load_deadline is not None and now >= self._load_deadline:
            self.load_done(self._loading or "", "TimeoutError()", now)

    def take_requests(self) -> list[Request]:
        requests, self.requests = self.requests, []
        return requests

    def handle(self, data: str | bytes) -> None:
        """Handle one text message; any refusal becomes an `error` frame, never an exception."""
        if self._frames_awaiting_load is not None:
            if len(self._frames_awaiting_load) < MAX_HELD_FRAMES:
                self._frames_awaiting_load.append(data)
            else:
                self.send_error(ErrorCode.RATE_LIMITED, "wait for session.connected")
            return
        frame: Frame | None = None
        try:
            frame = parse_frame(data)
            if frame.type not in AUTH_FREE and self.player_id is None:
                raise ProtocolError(
                    ErrorCode.UNAUTHENTICATED,
                    "send session.connect with a token first (auth.guest gives you one)",
                    frame.cid,
                )
            self._handlers[frame.type](frame)
            if self.player_id is not None:
                self.auth_deadline = None
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message, exc.cid)
        except Exception:
            log.exception("frame_failed", player_id=self.player_id)
            cid = frame.cid if frame is not None else None
            self.send_error(ErrorCode.INTERNAL, "the server could not handle this frame", cid)

    def closed(self, now: float) -> None:
        """The connection is gone: queued tickets go; a match seat is held for the grace period
        (`leave` runs when it ends without a resume), or given up at once without one."""
        self._now = now
        self._gone = True
        self.auth_deadline = None
        self.admin.closed()
        player_id = self.player_id
        if player_id is None:
            return
        self.player_id = None
        if not self.app.hub.detach(player_id, self.peer):
            return  # replaced by a newer connection, which keeps the seat
        self.app.matchmaker.remove(player_id)
        self.app.router.notify_reloads(player_id, False)
        self.app.router.state_sync(player_id, None)
        presence = self.app.presence
        match = self.app.router.match_of(player_id)
        if match is not None and presence.hold(player_id, now):
            # The match may still credit the player during the grace period: data stays resident
            # until the seat is given up (`expire_seats` releases it).
            log.info(
                "seat_held", player_id=player_id, match_id=match.match_id, grace_s=presence.grace_s
            )
        else:
            presence.forget(player_id)
            self.app.router.leave(player_id)
            if self.app.store is not None:
                self.app.store.release(player_id)
        log.info("session_closed", player_id=player_id, seat_held=presence.is_held(player_id))

    # -- replies ----------------------------------------------------------------------------------
    def reply(self, frame: Frame, kind: str, payload: Any) -> None:
        self.peer.send_frame(encode(kind, payload, frame.cid))

    def send_error(
        self, code: ErrorCode, message: str, cid: Any = None, *, droppable: bool = False
    ) -> None:
        self.app.metrics.error(str(code))
        self.peer.send_frame(encode_error(code, message, cid), droppable=droppable)

    # -- handlers ---------------------------------------------------------------------------------
    def _auth_guest(self, frame: Frame) -> None:
        state_sync_choice(frame)  # refused before a guest is made for nothing
        player_id, token = self.app.signer.guest()
        log.info("guest_created", player_id=player_id)
        self._issued(frame, player_id, token)

    def _issued(self, frame: Frame, player_id: str, token: str) -> None:
        """Answer an `auth.*` frame with its token and, on a connection with no session yet,
        open the session for that player right away: a person typing frames by hand cannot paste
        a token back within the authentication limit, and a program saves a round trip.  The
        token still serves a later `session.connect` (another socket, a reconnect)."""
        self.reply(frame, "auth.token", {"player_id": player_id, "token": token})
        if self.player_id is None and not self._gone:
            self._open(frame, player_id, None)

    def _connect(self, frame: Frame) -> None:
        token = require_str(frame, "token", max_length=8192)
        resume_token = optional_str(frame, "resume_token", max_length=256)
        seat_token = optional_str(frame, "seat_token", max_length=4096)
        try:
            player_id = self.app.signer.verify(token)
        except InvalidToken as exc:
            raise ProtocolError(ErrorCode.INVALID_TOKEN, str(exc), frame.cid) from None
        presence = self.app.presence
        seat: Seat | None = None
        if seat_token is not None:
            # A player sent here by another node: the seat token, not the resume token, says
            # which seat they take (docs/cluster.md, "Reaching a match on another node").
            try:
                seat = presence.admit(player_id, seat_token)
            except InvalidSeat as exc:
                log.info("seat_refused", player_id=player_id, reason=str(exc))
                raise ProtocolError(ErrorCode.INVALID_SEAT, str(exc), frame.cid) from None
        elif self.player_id is None and (elsewhere := presence.locate(resume_token)):
            if elsewhere.node_url is not None:
                log.info(
                    "seat_redirected", player_id=player_id, node=elsewhere.node_id, why="resume"
                )
                payload = {"node_id": elsewhere.node_id, "node_url": elsewhere.node_url}
                self.reply(frame, "session.redirect", payload)
                return
            log.info("seat_lost", player_id=player_id, node=elsewhere.node_id)
            self.send_error(
                ErrorCode.MATCH_LOST,
                f"the server running your match stopped (node {elsewhere.node_id}): the match "
                "is lost; this is a new session",
            )
            resume_token = None
        match = self._open(frame, player_id, resume_token, seat)
        if seat is not None and seat.join:
            # The backfill join runs as `match.join` would, once the player's data is resident.
            join = {"type": "match.join", "payload": {"match_id": seat.match_id}}
            self.handle(orjson.dumps(join))
        elif seat is not None and seat.moving and match is None:
            # Sent ahead of its match by a draining node (`match.moving`): the match arrives
            # here within a moment and takes this session into its seat (asobi.cluster.drain).
            log.info("seat_arriving", player_id=player_id, match_id=seat.match_id)
        elif seat is not None and (match is None or match.match_id != seat.match_id):
            self.send_error(
                ErrorCode.MATCH_NOT_FOUND, "the match of this seat ended or gave the seat up"
            )

    def _open(
        self, frame: Frame, player_id: str, resume_token: str | None, seat: Seat | None = None
    ) -> MatchInfo | None:
        """Make this connection `player_id`'s session (resuming a held seat with the right
        resume token, or with a seat token for the match that holds the seat) and answer
        `session.connected`; returns the match the session carries on."""
        presence = self.app.presence
        sync = state_sync_choice(frame)
        if self.player_id is not None:
            if self.player_id != player_id:
                raise ProtocolError(
                    ErrorCode.ALREADY_AUTHENTICATED,
                    f"this connection is already player {self.player_id}",
                    frame.cid,
                )
            # Same player on the same socket again: nothing changes but the resume token.
            self.reply(
                frame,
                "session.connected",
                {
                    "player_id": player_id,
                    "resume_token": presence.issue(player_id),
                    "resumed": True,
                },
            )
            return self.app.router.match_of(player_id)
        match = self.app.router.match_of(player_id)
        resumed = presence.check(player_id, resume_token) or (
            seat is not None
            and not seat.join
            and match is not None
            and match.match_id == seat.match_id
        )
        held = presence.reclaim(player_id)
        if not resumed:
            # A new session, not a continuation: the old session's seat and tickets are let go
            # (before this socket is attached, so frames of the old seat never reach it).
            self.app.matchmaker.remove(player_id)
            if match is not None:
                self.app.router.leave(player_id)
                log.info("seat_released", player_id=player_id, match_id=match.match_id)
                self.app.metrics.seats.labels("released").inc()
                match = None
        elif held:
            self.app.metrics.seats.labels("resumed").inc()
        self.player_id = player_id
        previous = self.app.hub.attach(player_id, self.peer)
        if previous is not None:
            previous.close(CLOSE_REPLACED, "replaced by a newer connection for this player")
        log.info(
            "session_connected",
            player_id=player_id,
            remote=self.remote,
            replaced=previous is not None,
            resumed=resumed,
            match_id=match.match_id if match is not None else None,
        )
        self.reply(
            frame,
            "session.connected",
            {
                "player_id": player_id,
                "resume_token": presence.issue(player_id),
                "resumed": resumed,
            },
        )
        if frame.payload.get("notify_reload") is True:
            self.app.router.notify_reloads(player_id, True)
        self.app.router.state_sync(player_id, sync)
        self._load_player(player_id)
        if match is not None:
            # This socket holds no state yet: its first state frame is a full one.
            self.app.router.resync(player_id)
            self.peer.send_frame(
                encode("match.rejoined", {"match_id": match.match_id, "mode": match.mode})
            )
        return match

    def _heartbeat(self, frame: Frame) -> None:
        self.reply(frame, "session.heartbeat", {"ts": int(time.time() * 1000)})

    def _matchmaker_add(self, frame: Frame) -> None:
        mode = require_mode(frame)
        assert self.player_id is not None
        if self.app.router.match_of(self.player_id) is not None:
            raise ProtocolError(
                ErrorCode.ALREADY_IN_MATCH, "leave your current match first", frame.cid
            )
        try:
            ticket, existed = self.app.matchmaker.add(self.player_id, mode)
        except UnknownMode:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE, self.app.registry.mode_refusal(mode), frame.cid
            ) from None
        except QueueLimit as exc:
            code = ErrorCode.TOO_MANY_TICKETS if exc.per_player else ErrorCode.MATCHMAKER_FULL
            raise ProtocolError(code, str(exc), frame.cid) from None
        except QueueUnavailable as exc:
            raise ProtocolError(ErrorCode.UNAVAILABLE, str(exc), frame.cid) from None
        payload: dict[str, Any] = {"ticket_id": ticket.ticket_id, "mode": mode}
        if existed:
            payload["already_queued"] = True
        self.reply(frame, "matchmaker.queued", payload)
        self.app.matchmaker.process()

    def _matchmaker_remove(self, frame: Frame) -> None:
        ticket_id = require_str(frame, "ticket_id", max_length=64)
        assert self.player_id is not None
        removed = self.app.matchmaker.remove(self.player_id, ticket_id)
        self.reply(frame, "matchmaker.removed", {"ticket_id": ticket_id, "removed": bool(removed)})

    def _match_input(self, frame: Frame) -> None:
        assert self.player_id is not None
        if not self.app.router.submit_input(self.player_id, check_input(frame)):
            raise ProtocolError(ErrorCode.NOT_IN_MATCH, "you are not in a match", frame.cid)

    def _match_resync(self, frame: Frame) -> None:
        """The client lost the thread of `match.patch` frames: the next state frame is full."""
        assert self.player_id is not None
        if not self.app.router.resync(self.player_id):
            raise ProtocolError(ErrorCode.NOT_IN_MATCH, "you are not in a match", frame.cid)

    def _match_leave(self, frame: Frame) -> None:
        assert self.player_id is not None
        match = self.app.router.leave(self.player_id)
        if match is None:
            raise ProtocolError(ErrorCode.NOT_IN_MATCH, "you are not in a match", frame.cid)
        self.reply(frame, "match.left", {"match_id": match.match_id})

    # -- accounts and persistence -----------------------------------------------------------------
    def _account_error(self, frame: Frame, exc: AccountError) -> ProtocolError:
        code = {
            "taken": ErrorCode.USERNAME_TAKEN,
            "credentials": ErrorCode.INVALID_CREDENTIALS,
            "invalid_input": ErrorCode.INVALID_ACCOUNT_INPUT,
            "busy": ErrorCode.RATE_LIMITED,
        }.get(exc.kind, ErrorCode.STORE_UNAVAILABLE)
        return ProtocolError(code, exc.message, frame.cid)

    def _auth_register(self, frame: Frame) -> None:
        self._account(frame, register=True)

    def _auth_login(self, frame: Frame) -> None:
        self._account(frame, register=False)

    def _account(self, frame: Frame, *, register: bool) -> None:
        if self.app.accounts is None:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, "accounts are not enabled", frame.cid)
        state_sync_choice(frame)
        username, password = frame.payload.get("username"), frame.payload.get("password")
        self.requests.append(AccountRequest(frame, register, username, password))

    def account_done(
        self,
        request: AccountRequest,
        player_id: str | None,
        error: BaseException | None,
        now: float,
    ) -> None:
        """The answer to an `AccountRequest`: the account's player id, or why there is none."""
        self._now = now
        frame = request.frame
        try:
            if isinstance(error, AccountError):
                raise self._account_error(frame, error)
            if error is not None:
                raise error
            assert player_id is not None
            self._issued(frame, player_id, self.app.signer.issue(player_id))
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message, exc.cid)
        except Exception:
            log.exception("frame_failed", player_id=self.player_id, type=frame.type)
            self.send_error(ErrorCode.INTERNAL, "the server could not handle this frame", frame.cid)

    def _leaderboard_top(self, frame: Frame) -> None:
        board = require_str(frame, "board", max_length=64)
        if not names.BOARD.accepts(board):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, f"board must match {names.BOARD}", frame.cid
            )
        n = frame.payload.get("n", 10)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOP:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, f"n must be an integer from 1 to {MAX_TOP}", frame.cid
            )
        entries = self.app.store.top(board, n) if self.app.store is not None else []
        self.reply(frame, "leaderboard.top", {"board": board, "entries": entries})

    def _load_player(self, player_id: str) -> None:
        """Make the player's data resident; hold their next frames until it is (bounded)."""
        store = self.app.store
        if store is None or store.resident(player_id):
            return
        self._frames_awaiting_load = []
        self._loading = player_id
        self._load_deadline = self._now + LOAD_TIMEOUT_S
        self.requests.append(LoadRequest(player_id))

    def load_done(self, player_id: str, error: str | None, now: float) -> None:
        """The answer to a `LoadRequest` (`error`: why the data is not resident, if it is not).
        A late answer, after the load time limit already let the held frames through, is
        ignored."""
        self._now = now
        if self._loading is None or self._loading != player_id:
            return
        if error is not None:
            log.warning("player_load_slow", player_id=player_id, error=error)
        self._loading = self._load_deadline = None
        held, self._frames_awaiting_load = self._frames_awaiting_load or [], None
        for data in held:
            if self.player_id is None:
                return
            self.handle(data)

    def _match_list(self, frame: Frame) -> None:
        mode = optional_mode(frame)
        matches = [
            {
                "match_id": m.match_id,
                "mode": m.mode,
                "players": list(m.players),
                "max_players": m.max_players,
            }
            for m in self.app.listing.list(mode)
        ]
        self.reply(frame, "match.list", {"matches": matches})

    def _match_join(self, frame: Frame) -> None:
        match_id = require_str(frame, "match_id", max_length=64)
        assert self.player_id is not None
        try:
            match = self.app.router.join(self.player_id, match_id)
        except JoinRefused as exc:
            raise ProtocolError(JOIN_ERRORS[exc.reason], exc.message, frame.cid) from None
        except MatchElsewhere as away:
            # Another node runs the match: the player goes there with a seat token.
            log.info(
                "seat_redirected",
                player_id=self.player_id,
                match_id=match_id,
                node=away.node_id,
                why="join",
            )
            payload = {"match_id": match_id, "node_id": away.node_id, "node_url": away.node_url}
            self.reply(frame, "match.redirect", dict(payload, seat_token=away.seat_token))
            return
        self.app.matchmaker.remove(self.player_id)
        self.reply(
            frame,
            "match.joined",
            {"match_id": match.match_id, "mode": match.mode, "players": list(match.players)},
        )


def expire_seats(app: App, now: float) -> list[str]:
    """Held seats whose grace period ended by `now`: their players leave their matches (`leave`
    runs) and their data stops being resident.  Called by the server's housekeeping."""
    expired = app.presence.expire(now)
    for player_id in expired:
        match = app.router.leave(player_id)
        log.info(
            "seat_expired",
            player_id=player_id,
            match_id=match.match_id if match is not None else None,
        )
    if expired:
        app.metrics.seats.labels("expired").inc(len(expired))
        if app.store is not None:
            for player_id in expired:
                app.store.release(player_id)
    return expired
