"""The servers under test, behind one interface the workloads drive.

A target starts its server pinned to the server core, adds matches of 4 clients each (clients of
the shared `Tally`), and reports the server's own tick lateness since the previous call.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from bench import field_game, game, procs
from bench.loadgen import (
    AsobiPlayer,
    ColyseusPlayer,
    Tally,
    asobi_input,
    asobi_token,
    colyseus_input,
    connect,
    gather_limited,
    http_post_json,
    pump_inputs,
)

PEERS = Path(__file__).parent / "peers"
CONNECT_CONCURRENCY = 64


class Target:
    name = ""
    stats_signal = signal.SIGUSR1

    def __init__(self, work: Path, core: set[int] | None, tally: Tally) -> None:
        self.work = work
        self.core = core
        self.tally = tally
        self.server: procs.ServerProcess | None = None
        self.matches = 0
        self.players: list[Any] = []
        self.players_per_match = game.MATCH_SIZE
        # The field game's clients send inputs (`start_inputs`) for as long as the target runs.
        self._inputs: asyncio.Task[None] | None = None

    def start_inputs(self, frames: list[bytes], *, text: bool) -> None:
        """Every client sends field_game.INPUTS_PER_SECOND inputs per second from now on."""
        self._inputs = asyncio.get_running_loop().create_task(
            pump_inputs(
                self.players,
                frames,
                text=text,
                rate=field_game.INPUTS_PER_SECOND,
                per_match=self.players_per_match,
            )
        )

    async def stats(self) -> dict[str, Any]:
        assert self.server is not None
        return await procs.read_stats(self.server, self.stats_signal, asyncio.sleep)

    def stop(self) -> None:
        if self._inputs is not None:
            self._inputs.cancel()
        for player in self.players:
            if player.transport is not None:
                player.transport.disconnect()
        if self.server is not None:
            self.server.stop()


class AsobiTarget(Target):
    name = "asobi"

    def __init__(
        self,
        work: Path,
        core: set[int] | None,
        tally: Tally,
        reload: str = "off",
        shared: bool = False,
        players: int = game.MATCH_SIZE,
        field: bool = False,
        source: Path | None = None,
        env: dict[str, str] | None = None,
        python: str | None = None,
    ) -> None:
        """`field`: the realistic game (`bench/field_game.py`, patch frames, inputs) instead of
        the bench game.  `source`: the checkout whose `asobi` to run (default: the installed).
        `env`: more environment for the server (a setting or a library measured against none).
        `python`: the interpreter to run it with (default: this one)."""
        super().__init__(work, core, tally)
        self.source = source
        self.env = env
        self.python = python
        self.reload = reload
        self.shared = shared
        self.field = field
        self.players_per_match = field_game.MATCH_SIZE if field else players
        self.mode = field_game.MODE if field else game.MODE
        if shared:
            self.name = "asobi-shared"
        if field:
            self.name = "asobi-field"
        self.secret = secrets.token_urlsafe(32)
        self.game_dir = work / "game"
        self.data_dir = work / "data"

    def start(self) -> None:
        self.game_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.field:
            field_game.write_script(self.game_dir, "v0", sync="patch")
        else:
            game.write_script(self.game_dir, "v0", self.shared, self.players_per_match)
        self.server = procs.spawn_asobi(
            self.game_dir,
            self.data_dir,
            self.secret,
            reload=self.reload,
            core=self.core,
            log_path=self.work / "asobi.log",
            source=self.source,
            env=self.env,
            python=self.python,
        )

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"ws://127.0.0.1:{self.server.port}/ws"

    async def connect_idle(self, matches: int) -> list[AsobiPlayer]:
        """One client per seat of each match, authenticated but not queued yet."""
        base = len(self.players)
        new = [
            AsobiPlayer(self.tally, asobi_token(self.secret, f"bench-{base + i}"))
            for i in range(matches * self.players_per_match)
        ]
        url = self.url

        async def one(player: AsobiPlayer) -> None:
            await connect(url, player)
            await asyncio.wait_for(player.ready, 30)

        await gather_limited([lambda p=p: one(p) for p in new], CONNECT_CONCURRENCY)
        self.players.extend(new)
        return new

    async def start_matches(self, players: list[AsobiPlayer]) -> None:
        for player in players:
            player.queue(self.mode)
        await asyncio.wait_for(asyncio.gather(*(p.first_state for p in players)), 60)
        self.matches += len(players) // self.players_per_match
        self.tally.clients = len(self.players)
        if self.field and self._inputs is None:
            self.start_inputs([asobi_input(d) for d in range(9)], text=True)

    async def add_matches(self, matches: int) -> None:
        await self.start_matches(await self.connect_idle(matches))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ColyseusTarget(Target):
    name = "colyseus"
    stats_signal = signal.SIGWINCH
    dir = PEERS / "colyseus"

    def __init__(
        self, work: Path, core: set[int] | None, tally: Tally, field: bool = False
    ) -> None:
        """`field`: the field room (`bench/peers/colyseus/server.js`), 16 clients, inputs."""
        super().__init__(work, core, tally)
        self.room = field_game.MODE if field else game.MODE
        self.players_per_match = field_game.MATCH_SIZE if field else game.MATCH_SIZE
        if field:
            self.name = "colyseus-field"

    @classmethod
    def installed(cls) -> bool:
        return (cls.dir / "node_modules" / "@colyseus" / "core").is_dir()

    @classmethod
    def install(cls) -> str | None:
        """npm install into bench/peers/colyseus; returns why it failed, or None."""
        npm = shutil.which("npm")
        if npm is None or shutil.which("node") is None:
            return "node/npm not found on PATH"
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=cls.dir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0 or not cls.installed():
            return f"npm install failed ({done.returncode}): {done.stderr.strip()[-500:]}"
        return None

    def start(self) -> None:
        port = _free_port()
        stats = self.work / "colyseus-stats.json"
        self.server = procs.spawn(
            ["node", "server.js"],
            cwd=self.dir,
            log_path=self.work / "colyseus.log",
            env={"PORT": str(port), "BENCH_STATS": str(stats), "NODE_ENV": "production"},
            core=self.core,
            port_of=lambda text: port if f"LISTENING {port}" in text else None,
        )
        self.server.stats_path = stats

    async def _one_match(self) -> list[ColyseusPlayer]:
        assert self.server is not None
        port = self.server.port
        first = await http_post_json("127.0.0.1", port, f"/matchmake/create/{self.room}", {})
        room = first["room"]
        seats = [first]
        for _ in range(self.players_per_match - 1):
            seats.append(
                await http_post_json("127.0.0.1", port, f"/matchmake/joinById/{room['roomId']}", {})
            )
        players = []
        for seat in seats:
            player = ColyseusPlayer(self.tally)
            url = (
                f"ws://127.0.0.1:{port}/{room['processId']}/{room['roomId']}"
                f"?sessionId={seat['sessionId']}"
            )
            await connect(url, player)
            players.append(player)
        await asyncio.wait_for(asyncio.gather(*(p.ready for p in players)), 30)
        return players

    async def add_matches(self, matches: int) -> None:
        groups = await gather_limited(
            [self._one_match for _ in range(matches)],
            max(1, CONNECT_CONCURRENCY // self.players_per_match),
        )
        new = [p for group in groups for p in group]
        await asyncio.wait_for(asyncio.gather(*(p.first_state for p in new)), 60)
        self.players.extend(new)
        self.matches += matches
        self.tally.clients = len(self.players)
        if self.room == field_game.MODE and self._inputs is None:
            self.start_inputs([colyseus_input(d) for d in range(9)], text=False)


def loadgen_cpu() -> float:
    t = os.times()
    return t.user + t.system
