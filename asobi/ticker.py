"""Drives the engine from the event loop with one timer for all matches.

Facts that shaped this: one asyncio task per match costs several times more per tick than one
timer that runs every due match in a batch, and absolute deadlines (kept by the engine) keep the
tick rate exact however late a single wake-up is.  With hundreds of matches their phases are
spread over the period (`Engine.adopt`), so a wake-up per match-tick would cost a timer and an
`epoll_wait` each; instead a wake-up also runs the matches due soon after it, up to EARLY_SHARE
of their period early (4 ms at 10 Hz), and never less than COALESCE_S (Node's timers, under
Colyseus, coalesce per millisecond).  A wake-up of the loop is far from free on a virtual
machine: measured side by side, two servers of 150 matches on one core, a pass with no match to
run cost about 35 us, and widening the window from 1 ms to 4 ms at 10 Hz took 10% off the server
CPU per delivered frame, per-player and with `shared_state` (passes 1,000 -> at most 250 a
second).  A match run early is not late: its frames leave a few milliseconds before their time,
which the client's interpolation absorbs like any network jitter; the schedule itself does not
move (the next deadline is still one period after this one).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from asobi.config import TICK_EARLY_SHARE as EARLY_SHARE
from asobi.engine import Engine

log = structlog.get_logger("asobi.ticker")

# How early a match may tick to share a wake-up with one due now: EARLY_SHARE of its period (the
# default of ASOBI_TICK_EARLY_SHARE), and never less than COALESCE_S (at 60 Hz, 6% of the
# period).  They bound the wake-ups to 250 a second at 10 Hz, 1,000 at 60 Hz, however many
# matches run.
COALESCE_S = 0.001
# A pass overdue by this much runs from the read path (`Ticker.run_overdue`): the loop reads every
# connection that is ready before it runs a timer that fell due meanwhile, so a burst of inputs
# from hundreds of players would make every match due during it late by the whole burst.
OVERDUE_S = 0.002


class Ticker:
    def __init__(
        self,
        engine: Engine,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        on_pass_start: Callable[[], None] | None = None,
        on_pass_end: Callable[[], None] | None = None,
        early_share: float = EARLY_SHARE,
    ) -> None:
        """`on_pass_start` and `on_pass_end` bracket each pass over the due matches (the server
        holds the frames a pass writes until it ends, `asobi.server_writes`); `early_share` is
        how much of its period early a match may run in a pass (ASOBI_TICK_EARLY_SHARE)."""
        self.engine = engine
        self.early_share = early_share
        self.on_pass_start = on_pass_start
        self.on_pass_end = on_pass_end
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

    def run_overdue(self, now: float) -> None:
        """Run the pass now if it has been due for OVERDUE_S (called between the messages the
        loop reads, which never happens inside a pass: passes read nothing)."""
        if now - self._when < OVERDUE_S:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._run()

    def _run(self) -> None:
        self._handle = None
        self._when = float("inf")
        if self.on_pass_start is not None:
            self.on_pass_start()
        try:
            engine = self.engine
            nxt = engine.run_due(engine.clock(), self.early_share, COALESCE_S)
        except Exception:
            log.exception("ticker_failed")
            nxt = self.engine.next_deadline()
        finally:
            if self.on_pass_end is not None:
                self.on_pass_end()
        if nxt is not None:
            self._wake_by(nxt)
