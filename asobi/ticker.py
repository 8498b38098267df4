"""Drives the engine from the event loop with one timer for all matches.

Facts that shaped this: one asyncio task per match costs several times more per tick than one
timer that runs every due match in a batch, and absolute deadlines (kept by the engine) keep the
tick rate exact however late a single wake-up is.
"""

from __future__ import annotations

import asyncio

import structlog

from asobi.engine import Engine

log = structlog.get_logger("asobi.ticker")


class Ticker:
    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.engine = engine
        self.loop = loop or asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._when = float("inf")
        self._stopped = False
        engine.on_schedule_change = self._wake_by

    def start(self) -> None:
        self._stopped = False
        nxt = self.engine.next_deadline()
        if nxt is not None:
            self._wake_by(nxt)

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._when = float("inf")

    def _wake_by(self, deadline: float) -> None:
        if self._stopped or deadline >= self._when:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._when = deadline
        self._handle = self.loop.call_at(deadline, self._run)

    def _run(self) -> None:
        self._handle = None
        self._when = float("inf")
        try:
            nxt = self.engine.run_due()
        except Exception:
            log.exception("ticker_failed")
            nxt = self.engine.next_deadline()
        if nxt is not None:
            self._wake_by(nxt)
