"""The opt-in tick statistics the benchmark reads from outside the server process."""

from __future__ import annotations

import asyncio
import os
import signal

import orjson

from asobi import benchstats


async def test_sigusr1_writes_lateness_since_last_signal(start_server, tmp_path) -> None:
    server = await start_server()
    client = await server.player("hello")
    await client.send("matchmaker.add", {"mode": "hello"})
    await client.expect("matchmaker.matched")
    await client.states(3)
    target = tmp_path / "stats.json"
    loop = asyncio.get_running_loop()
    benchstats.install(loop, server.app, str(target))
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(100):
            if target.exists():
                break
            await asyncio.sleep(0.01)
        first = orjson.loads(target.read_bytes())
        assert first["samples"] >= 3
        assert first["matches"] == 1 and first["connections"] == 1
        assert 0 <= first["lateness_p50_ms"] <= first["lateness_p99_ms"] <= first["lateness_max_ms"]
        assert first["frames_sent"] >= 3
        # the lateness was drained: a snapshot right away has (almost) nothing new
        again = benchstats.snapshot(server.app)
        assert again["samples"] <= 1
        assert again["ticks"] >= first["ticks"]
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)


def test_not_installed_without_the_variable() -> None:
    loop = asyncio.new_event_loop()
    try:
        benchstats.install(loop, None, None)  # type: ignore[arg-type]
        assert not loop.remove_signal_handler(signal.SIGUSR1)
    finally:
        loop.close()
