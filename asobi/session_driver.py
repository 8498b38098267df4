"""Runs a `Session` on the event loop: the only asyncio part of a client's conversation.

The session decides; the driver feeds it each message with the loop's time, calls its `tick` when
its `next_deadline` comes (one timer per connection, re-armed after every step), and carries out
the I/O it asks for: account register/login (password hashing runs in the accounts' thread pool)
and player data loads from the store.  Their results go back into the session as events.
"""

from __future__ import annotations

import asyncio

import structlog

from asobi.app import App
from asobi.directory import Peer
from asobi.session import LOAD_TIMEOUT_S, AccountRequest, LoadRequest, Request, Session

log = structlog.get_logger("asobi.session")


class SessionDriver:
    def __init__(self, app: App, peer: Peer, remote: str = "") -> None:
        self.app = app
        self.loop = asyncio.get_running_loop()
        self.session = Session(app, peer, remote, now=self.loop.time())
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._stepped()

    def receive(self, message: str | bytes) -> None:
        self.session.receive(message, self.loop.time())
        self._stepped()

    def closed(self) -> None:
        self.session.closed(self.loop.time())
        self._stepped()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- after every step: requests and the timer -------------------------------------------------
    def _stepped(self) -> None:
        for request in self.session.take_requests():
            self._start(request)
        deadline = self.session.next_deadline()
        if deadline == self._armed_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed_at = deadline
        if deadline is not None:
            self._timer = self.loop.call_at(deadline, self._due)

    def _due(self) -> None:
        self._timer = None
        self._armed_at = None
        self.session.tick(self.loop.time())
        self._stepped()

    def _start(self, request: Request) -> None:
        if isinstance(request, LoadRequest):
            store = self.app.store
            assert store is not None  # the session asks for loads only with a store
            # Queued now, within this step, not when the task first runs: a session that closes
            # right after must find the load already queued, so its release cancels it.
            work = self._load(request, store.acquire(request.player_id))
        else:
            work = self._account(request)
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _account(self, request: AccountRequest) -> None:
        accounts = self.app.accounts
        assert accounts is not None  # the session refuses account frames without accounts
        call = accounts.register if request.register else accounts.login
        try:
            player_id = await call(request.username, request.password)
        except Exception as exc:
            self.session.account_done(request, None, exc, self.loop.time())
        else:
            self.session.account_done(request, player_id, None, self.loop.time())
        self._stepped()

    async def _load(self, request: LoadRequest, loaded: asyncio.Future[None]) -> None:
        error: str | None = None
        try:
            await asyncio.wait_for(asyncio.shield(loaded), LOAD_TIMEOUT_S)
        except Exception as exc:
            error = repr(exc)
        self.session.load_done(request.player_id, error, self.loop.time())
        self._stepped()
