"""One client's conversation with the server: authentication and the frames it may send.

A `Session` turns parsed frames into calls on the app and replies on its `Peer`.  It never touches
a socket, so the whole protocol can be driven by tests with a fake peer; `asobi.server` feeds it
the messages of a real WebSocket connection.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from asobi.accounts import AccountError
from asobi.admin import AdminChannel
from asobi.app import App
from asobi.auth import InvalidToken
from asobi.engine import JoinRefused
from asobi.hub import Peer
from asobi.matchmaker import UnknownMode
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

log = structlog.get_logger("asobi.session")

BOARD_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
MAX_TOP = 100

CLOSE_REPLACED = 4000
MAX_HELD_FRAMES = 256
LOAD_TIMEOUT_S = 3.0
JOIN_ERRORS = {
    "not_found": ErrorCode.MATCH_NOT_FOUND,
    "full": ErrorCode.MATCH_FULL,
    "refused": ErrorCode.JOIN_REFUSED,
    "in_match": ErrorCode.ALREADY_IN_MATCH,
}


class Session:
    def __init__(self, app: App, peer: Peer, remote: str = "") -> None:
        self.app = app
        self.peer = peer
        self.remote = remote
        self.player_id: str | None = None
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
        }
        self.admin = AdminChannel(app, peer, remote)  # the console's admin.* frames
        self._handlers.update(self.admin.handlers())
        self._tasks: set[asyncio.Task[None]] = set()
        # Frames that arrive while the player's data is being loaded wait here (None: not
        # loading), so nothing they do reaches a match before their wallet is resident.
        self._frames_awaiting_load: list[str | bytes] | None = None
        # Set once the connection is gone: a login that finishes later must not open a session.
        self._gone = False

    @property
    def authenticated(self) -> bool:
        return self.player_id is not None or self.admin.authorized

    # -- entry points -----------------------------------------------------------------------------
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
        except ProtocolError as exc:
            self.send_error(exc.code, exc.message, exc.cid)
        except Exception:
            log.exception("frame_failed", player_id=self.player_id)
            cid = frame.cid if frame is not None else None
            self.send_error(ErrorCode.INTERNAL, "the server could not handle this frame", cid)

    def closed(self) -> None:
        """The connection is gone: queued tickets go; a match seat is held for the grace period
        (`leave` runs when it ends without a resume), or given up at once without one."""
        self._gone = True
        self.admin.closed()
        player_id = self.player_id
        if player_id is None:
            return
        self.player_id = None
        if not self.app.hub.detach(player_id, self.peer):
            return  # replaced by a newer connection, which keeps the seat
        self.app.matchmaker.remove(player_id)
        self.app.engine.reload_subscribers.discard(player_id)
        presence = self.app.presence
        match = self.app.engine.match_of(player_id)
        if match is not None and presence.hold(player_id, time.monotonic()):
            # The match may still credit the player during the grace period: data stays resident
            # until the seat is given up (server housekeeping releases it).
            log.info("seat_held", player_id=player_id, match_id=match.id, grace_s=presence.grace_s)
        else:
            presence.forget(player_id)
            self.app.engine.remove_player(player_id)
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
        try:
            player_id = self.app.signer.verify(token)
        except InvalidToken as exc:
            raise ProtocolError(ErrorCode.INVALID_TOKEN, str(exc), frame.cid) from None
        self._open(frame, player_id, resume_token)

    def _open(self, frame: Frame, player_id: str, resume_token: str | None) -> None:
        """Make this connection `player_id`'s session (resuming a held seat with the right
        resume token) and answer `session.connected`."""
        presence = self.app.presence
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
            return
        resumed = presence.check(player_id, resume_token)
        held = presence.reclaim(player_id)
        match = self.app.engine.match_of(player_id)
        if not resumed:
            # A new session, not a continuation: the old session's seat and tickets are let go
            # (before this socket is attached, so frames of the old seat never reach it).
            self.app.matchmaker.remove(player_id)
            if match is not None:
                self.app.engine.remove_player(player_id)
                log.info("seat_released", player_id=player_id, match_id=match.id)
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
            match_id=match.id if match is not None else None,
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
            self.app.engine.reload_subscribers.add(player_id)
        self._load_player(player_id)
        if match is not None:
            self.peer.send_frame(
                encode("match.rejoined", {"match_id": match.id, "mode": match.mode})
            )

    def _heartbeat(self, frame: Frame) -> None:
        self.reply(frame, "session.heartbeat", {"ts": int(time.time() * 1000)})

    def _matchmaker_add(self, frame: Frame) -> None:
        mode = require_mode(frame)
        assert self.player_id is not None
        if self.app.engine.match_of(self.player_id) is not None:
            raise ProtocolError(
                ErrorCode.ALREADY_IN_MATCH, "leave your current match first", frame.cid
            )
        try:
            ticket, existed = self.app.matchmaker.add(self.player_id, mode)
        except UnknownMode:
            raise ProtocolError(
                ErrorCode.UNKNOWN_MODE, self.app.registry.mode_refusal(mode), frame.cid
            ) from None
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
        if not self.app.engine.submit_input(self.player_id, check_input(frame)):
            raise ProtocolError(ErrorCode.NOT_IN_MATCH, "you are not in a match", frame.cid)

    def _match_leave(self, frame: Frame) -> None:
        assert self.player_id is not None
        match = self.app.engine.remove_player(self.player_id)
        if match is None:
            raise ProtocolError(ErrorCode.NOT_IN_MATCH, "you are not in a match", frame.cid)
        self.reply(frame, "match.left", {"match_id": match.id})

    # -- accounts and persistence -----------------------------------------------------------------
    def _spawn(self, frame: Frame, work: Coroutine[Any, Any, None]) -> None:
        """Run a handler that waits on I/O; its refusals become error frames like any other."""

        async def run() -> None:
            try:
                await work
            except ProtocolError as exc:
                self.send_error(exc.code, exc.message, exc.cid)
            except Exception:
                log.exception("frame_failed", player_id=self.player_id, type=frame.type)
                self.send_error(
                    ErrorCode.INTERNAL, "the server could not handle this frame", frame.cid
                )

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _account_error(self, frame: Frame, exc: AccountError) -> ProtocolError:
        code = {
            "taken": ErrorCode.USERNAME_TAKEN,
            "credentials": ErrorCode.INVALID_CREDENTIALS,
            "invalid_input": ErrorCode.INVALID_ACCOUNT_INPUT,
            "busy": ErrorCode.RATE_LIMITED,
        }.get(exc.kind, ErrorCode.STORE_UNAVAILABLE)
        return ProtocolError(code, exc.message, frame.cid)

    def _auth_register(self, frame: Frame) -> None:
        self._spawn(frame, self._account(frame, register=True))

    def _auth_login(self, frame: Frame) -> None:
        self._spawn(frame, self._account(frame, register=False))

    async def _account(self, frame: Frame, *, register: bool) -> None:
        accounts = self.app.accounts
        if accounts is None:
            raise ProtocolError(ErrorCode.STORE_UNAVAILABLE, "accounts are not enabled", frame.cid)
        username, password = frame.payload.get("username"), frame.payload.get("password")
        try:
            if register:
                player_id = await accounts.register(username, password)
            else:
                player_id = await accounts.login(username, password)
        except AccountError as exc:
            raise self._account_error(frame, exc) from None
        self._issued(frame, player_id, self.app.signer.issue(player_id))

    def _leaderboard_top(self, frame: Frame) -> None:
        board = require_str(frame, "board", max_length=64)
        if not BOARD_RE.match(board):
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE, "board must match [A-Za-z0-9_.:-]{1,64}", frame.cid
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
        loaded = store.acquire(player_id)
        self._frames_awaiting_load = []

        async def wait() -> None:
            try:
                await asyncio.wait_for(asyncio.shield(loaded), LOAD_TIMEOUT_S)
            except Exception as exc:
                log.warning("player_load_slow", player_id=player_id, error=repr(exc))
            held, self._frames_awaiting_load = self._frames_awaiting_load or [], None
            for data in held:
                if self.player_id is None:
                    return
                self.handle(data)

        task = asyncio.get_running_loop().create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _match_list(self, frame: Frame) -> None:
        mode = optional_mode(frame)
        matches = [
            {
                "match_id": m.id,
                "mode": m.mode,
                "players": list(m.players),
                "max_players": m.script.meta.max_players,
            }
            for m in self.app.engine.list_matches(mode)
        ]
        self.reply(frame, "match.list", {"matches": matches})

    def _match_join(self, frame: Frame) -> None:
        match_id = require_str(frame, "match_id", max_length=64)
        assert self.player_id is not None
        try:
            match = self.app.engine.join_match(self.player_id, match_id)
        except JoinRefused as exc:
            raise ProtocolError(JOIN_ERRORS[exc.reason], exc.message, frame.cid) from None
        self.app.matchmaker.remove(self.player_id)
        self.reply(
            frame,
            "match.joined",
            {"match_id": match.id, "mode": match.mode, "players": list(match.players)},
        )
