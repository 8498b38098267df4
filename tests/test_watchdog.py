"""The watchdog against a truly stuck server: a real `asobi serve` process (tests/wedge_server.py,
which adds one test-only way to wedge a call, see its docstring), real clients, real signals, and
the process's own JSON log lines and exit status.

/ready is answered by the event loop like every route: while the loop is stuck nothing answers
(a probe times out, which a load balancer or orchestrator treats as failing), so these tests read
/ready after the wedged call returned, when it must still say false (`ASOBI_WEDGE_READY_HOLD_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from asobi.watchdog import EXIT_FORCED_STOP, EXIT_WEDGED
from tests.conftest import Client

LAUNCHER = Path(__file__).with_name("wedge_server.py")

VICTIM = """
tick_rate = 20
function init(state) state.counter = 0 return state end
function tick(state) state.counter = state.counter + 1 return state end
function get_state(state) return { counter = state.counter } end
"""

WEDGE = """
tick_rate = 20
function init(state) state.n = 0 return state end
function tick(state)
  state.n = state.n + 1
  if state.n == 3 then game.log("info", "{how}:{seconds}") end
  return state
end
function get_state(state) return {{ n = state.n }} end
"""


class ServerProcess:
    """A server in a child process; its stdout JSON lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[dict[str, Any]] = []
        self.port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, tmp_path: Path, wedge: str, **env: str) -> ServerProcess:
        game = tmp_path / "game"
        game.mkdir()
        (game / "victim.lua").write_text(VICTIM)
        (game / "wedge.lua").write_text(wedge)
        full_env = {
            **os.environ,
            "ASOBI_HOST": "127.0.0.1",
            "ASOBI_PORT": "0",
            "ASOBI_GAME_DIR": str(game),
            "ASOBI_DATA_DIR": str(tmp_path / "data"),
            "ASOBI_SECRET": "test-secret-with-enough-length-for-hs256",
            "ASOBI_RELOAD": "off",
            "ASOBI_DATABASE_URL": "",
            **env,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(LAUNCHER), env=full_env, stdout=asyncio.subprocess.PIPE
        )
        server = cls(proc)
        await asyncio.wait_for(server.port, 20)
        return server

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            with contextlib.suppress(orjson.JSONDecodeError):
                line = orjson.loads(raw)
                self.lines.append(line)
                if line.get("event") == "server_started" and not self.port.done():
                    self.port.set_result(line["port"])

    async def wait_for(self, event: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.get("event") == event:
                    return line
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {event!r} line within {timeout}s")

    def events(self, event: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == event]

    async def player(self, mode: str) -> tuple[Client, str]:
        ws = await websockets.connect(f"ws://127.0.0.1:{self.port.result()}/ws")
        client = Client(ws)
        await client.login_guest()
        await client.send("matchmaker.add", {"mode": mode})
        matched = await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
        return client, matched["payload"]["match_id"]

    async def get(self, path: str) -> tuple[int, Any]:
        def fetch() -> tuple[int, Any]:
            url = f"http://127.0.0.1:{self.port.result()}{path}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    return response.status, orjson.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, orjson.loads(exc.read())

        return await asyncio.to_thread(fetch)

    async def exit_status(self, timeout: float) -> int:
        status = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return status

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


@pytest.fixture
async def processes() -> Any:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        await server.kill()


@pytest.mark.parametrize("how", ["wedge", "spin"])
async def test_a_wedged_call_is_reported_and_its_match_ended(
    tmp_path: Path, processes: list[ServerProcess], how: str
) -> None:
    """A tick stuck 1.5 s (GIL released: `wedge`; held by Python: `spin`) is logged as
    match_wedged with its match, script and callback; the match is ended at its next tick, /ready
    says false after it, /health stays ok, the victim match goes on, and SIGTERM still stops the
    server gracefully."""
    server = await ServerProcess.start(
        tmp_path,
        WEDGE.format(how=how, seconds=1.5),
        ASOBI_WEDGE_AFTER_S="0.3",
        ASOBI_WEDGE_EXIT_S="8",
    )
    processes.append(server)
    victim, _ = await server.player("victim")
    player, match_id = await server.player("wedge")
    wedged = await server.wait_for("match_wedged")
    assert wedged["match_id"] == match_id
    assert wedged["script"] == "wedge.lua"
    assert wedged["callback"] == "tick"
    assert wedged["elapsed_s"] >= 0.3 + wedged["budget_s"]
    finished = await player.expect("match.finished", timeout=10)
    assert "time budget" in finished["payload"]["result"]["error"]
    assert await server.get("/ready") == (503, {"ready": False})
    assert await server.get("/health") == (200, {"status": "ok"})
    before = (await victim.states(1))[0]["counter"]
    after = (await victim.states(5))[-1]["counter"]
    assert after >= before + 4
    assert server.proc.returncode is None
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_status(15) == 0
    assert server.events("server_stopped")
    assert not server.events("shutdown_forced")


async def test_a_loop_stuck_past_the_hard_limit_exits_with_its_own_status(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """A call that never returns: after ASOBI_WEDGE_EXIT_S the process logs server_wedged and
    exits with EXIT_WEDGED, for the supervisor to restart it."""
    server = await ServerProcess.start(
        tmp_path,
        WEDGE.format(how="wedge", seconds=120),
        ASOBI_WEDGE_AFTER_S="0.3",
        ASOBI_WEDGE_EXIT_S="2",
    )
    processes.append(server)
    await server.player("wedge")
    await server.wait_for("match_wedged")
    assert await server.exit_status(10) == EXIT_WEDGED
    (line,) = server.events("server_wedged")
    assert line["stalled_s"] >= 2
    assert line["callback"] == "tick"
    assert line["script"] == "wedge.lua"
    assert not server.events("server_stopped")


async def test_sigterm_exits_promptly_while_the_loop_is_stuck(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """SIGTERM to a server whose loop is stuck (long before the hard limit): the watchdog thread
    receives it, sees the loop not turning for ASOBI_STOP_STUCK_S, logs shutdown_forced and exits
    with EXIT_FORCED_STOP."""
    server = await ServerProcess.start(
        tmp_path,
        WEDGE.format(how="wedge", seconds=120),
        ASOBI_WEDGE_AFTER_S="0.3",
        ASOBI_WEDGE_EXIT_S="60",
        ASOBI_STOP_STUCK_S="1",
    )
    processes.append(server)
    await server.player("wedge")
    await server.wait_for("match_wedged")
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_status(10) == EXIT_FORCED_STOP
    assert time.monotonic() - signalled < 3.0
    (line,) = server.events("shutdown_forced")
    assert line["signal"] == "SIGTERM"
    assert line["callback"] == "tick"
    assert not server.events("server_stopped")


async def test_sigterm_on_a_turning_loop_is_the_graceful_shutdown(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """With the watchdog taking the signals, a server whose loop turns still shuts down the
    graceful way: connections closed, store written out, status 0, nothing forced."""
    server = await ServerProcess.start(tmp_path, VICTIM)
    processes.append(server)
    player, _ = await server.player("victim")
    await player.states(2)
    assert await server.get("/ready") == (200, {"ready": True})
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_status(15) == 0
    assert server.events("store_closed")
    assert server.events("server_stopped")
    assert not server.events("shutdown_forced")


async def test_a_server_stopped_and_continued_plays_on_and_still_stops_gracefully(
    tmp_path: Path, processes: list[ServerProcess]
) -> None:
    """SIGSTOP, then SIGCONT 1.5 s later (a paused container, a debugger): the watchdog takes
    the pause for neither a wedged loop nor a wedged call, the match plays on, and SIGTERM still
    reaches the watchdog thread and stops the server the graceful way."""
    server = await ServerProcess.start(tmp_path, VICTIM)
    processes.append(server)
    player, _ = await server.player("victim")
    await player.states(2)
    server.proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(1.5)
    server.proc.send_signal(signal.SIGCONT)
    resumed = await server.wait_for("process_resumed")
    assert resumed["paused_s"] >= 1.0
    before = (await player.states(1))[0]["counter"]
    assert [s["counter"] for s in await player.states(3)] == [before + 1, before + 2, before + 3]
    server.proc.send_signal(signal.SIGTERM)
    assert await server.exit_status(15) == 0
    assert server.events("server_stopped")
    for trouble in ("server_wedged", "match_wedged", "watchdog_check_failed", "shutdown_forced"):
        assert not server.events(trouble), trouble
