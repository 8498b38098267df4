"""The last line of defence: a thread outside the event loop that notices when it is wedged.

Budgets stop runaway scripts from inside the Lua state.  Whatever still escapes them (a C call that
never returns, a host function stuck in Python, a bug of ours) would otherwise freeze every match,
every socket and the signal handling of the whole process without a word.  This thread watches
from outside the loop:

- The runtime publishes the budgeted call running now (`asobi.lua.runtime.in_flight`).  A call
  still running `wedge_after_s` past its deadline is logged once as `match_wedged` (match, script,
  callback, elapsed); `/ready` answers false for `wedge_ready_hold_s` after it, and the engine
  ends that match at its next tick, so one bad script cannot wedge the loop tick after tick.
- The event loop bumps a heartbeat every HEARTBEAT_S.  When it has not turned for `wedge_exit_s`,
  the process logs `server_wedged` and exits with EXIT_WEDGED, for the supervisor (`restart:` in
  compose, systemd's `Restart=`) to start a fresh one.
- SIGTERM and SIGINT are taken by this thread (`sigtimedwait`; they are blocked everywhere else),
  because a Python-level or asyncio signal handler only runs when the main thread gets to run
  Python, which a stuck call prevents.  When the loop turns, the signal starts the usual graceful
  shutdown on it; when the loop has not turned for `stop_stuck_s` after the signal (or a second
  signal arrives), the process logs `shutdown_forced` and exits with EXIT_FORCED_STOP.

A process stopped and continued (SIGSTOP and SIGCONT, a paused container, a debugger) is not a
wedged loop: when this thread itself did not get to look for PAUSE_S, the pause is charged to
neither the loop nor the call in flight (`process_resumed`).  faulthandler's timer (below) runs
on through a stop, so one longer than `wedge_exit_s` + FAULTHANDLER_MARGIN_S can still end the
process (status 1), for its supervisor to restart.

Lupa releases the GIL while Lua runs, and Python code holding it is switched out every few
milliseconds, so this thread gets to run in both cases.  A C extension call that holds the GIL for
good would silence it: for that, `faulthandler` (a C thread that needs no GIL) is armed a few
seconds beyond the exit limit and re-armed by this thread while it runs; it prints every thread's
stack to stderr and exits with status 1.
"""

from __future__ import annotations

import asyncio
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from asobi.lua import runtime

log = structlog.get_logger("asobi.watchdog")

EXIT_WEDGED = 75  # EX_TEMPFAIL: the loop was stuck past the hard limit; a restart helps
EXIT_FORCED_STOP = 76  # stopped by a signal while the loop was stuck: nothing was flushed
HEARTBEAT_S = 0.1
POLL_S = 0.05
FAULTHANDLER_MARGIN_S = 5.0
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})
# This thread did not get to look for this long: the whole process was stopped (SIGSTOP, a paused
# container, a debugger) or starved, not the loop alone.
PAUSE_S = 1.0
LAST_LINE_WAIT_S = 1.0


@dataclass(frozen=True, slots=True)
class WatchdogSettings:
    wedge_after_s: float = 0.5
    wedge_exit_s: float = 10.0
    wedge_ready_hold_s: float = 30.0
    stop_stuck_s: float = 3.0


def takes_signals() -> bool:
    """Whether this platform lets a thread wait for signals (Linux; not macOS or Windows)."""
    return hasattr(signal, "sigtimedwait") and hasattr(signal, "pthread_sigmask")


class Watchdog:
    """Watches one event loop and the Lua calls made on it, from a daemon thread."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: WatchdogSettings,
        *,
        on_wedged: Callable[[str], None],
        on_stop: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.settings = settings
        self._on_wedged = on_wedged  # called from this thread: must be thread-safe
        self._on_stop = on_stop  # called on the loop
        self.beat = time.monotonic()
        self.takes_signals = False
        self._not_ready_until = 0.0
        self._reported: tuple[float, float, str, object] | None = None
        self._stop_signal: int | None = None
        self._heartbeat: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._checked_at = time.monotonic()
        self._resumed_perf = 0.0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="asobi-watchdog", daemon=True)

    # -- on the event loop ------------------------------------------------------------------------
    def start(self, *, take_signals: bool = True) -> None:
        """Start watching.  With `take_signals` (and platform support), SIGTERM and SIGINT are
        blocked in this thread, and so in every thread started after it, and waited for by the
        watchdog thread: call this before any other thread is started."""
        if take_signals and takes_signals():
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            self.takes_signals = True
        self._beat()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (the process is about to exit on its own).  Signals reach this thread
        the default way again: a SIGTERM during the rest of the exit ends the process."""
        self._closed.set()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        faulthandler.cancel_dump_traceback_later()
        if self.takes_signals:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def ready(self) -> bool:
        """False while a wedged call runs and for `wedge_ready_hold_s` after it."""
        return time.monotonic() >= self._not_ready_until

    def _beat(self) -> None:
        self.beat = time.monotonic()
        self._heartbeat = self.loop.call_later(HEARTBEAT_S, self._beat)

    # -- on the watchdog thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                self._wait_and_look()
            except Exception:
                # This thread is the last line of defence: a bug of ours in one look must not
                # end the watching (nor the signal handling) for the rest of the process's life.
                log.exception("watchdog_check_failed")
                self._closed.wait(POLL_S)

    def _wait_and_look(self) -> None:
        if self.takes_signals:
            info = signal.sigtimedwait(STOP_SIGNALS, POLL_S)
            # A wait cut short by a stop and continue (SIGSTOP, SIGCONT) after its timeout had
            # passed comes back from CPython with an unfilled siginfo: only the signals waited
            # for count.
            if info is not None and info.si_signo in STOP_SIGNALS:
                self._signalled(info.si_signo)
        else:
            self._closed.wait(POLL_S)
        if not self._closed.is_set():
            self.check(time.monotonic())

    def _signalled(self, signo: int) -> None:
        name = signal.Signals(signo).name
        if self._stop_signal is not None:
            self._exit("shutdown_forced", EXIT_FORCED_STOP, signal=name, reason="second signal")
        self._stop_signal = signo
        log.info("shutdown_signal", signal=name)
        self.loop.call_soon_threadsafe(self._on_stop)

    def check(self, now: float) -> None:
        """One look at the loop and the call in flight."""
        settings = self.settings
        if now - self._checked_at > PAUSE_S:
            # Nothing ran, this thread included: the loop is not to blame for the time the
            # process was stopped.  The loop's beat and any call in flight are timed from now.
            log.warning("process_resumed", paused_s=round(now - self._checked_at, 3))
            self.beat = max(self.beat, now)
            self._resumed_perf = time.perf_counter()
            self._armed_at = 0.0  # the fallback's timer ran during the pause: re-armed below
        self._checked_at = now
        stalled = now - self.beat
        call = runtime.in_flight()
        if call is not None and call is not self._reported:
            overdue = time.perf_counter() - max(call[1], self._resumed_perf)
            if overdue > settings.wedge_after_s:
                self._reported = call
                self._wedged(call)
        if call is not None and call is self._reported:
            self._not_ready_until = now + settings.wedge_ready_hold_s
        if self._stop_signal is not None and stalled > settings.stop_stuck_s:
            self._exit(
                "shutdown_forced",
                EXIT_FORCED_STOP,
                signal=signal.Signals(self._stop_signal).name,
                reason="event loop stuck",
                stalled_s=round(stalled, 3),
                **_describe(call),
            )
        if stalled > settings.wedge_exit_s:
            self._exit("server_wedged", EXIT_WEDGED, stalled_s=round(stalled, 3), **_describe(call))
        if now - self._armed_at > 1.0:
            # A fallback for a thread holding the GIL for good, which would stop this one too.
            faulthandler.dump_traceback_later(
                settings.wedge_exit_s + FAULTHANDLER_MARGIN_S, exit=True
            )
            self._armed_at = now

    def _wedged(self, call: tuple[float, float, str, runtime.MatchLua]) -> None:
        described = _describe(call)
        log.error("match_wedged", **described)
        match_id = described.get("match_id")
        if isinstance(match_id, str) and match_id:
            self._on_wedged(match_id)

    def _exit(self, event: str, status: int, **fields: object) -> None:
        """Log one last line and leave at once: the loop is stuck, nothing else can run.  The
        line is written from another thread, so that a stuck stdout cannot keep us here."""

        def last_line() -> None:
            log.critical(event, exit_status=status, **fields)
            sys.stdout.flush()

        writer = threading.Thread(target=last_line, daemon=True)
        writer.start()
        writer.join(LAST_LINE_WAIT_S)
        os._exit(status)


def _describe(call: tuple[float, float, str, runtime.MatchLua] | None) -> dict[str, object]:
    """The log fields naming a call in flight (none when no call runs)."""
    if call is None:
        return {}
    started, deadline, label, lua = call
    now = time.perf_counter()
    return {
        "match_id": lua.match_id or None,
        "script": lua.script_name or None,
        "callback": label,
        "budget_s": round(deadline - started, 3),
        "elapsed_s": round(now - started, 3),
    }
