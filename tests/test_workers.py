"""`asobi serve --workers N` as real processes: a supervisor, its workers, a private redis-server.

The workers need PostgreSQL (ASOBI_TEST_DATABASE_URL); the refusals do not and always run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import websockets

from asobi.handoff import Incomplete, requested_node
from tests.conftest import TEST_DATABASE_URL, TUTORIAL

ROOT = Path(__file__).resolve().parent.parent
needs_postgres = pytest.mark.skipif(
    not TEST_DATABASE_URL, reason="a cluster needs PostgreSQL: set ASOBI_TEST_DATABASE_URL"
)
needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    game = tmp_path / "game"
    game.mkdir(exist_ok=True)
    (game / "match.lua").write_text(TUTORIAL)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(ROOT),
        "ASOBI_LOG_FORMAT": "json",
        "ASOBI_SECRET": "test-secret-with-enough-length-for-hs256",
        "ASOBI_GAME_DIR": str(game),
        "ASOBI_DATA_DIR": str(tmp_path / "data"),
        "ASOBI_HOST": "127.0.0.1",
        "ASOBI_PORT": "0",
        **extra,
    }


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


class Supervised:
    """A running `asobi serve --workers N`: its port, its JSON log lines, HTTP to it."""

    def __init__(self, process: subprocess.Popen[bytes], out: Path, err: Path) -> None:
        self.process = process
        self.out = out
        self.err = err
        self.port = 0

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        lines = [orjson.loads(raw) for raw in self.out.read_bytes().splitlines() if raw.strip()]
        return [line for line in lines if event is None or line.get("event") == event]

    async def wait_for(
        self, event: str, where: Callable[[dict[str, Any]], bool] = lambda _: True, n: int = 1
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = [line for line in self.logs(event) if where(line)]
            if len(found) >= n:
                return found
            assert self.process.poll() is None or event.startswith("supervisor_stopped"), (
                self.err.read_text()
            )
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {event} logged: {self.err.read_text()}")

    async def get(self, path: str) -> tuple[int, str, dict[str, Any]]:
        """Status, the answering node (X-Asobi-Node) and the JSON body of GET path."""

        def fetch() -> tuple[int, str, dict[str, Any]]:
            url = f"http://127.0.0.1:{self.port}{path}"
            with urllib.request.urlopen(url, timeout=10) as response:
                node = response.headers.get("X-Asobi-Node", "")
                return response.status, node, orjson.loads(response.read())

        return await asyncio.to_thread(fetch)


@pytest.fixture
async def supervise(tmp_path: Path, database_url: str) -> AsyncIterator[Callable[..., Any]]:
    started: list[Supervised] = []

    async def start(workers: int = 2) -> Supervised:
        out, err = tmp_path / "stdout.log", tmp_path / "stderr.log"
        env = _env(tmp_path, ASOBI_DATABASE_URL=database_url)
        with out.open("wb") as out_file, err.open("wb") as err_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "asobi", "serve", "--workers", str(workers)],
                cwd=tmp_path,
                env=env,
                stdout=out_file,
                stderr=err_file,
            )
        running = Supervised(process, out, err)
        started.append(running)
        (line,) = await running.wait_for("supervisor_started")
        running.port = line["port"]
        assert f"listening on ws://127.0.0.1:{running.port}/ws" in err.read_text()
        return running

    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(running.process.wait, 30)


def _alive(pid: int) -> bool:
    """Running (an exited orphan may stay a zombie until its new parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def _gone(pid: int, within_s: float = 20.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


# -- refusals (no PostgreSQL, no Redis needed) -----------------------------------------------------
def test_workers_without_postgresql_refuse_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asobi", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "PostgreSQL" in line and "ASOBI_DATABASE_URL=postgresql://" in line
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_workers_without_redis_or_redis_server_refuse_in_one_line(tmp_path: Path) -> None:
    no_redis = tmp_path / "bin"
    no_redis.mkdir()  # a PATH on which redis-server is not found
    env = _env(tmp_path, PATH=str(no_redis), ASOBI_DATABASE_URL="postgresql://a:b@127.0.0.1:1/x")
    result = subprocess.run(
        [sys.executable, "-m", "asobi", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "ASOBI_REDIS_URL=redis://" in line and "install redis-server" in line


@needs_redis_server
def test_workers_that_cannot_start_stop_the_supervisor_with_an_error(tmp_path: Path) -> None:
    # No database answers on port 1: each worker fails opening its store.
    env = _env(tmp_path, ASOBI_DATABASE_URL="postgresql://a:b@127.0.0.1:1/x")
    result = subprocess.run(
        [sys.executable, "-m", "asobi", "serve", "--workers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 1
    assert "exited with status 1 before it was ready" in result.stderr.splitlines()[-1]
    events = [orjson.loads(raw)["event"] for raw in result.stdout.splitlines() if raw.strip()]
    assert "supervisor_started" not in events
    assert events.count("worker_exited") == 2  # the failed one, and the other one stopped
    assert "private_redis_stopped" in events


def test_request_line_routing() -> None:
    assert requested_node(b"GET /ws?node=vm-w2 HTTP/1.1\r\nHost: x\r\n") == "vm-w2"
    assert requested_node(b"GET /health?a=1&node=n%201 HTTP/1.1\r\n") == "n 1"
    assert requested_node(b"GET /ws HTTP/1.1\r\n") is None
    assert requested_node(b"\x16\x03\x01 not http\r\n") is None
    assert requested_node(b"x" * 5000) is None  # no line within the peek: any worker refuses it
    with pytest.raises(Incomplete):
        requested_node(b"GET /ws?node=vm-")


# -- real workers ----------------------------------------------------------------------------------
async def _redis_ping(path: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"PING\r\n")
        return await asyncio.wait_for(reader.readline(), 5)
    finally:
        writer.close()


@needs_postgres
@needs_redis_server
async def test_two_workers_one_port_redirects_and_a_graceful_stop(supervise) -> None:
    sup = await supervise(2)
    started = sup.logs("worker_started")
    nodes = {line["node_id"]: line for line in started}
    assert len(nodes) == 2
    (redis,) = sup.logs("private_redis_started")
    assert await _redis_ping(redis["url"].removeprefix("unix://")) == b"+PONG\r\n"

    # First contact: both workers answer on the one port.
    answered = set()
    for _ in range(6):
        status, node, body = await sup.get("/health")
        assert status == 200 and body == {"status": "ok"}
        answered.add(node)
    assert answered == set(nodes)

    # A redirect URL (the worker's ASOBI_PUBLIC_URL) reaches that worker, every time.
    for node_id, line in nodes.items():
        assert line["public_url"] == f"ws://127.0.0.1:{sup.port}/ws?node={node_id}"
        for _ in range(3):
            assert (await sup.get(f"/health?node={node_id}"))[1] == node_id
    target = next(iter(nodes))
    async with websockets.connect(nodes[target]["public_url"]) as ws:
        await ws.send(orjson.dumps({"type": "auth.guest", "payload": {}}).decode())
        reply = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
        assert reply["type"] == "auth.token"
        for node_id in nodes:
            metrics = await asyncio.to_thread(
                lambda n=node_id: urllib.request.urlopen(
                    f"http://127.0.0.1:{sup.port}/metrics?node={n}", timeout=10
                ).read()
            )
            expected = 1 if node_id == target else 0
            assert f"asobi_connections {float(expected)}".encode() in metrics, node_id

    # SIGTERM to the supervisor stops every worker gracefully, then Redis, then itself.
    sup.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(sup.process.wait, 30) == 0
    for line in started:
        assert not _alive(line["pid"])
    assert not _alive(redis["pid"])
    exits = sup.logs("worker_exited")
    assert sorted(e["node_id"] for e in exits) == sorted(nodes)
    assert all(e["status"] == 0 for e in exits)
    assert len(sup.logs("server_stopped")) == 2
    assert sup.logs("worker_restarted") == []
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", sup.port), timeout=2).close()


@needs_postgres
@needs_redis_server
async def test_a_killed_worker_is_restarted_and_backs_off_when_it_keeps_dying(supervise) -> None:
    sup = await supervise(2)
    first = {line["worker"]: line for line in sup.logs("worker_started")}
    victim = first[1]
    os.kill(victim["pid"], signal.SIGKILL)
    (exited,) = await sup.wait_for("worker_exited")
    assert exited["node_id"] == victim["node_id"] and exited["signal"] == "SIGKILL"
    (restarted,) = await sup.wait_for("worker_restarted")
    assert restarted["previous"] == victim["node_id"]
    new_id = restarted["node_id"]
    assert new_id != victim["node_id"] and restarted["pid"] != victim["pid"]
    await sup.wait_for("worker_ready", lambda line: line["node_id"] == new_id)
    assert (await sup.get(f"/health?node={new_id}"))[1] == new_id
    # The old id now reaches whichever worker is up; the other worker never stopped.
    assert (await sup.get(f"/health?node={victim['node_id']}"))[0] == 200
    assert _alive(first[2]["pid"])

    # Dying again soon after its restart: the next start waits.
    os.kill(restarted["pid"], signal.SIGKILL)
    await sup.wait_for("worker_exited", n=2)
    (backoff,) = await sup.wait_for("worker_backoff")
    assert backoff["worker"] == 1 and backoff["delay_s"] > 0
    await sup.wait_for("worker_restarted", n=2)


@needs_postgres
@needs_redis_server
async def test_workers_and_redis_stop_when_the_supervisor_is_killed(supervise) -> None:
    sup = await supervise(2)
    (redis,) = sup.logs("private_redis_started")
    pids = [line["pid"] for line in sup.logs("worker_started")] + [redis["pid"]]
    sup.process.kill()
    await asyncio.to_thread(sup.process.wait, 10)
    for pid in pids:
        assert await _gone(pid), pid
    assert len(sup.logs("supervisor_gone")) == 2
    assert len(sup.logs("server_stopped")) == 2  # each worker stopped gracefully


@needs_postgres
@needs_redis_server
@pytest.mark.skipif(
    importlib.util.find_spec("asobi.cluster") is None or importlib.util.find_spec("redis") is None,
    reason="the cluster core (asobi.cluster) and the redis client are needed",
)
async def test_the_workers_form_one_cluster_on_the_private_redis(supervise) -> None:
    sup = await supervise(2)
    ids = sorted(line["node_id"] for line in sup.logs("worker_started"))
    for node_id in ids:  # every worker sees both, each at its URL through the one port
        deadline = time.monotonic() + 15
        while True:
            _, answered, body = await sup.get(f"/api/v1/cluster?node={node_id}")
            listed = {n["node_id"]: n["public_url"] for n in body.get("nodes", [])}
            if sorted(listed) == ids or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert answered == node_id
        assert listed == {n: f"ws://127.0.0.1:{sup.port}/ws?node={n}" for n in ids}
