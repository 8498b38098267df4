"""Arbitrary frames thrown at a live server while a match runs.

Hypothesis drives a synchronous client (the server runs on its own event loop in a thread), so
each generated example goes over a real socket.  After every example the fuzzing connection must
still answer a heartbeat; at the end the match's counter, as seen by a separate client, must not
have skipped a tick, and no handler may have raised (`frame_failed`, `match_crashed`, or an error
logged by websockets).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from asobi.app import App
from asobi.config import Settings
from asobi.protocol import CLIENT_TYPES
from asobi.server import AsobiServer
from tests.conftest import LOGS
from tests.protocol_support import GAME

TIME_BUDGET_S = 12.0


class ThreadedServer:
    """A real server on its own loop in a background thread."""

    def __init__(self, game_dir: Path, data_dir: Path) -> None:
        self.settings = Settings.from_env(
            {},
            host="127.0.0.1",
            port=0,
            game_dir=game_dir,
            data_dir=data_dir,
            secret="fuzz-secret-with-enough-length-for-hs256",
            reload="off",
            rate_limit_per_s=100_000,
            rate_limit_burst=100_000,
            connect_rate_per_ip=100_000,
            connect_burst_per_ip=100_000,
        )
        self.app = App.create(self.settings)
        self.loop = asyncio.new_event_loop()
        self.server = AsobiServer(self.app)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.server.port}/ws"


def request(ws: ClientConnection, frame: dict[str, Any], reply: str) -> dict[str, Any]:
    ws.send(orjson.dumps(frame).decode())
    deadline = time.monotonic() + 5
    while True:
        got = orjson.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        if got["type"] == reply and got.get("cid") == frame.get("cid"):
            return got


class Watcher(threading.Thread):
    """A well-behaved player of the match, recording every counter it is sent."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(daemon=True)
        self.ws = connect(url, max_size=2**22, legacy=True)
        request(
            self.ws, {"type": "session.connect", "payload": {"token": token}}, "session.connected"
        )
        self.ws.send(orjson.dumps({"type": "matchmaker.add", "payload": {"mode": "m"}}).decode())
        self.match_id = ""
        while not self.match_id:
            frame = orjson.loads(self.ws.recv(timeout=5))
            if frame["type"] == "matchmaker.matched":
                self.match_id = frame["payload"]["match_id"]
        self.counters: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                frame = orjson.loads(self.ws.recv(timeout=0.2))
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            if frame["type"] == "match.state":
                self.counters.append(frame["payload"]["counter"])


class Fuzzer:
    def __init__(self, url: str, token: str, match_id: str) -> None:
        self.url, self.token, self.match_id = url, token, match_id
        self.closes: list[int | None] = []
        self.beats = 0
        self.ws = self._open()

    def _open(self) -> ClientConnection:
        ws = connect(self.url, max_size=2**22, legacy=True)
        request(
            ws, {"type": "session.connect", "payload": {"token": self.token}}, "session.connected"
        )
        join = {"type": "match.join", "payload": {"match_id": self.match_id}, "cid": "join"}
        ws.send(orjson.dumps(join).decode())
        while True:
            frame = orjson.loads(ws.recv(timeout=5))
            if frame.get("cid") == "join":
                assert frame["type"] == "match.joined" or (
                    frame["payload"]["code"] == "already_in_match"
                ), frame
                return ws

    def throw(self, raw: str | bytes, *, text: bool) -> None:
        try:
            self.ws.send(raw, text=text)
            self.heartbeat()
        except ConnectionClosed:
            # Invalid UTF-8 (1007) and oversized messages (1009) end the connection, as the
            # WebSocket protocol requires; nothing else may.
            self.closes.append(self.ws.protocol.close_code)
            assert self.ws.protocol.close_code in (1007, 1009), self.ws.protocol.close_code
            self.ws = self._open()
            self.heartbeat()

    def heartbeat(self) -> None:
        self.beats += 1
        request(
            self.ws, {"type": "session.heartbeat", "cid": f"hb{self.beats}"}, "session.heartbeat"
        )


json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner, max_size=6)
    ),
    max_leaves=30,
)
# Payload keys the server and the match script read.  The script's `close` and `finish` are left
# out on purpose: they close the match to joins or end it, and the fuzzer must be able to rejoin
# the same running match after a 1007/1009 close while the watcher sees every one of its ticks.
KEYS = [
    "mode",
    "ticket_id",
    "match_id",
    "token",
    "resume_token",
    "add",
    "whisper",
    "shout",
]
payloads = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), json_value, max_size=5)
types = st.sampled_from(sorted(CLIENT_TYPES - {"session.connect", "match.leave"})) | st.text(
    max_size=20
)
frame_objects = st.fixed_dictionaries(
    {"type": types | json_value, "payload": payloads | json_value},
    optional={"cid": json_value},
)


def nested(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


depths = st.sampled_from([30, 31, 32, 33, 500, 990, 1000, 1023, 1024, 1100]) | st.integers(1, 1200)
texts = st.one_of(
    frame_objects.map(lambda f: orjson.dumps(f).decode()),
    json_value.map(lambda v: orjson.dumps(v).decode()),
    st.text(max_size=200),
    st.tuples(st.integers(1, 3000), st.sampled_from(["list", "dict"])).map(lambda t: nested(*t)),
    st.tuples(depths, st.sampled_from(["list", "dict"])).map(
        lambda t: '{"type":"match.input","payload":{"x":' + nested(*t) + "}}"
    ),
    st.integers(60_000, 70_000).map(
        lambda n: '{"type":"match.input","payload":{"shout":"' + "a" * n + '"}}'
    ),
    st.integers(1, 40).map(lambda n: '{"type":"match.input","payload":{"add":' + "9" * n + "}}"),
    st.integers(1, 40).map(lambda n: '{"type":"match.input","payload":{"add":-' + "9" * n + "}}"),
)
raw_bytes = st.binary(max_size=300)
invalid_utf8 = st.binary(max_size=50).map(lambda b: b + b"\xff\xfe" + b)
throws = st.one_of(
    texts.map(lambda t: (t, True)),
    raw_bytes.map(lambda b: (b, False)),
    invalid_utf8.map(lambda b: (b, True)),
)


@pytest.fixture
def threaded_server(tmp_path: Path) -> Iterator[ThreadedServer]:
    game_dir = tmp_path / "game"
    game_dir.mkdir()
    (game_dir / "match.lua").write_text(GAME.replace("max_players = 3", "max_players = 2"))
    server = ThreadedServer(game_dir, tmp_path / "data")
    server.start()
    yield server
    server.stop()


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_arbitrary_frames_never_break_the_server(threaded_server: ThreadedServer) -> None:
    start = len(LOGS.lines)
    errors = _Errors()
    logging.getLogger("websockets").addHandler(errors)
    signer = threaded_server.app.signer
    watcher = Watcher(threaded_server.url, signer.issue("watcher"))
    watcher.start()
    fuzzer = Fuzzer(threaded_server.url, signer.issue("fuzzer"), watcher.match_id)
    deadline = time.monotonic() + TIME_BUDGET_S

    @settings(
        max_examples=1000,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.lists(throws, min_size=1, max_size=5))
    # Known-nasty frames always run, whatever hypothesis draws.
    @example([('{"type":"match.input","payload":{"x":' + nested(1000, "list") + "}}", True)])
    @example([('{"type":"match.input","payload":{"add":18446744073709551615}}', True)])
    @example([(b"\xff\xfe", True), (b"\x00", False), ("[" * 5000 + "]" * 5000, True)])
    def fuzz(batch: list[tuple[str | bytes, bool]]) -> None:
        if time.monotonic() > deadline:
            return
        for raw, text in batch:
            fuzzer.throw(raw, text=text)

    try:
        fuzz()
        fuzzer.heartbeat()
        # The match still ticks after the last frame: a few more counters arrive.
        seen = len(watcher.counters)
        give_up = time.monotonic() + 5
        while len(watcher.counters) < seen + 3 and time.monotonic() < give_up:
            time.sleep(0.01)
    finally:
        watcher.stop.set()
        watcher.join(2)
        logging.getLogger("websockets").removeHandler(errors)
    counters = watcher.counters
    assert len(counters) > 20
    assert counters == list(range(counters[0], counters[0] + len(counters))), "a tick was skipped"
    escaped = [
        line
        for line in LOGS.lines[start:]
        if line.get("event") in ("frame_failed", "match_crashed", "ticker_failed")
    ]
    assert not escaped, escaped[:3]
    assert not errors.records, [r.getMessage() for r in errors.records[:3]]
    assert fuzzer.beats > 50
    assert len(counters) >= seen + 3, "the match stopped ticking"
    assert threaded_server.app.engine.matches  # the match is still running
