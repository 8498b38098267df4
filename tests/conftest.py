"""Shared fixtures: a real server on an ephemeral loopback port, real WebSocket clients, and the
server's JSON log lines as parsed dicts.

Every test gets its own server and game dir (function-scoped, like the test's event loop: mixing
loop scopes leaves a server on an idle loop).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from asobi import log as logsetup
from asobi.app import App
from asobi.config import Settings
from asobi.directory import Outbox
from asobi.engine import Engine
from asobi.lua import native
from asobi.lua.runtime import EachResult
from asobi.match import Match
from asobi.scripts import ScriptRegistry
from asobi.server import AsobiServer
from tests.browser_support import browser, chromium  # noqa: F401  (browser test fixtures)

TUTORIAL = """\
function init(state)
  state.counter = 0
  state.message = "hello"
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, message = state.message }
end
"""


class LogCapture:
    """A binary stream for structlog that keeps every JSON line it is given."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        for raw in data.splitlines():
            if raw.strip():
                with self._lock:
                    self.lines.append(orjson.loads(raw))

    def flush(self) -> None:
        pass

    def events(self, name: str, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [line for line in self.lines[since:] if line.get("event") == name]


LOGS = LogCapture()


def pytest_configure(config: pytest.Config) -> None:
    logsetup.configure("debug", LOGS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """ASOBI_TEST_DATABASE_ONLY=1 (CI's PostgreSQL pass, after the full SQLite one): run only the
    tests that get a database (the `database_url` fixture); the others never touch one and have
    just passed."""
    if os.environ.get("ASOBI_TEST_DATABASE_ONLY") != "1":
        return
    keep = [item for item in items if "database_url" in getattr(item, "fixturenames", ())]
    deselected = [item for item in items if item not in keep]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = keep


@dataclass
class Logs:
    """The log lines written since the test started."""

    start: int

    def events(self, name: str) -> list[dict[str, Any]]:
        return LOGS.events(name, self.start)

    async def wait_for(
        self,
        name: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda _: True,
        timeout: float = 5.0,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.events(name):
                if predicate(line):
                    return line
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {name!r} log line within {timeout}s; saw {self.events(name)}")


@pytest.fixture
def logs() -> Logs:
    return Logs(len(LOGS.lines))


@pytest.fixture(params=["c", "lua"])
def budget_machinery(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test once with the budgeted calls in C (`asobi/lua/_budget.c`) and once with
    calls.lua's own: the containment rules must hold in both, and a process without the C parts
    runs the Lua ones.  Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    if request.param == "c":
        if native.library() is None or not native.budget_in_c:
            pytest.skip("asobi's Lua C functions are not built here")
    else:
        monkeypatch.setattr(native, "budget_in_c", False)
    return str(request.param)


# A test client that stopped reading has up to 16 frames queued ahead of the server's reply to its
# close (websockets stops reading the socket past its max_queue), so it would wait the library's
# 10 s for a reply it cannot see: tests close with a short wait, then drop the socket.
CLOSE_TIMEOUT_S = 0.5


class Client:
    """A real WebSocket client speaking asobi's JSON frames."""

    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.player_id: str | None = None

    async def send(self, kind: str, payload: Any = None, cid: Any = None) -> None:
        frame: dict[str, Any] = {"type": kind, "payload": {} if payload is None else payload}
        if cid is not None:
            frame["cid"] = cid
        await self.ws.send(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return orjson.loads(raw)

    async def expect(self, kind: str, timeout: float = 5.0, skip: tuple[str, ...] = ()) -> dict:
        """Next frame of type `kind`; frames of types in `skip` (and match.state) are passed."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind!r} frame within {timeout}s")
            frame = await self.recv(left)
            if frame["type"] == kind:
                return frame
            if frame["type"] not in skip and frame["type"] != "match.state":
                raise AssertionError(f"expected {kind!r}, got {frame}")

    async def request(self, kind: str, payload: Any = None, reply: str | None = None) -> dict:
        await self.send(kind, payload, cid=kind)
        frame = await self.expect(reply or kind, skip=("matchmaker.matched",))
        return frame

    async def login_guest(self) -> str:
        """`auth.guest` answers with a token and opens the session on the same connection."""
        await self.send("auth.guest")
        await self.expect("auth.token")
        connected = await self.expect("session.connected")
        self.player_id = connected["payload"]["player_id"]
        return self.player_id

    async def states(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The payloads of the next `count` match.state frames (other frames are skipped)."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count:
            frame = await self.recv(max(deadline - time.monotonic(), 0.001))
            if frame["type"] == "match.state":
                out.append(frame["payload"])
        return out

    async def close(self) -> None:
        await self.ws.close()


class Connects:
    """Real clients of one server (its `url`), kept in `clients` to be closed at teardown."""

    url: str
    clients: list[Client]

    async def client(self) -> Client:
        ws = await websockets.connect(self.url, max_size=2**22, close_timeout=CLOSE_TIMEOUT_S)
        client = Client(ws)
        self.clients.append(client)
        return client

    async def player(self, mode: str | None = None) -> Client:
        """A guest client, logged in, and queued for `mode` when given."""
        client = await self.client()
        await client.login_guest()
        if mode is not None:
            await client.send("matchmaker.add", {"mode": mode})
            await client.expect("matchmaker.queued")
        return client


@dataclass
class Running(Connects):
    app: App
    server: AsobiServer
    game_dir: Path
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def write(self, name: str, source: str) -> None:
        """Save a script the way a plain editor does (truncate and write in place)."""
        (self.game_dir / name).write_text(source)


def take_lateness(app: App) -> list[float]:
    """Every tick lateness sample (seconds) the engine recorded since the previous call.

    Housekeeping moves the engine's samples into the metrics every second, so both places are
    read; reading only the engine's would miss most of them."""
    app.metrics.take_lateness(app.engine)
    return app.metrics.drain_recent_lateness()


def run_queue_wait() -> float:
    """Seconds this process's threads have spent ready to run but waiting for a CPU, from Linux's
    schedstat (0.0 where there is none).

    A busy machine keeps the event loop's thread, or a thread holding the GIL, off the CPU, and
    each such wait shows up as tick lateness that no server code caused.  A lateness bound plus
    the wait measured over the same window holds on a loaded machine and stays as strict as the
    bound alone on an idle one."""
    total = 0
    try:
        tasks = list(os.scandir("/proc/self/task"))
    except OSError:
        return 0.0
    for task in tasks:
        try:
            with open(os.path.join(task.path, "schedstat")) as stats:
                total += int(stats.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


TEST_DATABASE_URL = os.environ.get("ASOBI_TEST_DATABASE_URL", "")


@pytest.fixture
async def database_url() -> AsyncIterator[str]:
    """The database for this test: "" (SQLite in the test's data dir) unless
    ASOBI_TEST_DATABASE_URL names a PostgreSQL server, where each test gets its own schema."""
    if not TEST_DATABASE_URL:
        yield ""
        return
    import asyncpg

    schema = "t_" + uuid.uuid4().hex[:16]
    conn = await asyncpg.connect(TEST_DATABASE_URL)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in TEST_DATABASE_URL else "?"
        yield f"{TEST_DATABASE_URL}{sep}search_path={schema}"
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def start_server(tmp_path: Path, database_url: str) -> AsyncIterator[Callable[..., Any]]:
    running: list[Running] = []

    async def start(files: dict[str, str] | None = None, **overrides: Any) -> Running:
        game_dir = tmp_path / f"game{len(running)}"
        game_dir.mkdir()
        for name, source in (files if files is not None else {"match.lua": TUTORIAL}).items():
            path = game_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source)
        settings = Settings.from_env(
            {},
            host="127.0.0.1",
            port=0,
            game_dir=game_dir,
            data_dir=tmp_path / "data",
            secret="test-secret-with-enough-length-for-hs256",
            **{"database_url": database_url, **overrides},
        )
        app = App.create(settings)
        server = AsobiServer(app)
        await server.start()
        run = Running(app, server, game_dir)
        running.append(run)
        return run

    yield start
    for run in running:
        await asyncio.gather(*(client.close() for client in run.clients))
        await run.server.stop()


def engine_match(game_dir: Path, source: str, outbox: Outbox, players: list[str]) -> Match:
    """A match of `source` (written as `game_dir`/match.lua) on an engine alone, frames to
    `outbox`, started and ready to tick."""
    (game_dir / "match.lua").write_text(source)
    registry = ScriptRegistry(game_dir)
    assert not registry.load_all()
    script = registry.get("match.lua")
    assert script is not None
    match = Engine(registry, outbox).start_match("m", script, players)
    match.release_held()
    return match


def each_data(result: EachResult) -> Any:
    """A `MatchLua.call_each` result as plain data whichever way it crossed (None for a failed
    call)."""
    data, text, _ = result
    return orjson.loads(text) if text is not None else data
