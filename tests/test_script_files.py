"""What sits in the game directory cannot stall the server: only regular files are read, up to a
size cap, on a worker thread during reloads; links are followed only inside the game dir."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from asobi.script_files import UnreadableScript, read_script
from asobi.scripts import ScriptRegistry
from tests.conftest import TUTORIAL, Client, Logs

# The tutorial runs at 10 Hz: a frame every 100 ms; the tick budget is 50 ms.
PERIOD = 0.1
SLACK = 0.05 + 0.05  # the tick budget, plus 50 ms


class _FifoRescuer:
    """If something opened the FIFO to read it and is stuck there, a writer frees it (again and
    again, from `after` seconds on), so that a failing test fails instead of hanging."""

    def __init__(self, path: Path, after: float) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, after), daemon=True)
        self._thread.start()

    def _run(self, path: Path, after: float) -> None:
        if self._stop.wait(after):
            return
        while not self._stop.wait(0.2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO when no reader waits
            except OSError:
                continue
            os.write(fd, b"-- rescued\n")
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def _frame_gaps(client: Client, seconds: float) -> float:
    """The longest time between two match.state frames over `seconds`."""
    await client.states(1)
    last = time.monotonic()
    worst = 0.0
    end = last + seconds
    while time.monotonic() < end:
        await client.states(1, timeout=10)
        now = time.monotonic()
        worst = max(worst, now - last)
        last = now
    return worst


@pytest.mark.parametrize("reload", ["watch", "poll"])
async def test_a_fifo_in_the_game_dir_is_refused_and_never_blocks(
    start_server, logs: Logs, reload: str
) -> None:
    server = await start_server(reload=reload)
    victim = await server.player("hello")
    await victim.expect("matchmaker.matched")
    fifo = server.game_dir / "trap.lua"
    os.mkfifo(fifo)
    rescuer = _FifoRescuer(fifo, after=3.0)
    try:
        worst = await _frame_gaps(victim, 1.0)
        failed = await logs.wait_for("reload_failed", lambda e: e["script"] == "trap.lua")
    finally:
        rescuer.stop()
    assert "is a FIFO, not a regular file" in failed["errors"][0], failed
    assert worst < PERIOD + SLACK, f"the victim's frames stopped for {worst:.3f} s"
    # The admin reload of everything reads the FIFO's name too, and refuses it the same way.
    records = await server.app.reloader.reload_now(None, "manual")
    assert [r.outcome for r in records if r.script == "trap.lua"] == ["reload_failed"]


def test_a_fifo_present_at_start_is_reported_not_read(tmp_path: Path) -> None:
    """What the server (and `asobi check`) runs at start-up, with a FIFO already there."""
    (tmp_path / "match.lua").write_text(TUTORIAL)
    fifo = tmp_path / "trap.lua"
    os.mkfifo(fifo)
    rescuer = _FifoRescuer(fifo, after=3.0)
    registry = ScriptRegistry(tmp_path)
    t0 = time.monotonic()
    errors = registry.load_all()
    rescuer.stop()
    assert time.monotonic() - t0 < 2.0
    assert [(e.name, e.errors[0]) for e in errors] == [
        ("trap.lua", "trap.lua is a FIFO, not a regular file; only regular files are loaded")
    ]
    assert registry.names() == ["match.lua"]


async def test_a_script_over_the_size_cap_is_refused_unread(start_server, logs: Logs) -> None:
    server = await start_server(max_script_bytes=len(TUTORIAL) + 100)
    victim = await server.player("hello")
    await victim.expect("matchmaker.matched")
    server.write("match.lua", TUTORIAL + "--" + "x" * 200 + "\n")
    failed = await logs.wait_for("reload_failed", lambda e: e["script"] == "match.lua")
    assert "scripts may be at most" in failed["errors"][0], failed
    assert "ASOBI_MAX_SCRIPT_BYTES" in failed["errors"][0]
    # The version in force stays: the match keeps ticking on it.
    states = await victim.states(3)
    assert [s["counter"] for s in states] == list(
        range(states[0]["counter"], states[0]["counter"] + 3)
    )


async def test_links_are_followed_only_inside_the_game_dir(
    start_server, logs: Logs, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.lua"
    outside.write_text("secret = 1\n")
    server = await start_server()
    (server.game_dir / "lib").mkdir()
    (server.game_dir / "lib" / "real.lua").write_text("return { answer = 42 }\n")
    (server.game_dir / "out.lua").symlink_to(outside)
    (server.game_dir / "zero.lua").symlink_to("/dev/zero")
    (server.game_dir / "alias.lua").symlink_to(server.game_dir / "lib" / "real.lua")
    records = await server.app.reloader.reload_now(None, "manual")
    assert sorted(r.script for r in records) == ["lib/real.lua"]
    assert server.app.registry.get("out.lua") is None
    assert server.app.registry.get("zero.lua") is None
    assert server.app.registry.get("alias.lua") is None  # known by its real name only


def test_read_script_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "f.lua"
    os.mkfifo(fifo)
    link = tmp_path / "l.lua"
    link.symlink_to(tmp_path / "r.lua")
    (tmp_path / "r.lua").write_bytes(b"x" * 10)
    with pytest.raises(UnreadableScript, match="FIFO"):
        read_script(fifo, 100)
    with pytest.raises(UnreadableScript, match="symbolic link"):
        read_script(link, 100)
    with pytest.raises(UnreadableScript, match="directory"):
        read_script(tmp_path, 100)
    with pytest.raises(UnreadableScript, match="is 10 bytes"):
        read_script(tmp_path / "r.lua", 9)
    assert read_script(tmp_path / "r.lua", 10) == b"x" * 10


async def test_reads_run_off_the_event_loop(start_server) -> None:
    """A read that takes long (a slow disk, here a stalled reader thread) does not hold the
    loop: matches tick while the reload's read is still waiting."""
    server = await start_server()
    victim = await server.player("hello")
    await victim.expect("matchmaker.matched")
    registry = server.app.registry
    gate = threading.Event()
    original = registry.read

    def slow_read(name: str) -> bytes:
        gate.wait(5)
        return original(name)

    registry.read = slow_read  # type: ignore[method-assign]
    server.write("match.lua", TUTORIAL + "\n-- edited\n")
    reload = asyncio.ensure_future(server.app.reloader.reload_now("match.lua"))
    try:
        worst = await _frame_gaps(victim, 0.6)
        assert not reload.done()
    finally:
        gate.set()
    (record,) = await reload
    assert record.script == "match.lua"
    assert worst < PERIOD + SLACK, worst
