"""The `asobi` command as a new user runs it: a real process, real files, a real server."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tests.conftest import TUTORIAL, Logs

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-with-enough-length-for-hs256"
LISTENING = re.compile(r"listening on ws://(\S+):(\d+)/ws \(game: (.+), (\d+) scripts?\)")


def asobi(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout=60):
    """Run `python -m asobi ARGS` with only the environment given (no ASOBI_* leaks in)."""
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "asobi", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_describes_the_commands_in_plain_words() -> None:
    result = asobi("--help")
    assert result.returncode == 0
    out = result.stdout
    assert "at the edge of the rest" not in out
    assert "multiplayer matches scripted in Lua" in out
    for command in ("new", "serve", "token", "check", "reloads", "reload"):
        assert re.search(rf"^\s+{command}\s+\w+", out, re.M), command
    assert "npx -y wscat" in out


# -- tokens and the secret ------------------------------------------------------------------------
def test_token_from_another_directory_refuses_and_says_where_it_looked(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = asobi("token", "alice", cwd=elsewhere)
    assert result.returncode == 2 and result.stdout == ""
    assert "ASOBI_SECRET is not set" in result.stderr
    assert str(elsewhere / "data" / "secret.key") in result.stderr
    assert not (elsewhere / "data").exists()


def test_token_uses_the_servers_stored_secret(tmp_path: Path) -> None:
    from asobi.auth import TokenSigner, load_or_create_secret

    server_secret = load_or_create_secret(tmp_path / "data", None)  # what `serve` does
    result = asobi("token", "alice", cwd=tmp_path / "data", env={"ASOBI_DATA_DIR": "."})
    assert result.returncode == 0, result.stderr
    assert TokenSigner(server_secret).verify(result.stdout.strip()) == "alice"


async def test_a_token_signed_with_another_secret_is_refused_in_plain_words(start_server) -> None:
    server = await start_server()
    good = await asyncio.to_thread(asobi, "token", "alice", env={"ASOBI_SECRET": SECRET})
    bad = await asyncio.to_thread(asobi, "token", "alice", env={"ASOBI_SECRET": "x" * 40})
    client = await server.client()
    await client.send("session.connect", {"token": bad.stdout.strip()})
    error = await client.expect("error")
    assert error["payload"]["code"] == "invalid_token"
    assert "signature does not match this server's secret" in error["payload"]["message"]
    await client.send("session.connect", {"token": good.stdout.strip()})
    assert (await client.expect("session.connected"))["payload"]["player_id"] == "alice"


# -- serve ----------------------------------------------------------------------------------------
class Serve:
    """`asobi serve` in its own process group, on a free port it reports itself."""

    def __init__(self, game: Path, *, env: dict[str, str] | None = None, stdout=None) -> None:
        base = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "asobi", "serve", "--host", "127.0.0.1", "--port", "0"],
            cwd=game.parent,
            env={**base, "ASOBI_SECRET": SECRET, "ASOBI_GAME_DIR": str(game), **(env or {})},
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        self.line = self.proc.stderr.readline()
        match = LISTENING.search(self.line)
        assert match, self.line + self.proc.stderr.read() if self.proc.poll() is not None else ""
        self.port = int(match.group(2))
        self.match = match

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=20)
        return out or ""


def _game(tmp_path: Path, files: dict[str, str] | None = None) -> Path:
    game = tmp_path / "game"
    game.mkdir()
    for name, source in (files or {"match.lua": TUTORIAL}).items():
        (game / name).write_text(source)
    return game


def test_serve_says_where_it_listens_and_a_taken_port_is_one_line(tmp_path: Path) -> None:
    game = _game(tmp_path)
    first = Serve(game)
    try:
        assert first.match.group(1) == "127.0.0.1"
        assert first.match.group(3) == str(game) and first.match.group(4) == "1"
        second = asobi(
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(first.port),
            cwd=tmp_path,
            env={"ASOBI_SECRET": SECRET, "ASOBI_GAME_DIR": str(game)},
        )
        assert second.returncode == 1
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"127.0.0.1:{first.port}" in lines[0] and "already in use" in lines[0]
        assert "Traceback" not in second.stdout + second.stderr
        assert second.stdout == ""  # nothing started before the port was found taken
    finally:
        out = first.stop()
    # Piped stdout gets JSON lines.
    events = [orjson.loads(line)["event"] for line in out.splitlines() if line.strip()]
    assert "server_started" in events


def test_log_format_console_is_text_and_auto_is_coloured_on_a_terminal(tmp_path: Path) -> None:
    game = _game(tmp_path)
    server = Serve(game, env={"ASOBI_LOG_FORMAT": "console"})
    out = server.stop()
    started = [line for line in out.splitlines() if "server_started" in line]
    assert started and not started[0].lstrip().startswith("{")
    # A terminal on stdout: the default (auto) picks the coloured console renderer.
    leader, follower = pty.openpty()
    try:
        server = Serve(game, stdout=follower)
        os.close(follower)
        seen = b""
        deadline = time.monotonic() + 10
        while b"server_started" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                seen += os.read(leader, 65536)
        server.stop()
    finally:
        os.close(leader)
    assert b"server_started" in seen
    assert b"\x1b[" in seen  # ANSI colour
    assert b'"event":' not in seen


# -- check ----------------------------------------------------------------------------------------
BROKEN = {
    "match.lua": TUTORIAL.replace("function get_state", "function state_of"),
    "fast.lua": TUTORIAL + "tick_rate = 240\n",
    "crowd.lua": TUTORIAL + "match_size = 0\n",
    "slow.lua": "while true do end\n",
    "lazy.lua": TUTORIAL.replace("state.counter + 1", 'state.counter + require("nowhere").step'),
    "top.lua": 'local m = require("missing")\n' + TUTORIAL,
}


async def test_check_reports_what_the_server_refuses_in_the_same_words(
    start_server, tmp_path: Path, logs: Logs
) -> None:
    game = _game(tmp_path, BROKEN)
    result = await asyncio.to_thread(asobi, "check", "--game-dir", str(game))
    assert result.returncode == 1
    out = result.stdout
    expected = {
        "match.lua": "missing function get_state",
        "fast.lua": "tick_rate must be a number from 1 to 60, not 240",
        "crowd.lua": "match_size must be an integer from 1 to 1024, not 0",
        "slow.lua": "load",
        "lazy.lua": "lazy.lua:7: module 'nowhere' not found",
        "top.lua": "module 'missing' not found",
    }
    for name, words in expected.items():
        block = rf"^error {re.escape(name)}\n(      .*\n)*      .*{re.escape(words)}"
        assert re.search(block, out, re.M), (name, out)
    assert out.strip().endswith("0 ok, 6 with errors")
    # The server, on the same files, refuses the same scripts with the same messages.
    await start_server(BROKEN)
    rejected = {line["script"]: line["errors"] for line in logs.events("script_rejected")}
    unresolved = [line["error"] for line in logs.events("script_require_unresolved")]
    assert sorted(rejected) == sorted(set(BROKEN) - {"lazy.lua"})
    for name, errors in rejected.items():
        for error in errors:
            assert f"      {error}" in out, (name, error)
    assert [f"      {e}" in out for e in unresolved] == [True]


# -- new ------------------------------------------------------------------------------------------
def test_new_writes_a_ready_game_folder(tmp_path: Path) -> None:
    result = asobi("new", "mygame", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    game = tmp_path / "mygame"
    assert sorted(p.name for p in game.iterdir()) == ["README.md", "match.lua", "tug.lua"]
    assert (game / "match.lua").read_text() == (ROOT / "game" / "match.lua").read_text()
    readme = (game / "README.md").read_text()
    assert "asobi serve --game-dir mygame" in readme and "npx -y wscat" in readme
    checked = asobi("check", "--game-dir", "mygame", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout
    again = asobi("new", "mygame", cwd=tmp_path)
    assert again.returncode == 2 and "not empty" in again.stderr


async def test_the_scaffolded_two_player_game_plays_to_a_winner(start_server, tmp_path) -> None:
    result = await asyncio.to_thread(asobi, "new", "g", cwd=tmp_path)
    assert result.returncode == 0
    files = {p.name: p.read_text() for p in (tmp_path / "g").glob("*.lua")}
    server = await start_server(files)
    a = await server.player("tug")
    b = await server.player("tug")
    for client in (a, b):
        await client.expect("matchmaker.matched")
    side = (await a.expect("match.message"))["payload"]["payload"]["side"]
    knot = 0
    while abs(knot) < 5:
        await a.send("match.input", {"pull": 1})
        while True:
            frame = await a.recv()
            if frame["type"] == "match.finished":
                break
            if frame["type"] == "match.state" and frame["payload"]["knot"] != knot:
                knot = frame["payload"]["knot"]
                break
        if frame["type"] == "match.finished":
            break
    finished = frame if frame["type"] == "match.finished" else await a.expect("match.finished")
    assert finished["payload"]["result"]["winner"] == a.player_id
    assert finished["payload"]["result"]["knot"] == 5 * side


@pytest.mark.parametrize("bad", ["abc"])
def test_log_format_is_validated(tmp_path: Path, bad: str) -> None:
    result = asobi("serve", cwd=tmp_path, env={"ASOBI_LOG_FORMAT": bad})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "asobi: ASOBI_LOG_FORMAT must be one of auto, json, console"
    ]
