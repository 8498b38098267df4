"""Real clusters for tests: a real `redis-server` on a Unix socket, real node processes.

Cluster tests need the Debian `redis-server` binary and a PostgreSQL server
(ASOBI_TEST_DATABASE_URL, as `.ci/run` provides); without either they are skipped with the reason.
Each node is `python -m asobi serve` in its own process, so kill -9 is a real crash; its JSON log
lines go to a file the test can read (`Node.events`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import TEST_DATABASE_URL, Client, Connects

SECRET = "cluster-test-secret-long-enough-for-hs256"
REDIS_BIN = shutil.which("redis-server")
LISTENING = re.compile(rb"listening on ws://[^:]+:(\d+)/ws")

needs_cluster = pytest.mark.skipif(
    not (REDIS_BIN and TEST_DATABASE_URL),
    reason="cluster tests need redis-server and ASOBI_TEST_DATABASE_URL (see .ci/run)",
)


class RedisServer:
    """`redis-server` on a Unix socket in a temp dir: no port to race for, restartable in place."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        assert REDIS_BIN is not None
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                REDIS_BIN,
                "--port",
                "0",
                "--unixsocket",
                str(self.socket),
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=open(self.directory / "redis.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.socket.exists() and self._ping():
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def _ping(self) -> bool:
        import socket

        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(0.5)
            sock.connect(str(self.socket))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        self.start()


@dataclass
class Node(Connects):
    """One `asobi serve` process in the cluster."""

    node_id: str
    process: subprocess.Popen[bytes]
    log_path: Path
    err_path: Path
    game_dir: Path
    port: int = 0
    clients: list[Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(self.http + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, orjson.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"null")

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    out.append(event)
        return out

    async def wait_event(self, name: str, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events(name):
                if all(event.get(k) == v for k, v in match.items()):
                    return event
            await asyncio.sleep(0.05)
        raise AssertionError(f"{self.node_id}: no {name} {match} within {timeout}s")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def stop(self) -> None:
        await asyncio.gather(*(client.close() for client in self.clients), return_exceptions=True)
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            for _ in range(200):
                if not self.alive():
                    break
                await asyncio.sleep(0.05)
            if self.alive():
                self.process.kill()
                self.process.wait()


class Cluster:
    """A Redis, a shared PostgreSQL schema and the nodes started on them."""

    def __init__(self, root: Path, database_url: str, redis: RedisServer) -> None:
        self.root = root
        self.database_url = database_url
        self.redis = redis
        self.nodes: list[Node] = []

    async def start_node(
        self,
        files: dict[str, str] | None = None,
        *,
        node_id: str | None = None,
        env: dict[str, str] | None = None,
        game_dir: Path | None = None,
    ) -> Node:
        """Start a node on its own game dir (the tutorial unless `files`) and wait until it
        serves and is ready."""
        from tests.conftest import TUTORIAL

        node_id = node_id or f"n{len(self.nodes) + 1}-{uuid.uuid4().hex[:4]}"
        home = self.root / node_id
        home.mkdir(parents=True, exist_ok=True)
        if game_dir is None:
            game_dir = home / "game"
            game_dir.mkdir(exist_ok=True)
            for name, source in (files if files is not None else {"match.lua": TUTORIAL}).items():
                path = game_dir / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(source)
        log_path, err_path = home / "log.jsonl", home / "stderr.txt"
        environment = {
            **os.environ,
            "ASOBI_REDIS_URL": self.redis.url,
            "ASOBI_DATABASE_URL": self.database_url,
            "ASOBI_SECRET": SECRET,
            "ASOBI_NODE_ID": node_id,
            "ASOBI_LOG_FORMAT": "json",
            "ASOBI_HOST": "127.0.0.1",
            "ASOBI_PORT": "0",
            "ASOBI_GAME_DIR": str(game_dir),
            "ASOBI_DATA_DIR": str(home / "data"),
            "ASOBI_RELOAD": "watch",
            **(env or {}),
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "asobi", "serve"],
            env=environment,
            stdout=open(log_path, "wb"),  # noqa: SIM115
            stderr=open(err_path, "wb"),  # noqa: SIM115
        )
        node = Node(node_id, process, log_path, err_path, game_dir)
        self.nodes.append(node)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = LISTENING.search(err_path.read_bytes())
            if found:
                node.port = int(found.group(1))
                break
            if not node.alive():
                raise RuntimeError(f"node {node_id} exited: {err_path.read_text()[-2000:]}")
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"node {node_id} did not start: {err_path.read_text()[-2000:]}")
        await self.wait_nodes(node, {n.node_id for n in self.nodes if n.alive()})
        return node

    async def wait_nodes(self, via: Node, expected: set[str], timeout: float = 10.0) -> float:
        """Wait until `via` lists exactly `expected` as live nodes; returns the seconds waited."""
        started = time.monotonic()
        while True:
            status, body = await asyncio.to_thread(via.get, "/api/v1/cluster")
            listed = {n["node_id"] for n in body.get("nodes", [])} if status == 200 else set()
            if listed == expected:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise AssertionError(f"{via.node_id} lists {listed}, expected {expected}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes))

    def print_log_tails(self, lines: int = 40) -> None:
        """The end of every node's log: pytest shows it with a failing test, to tell which
        node did what when a timing-dependent step fails on a busy machine."""
        for node in self.nodes:
            for path in (node.log_path, node.err_path):
                with contextlib.suppress(OSError):
                    tail = path.read_bytes().decode(errors="replace").splitlines()[-lines:]
                    print(f"--- {node.node_id}: {path.name}", *tail, sep="\n")


@pytest.fixture
async def cluster(tmp_path: Path, database_url: str) -> AsyncIterator[Cluster]:
    """A running Redis and a fresh PostgreSQL schema; start nodes with `cluster.start_node()`."""
    if not (REDIS_BIN and database_url):
        pytest.skip("cluster tests need redis-server and ASOBI_TEST_DATABASE_URL (see .ci/run)")
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    running = Cluster(tmp_path, database_url, redis)
    try:
        yield running
    finally:
        await running.stop()
        redis.stop()
        running.print_log_tails()


def nodes_of(node: Node) -> Callable[[], set[str]]:
    def listed() -> set[str]:
        _, body = node.get("/api/v1/cluster")
        return {n["node_id"] for n in body.get("nodes", [])}

    return listed
