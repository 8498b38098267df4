"""Reload across the cluster: `asobi push` run as a real command against real node processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.cluster_support import Cluster, Node, needs_cluster
from tests.conftest import Client

pytestmark = needs_cluster

ADMIN_TOKEN = "push-test-admin-token"
ENV = {"ASOBI_ADMIN_TOKEN": ADMIN_TOKEN}

V1 = """\
match_size = 1
tick_rate = 20
function init(state) state.counter = 0; return state end
function tick(state) state.counter = state.counter + 1; return state end
function get_state(state, player_id) return { counter = state.counter, version = "v1" } end
"""
# The pushed version needs a module the bundle does not carry: a node without it refuses.
V2 = """\
local util = require("lib.util")
match_size = 1
tick_rate = 20
function init(state) state.counter = 0; return state end
function tick(state) state.counter = state.counter + 1; return state end
function get_state(state, player_id)
  return { counter = state.counter, version = util.label() }
end
"""
UTIL = 'return { label = function() return "v2" end }\n'


def push(node: Node, game_dir: Path) -> tuple[int, str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "asobi", "push", str(game_dir), "--url", node.http],
        env={**os.environ, **ENV},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return out.returncode, out.stdout, out.stderr


def write_game(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    return root


async def playing(node: Node) -> tuple[Client, int]:
    """A player in a running match on `node`, once its counter passed 10."""
    client = await node.player("solo")
    await client.expect("matchmaker.matched", skip=("matchmaker.queued",))
    while True:
        state = (await client.states(1))[0]
        if state["counter"] > 10:
            assert state["version"] == "v1"
            return client, state["counter"]


async def version_seen(client: Client, version: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = (await client.states(1, timeout=deadline - time.monotonic()))[0]
        if state["version"] == version:
            return state
    raise AssertionError(f"no state of version {version} within {timeout}s")


def answers(record_or_body: dict[str, Any]) -> dict[str, dict[str, str]]:
    """node -> script -> outcome."""
    return {
        a["node_id"]: {s["script"]: s["outcome"] for s in a["scripts"]}
        for a in record_or_body["answers"]
    }


async def test_push_reaches_every_node_one_refuses_and_a_late_node_runs_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    with_util = {"match.lua": V1, "lib/util.lua": UTIL}
    a = await cluster.start_node(with_util, node_id="a", env=ENV)
    b = await cluster.start_node(with_util, node_id="b", env=ENV)
    c = await cluster.start_node({"match.lua": V1}, node_id="c", env=ENV)
    players = {node.node_id: await playing(node) for node in (a, b, c)}

    # Push 1: match.lua alone.  a and b have lib/util.lua, c does not.
    pushed = write_game(tmp_path / "push1", {"match.lua": V2})
    code, out, err = await asyncio.to_thread(push, b, pushed)
    assert code == 1, (out, err)  # a node refused
    assert "refused" in out and "module 'lib.util' not found" in out, out
    _, body = a.get("/api/v1/reloads")
    record = body["cluster_reloads"][0]
    assert record["outcome"] == "refused" and record["pushed_by"] == "b"
    assert record["nodes"] == ["a", "b", "c"]
    assert answers(record) == {
        "a": {"match.lua": "reloaded"},
        "b": {"match.lua": "reloaded"},
        "c": {"match.lua": "refused"},
    }
    refused = next(x for x in record["answers"] if x["node_id"] == "c")["scripts"][0]
    assert "module 'lib.util' not found" in refused["errors"][0]

    # The running matches on a and b switched with their state; c's kept its code and ticks on.
    for node_id in ("a", "b"):
        client, before = players[node_id]
        state = await version_seen(client, "v2")
        assert state["counter"] > before
    client, before = players["c"]
    later = await client.states(3)
    assert all(s["version"] == "v1" for s in later) and later[-1]["counter"] > before
    # Files follow what is in force: written where taken, left alone where refused.
    assert (a.game_dir / "match.lua").read_text() == V2
    assert (c.game_dir / "match.lua").read_text() == V1

    # Push 2 carries the module too: c takes both; a and b already run exactly this.
    pushed2 = write_game(tmp_path / "push2", {"match.lua": V2, "lib/util.lua": UTIL})
    code, out, err = await asyncio.to_thread(push, a, pushed2)
    assert code == 0, (out, err)
    _, body = c.get("/api/v1/reloads")
    record2 = body["cluster_reloads"][0]
    assert record2["id"] > record["id"] and record2["outcome"] == "reloaded"
    assert answers(record2) == {
        "a": {"lib/util.lua": "unchanged", "match.lua": "unchanged"},
        "b": {"lib/util.lua": "unchanged", "match.lua": "unchanged"},
        "c": {"lib/util.lua": "reloaded", "match.lua": "reloaded"},
    }
    client, before = players["c"]
    state = await version_seen(client, "v2")
    assert state["counter"] > before

    # A node started later, on stale files, runs the pushed bundle before it serves.
    d = await cluster.start_node({"match.lua": V1}, node_id="d", env=ENV)
    late = await d.player("solo")
    await late.expect("matchmaker.matched", skip=("matchmaker.queued",))
    assert all(s["version"] == "v2" for s in await late.states(5))
    assert (d.game_dir / "match.lua").read_text() == V2
    assert (d.game_dir / "lib" / "util.lua").read_text() == UTIL
    _, body = d.get("/api/v1/reloads")
    record2 = next(r for r in body["cluster_reloads"] if r["id"] == record2["id"])
    late_answer = next(x for x in record2["answers"] if x["node_id"] == "d")
    assert late_answer["late"] is True and late_answer["outcome"] == "reloaded"
    # Its own watcher agrees with the bundle: the files it found on disk are the ones in force.
    assert [e for e in d.events("reloaded") if e.get("trigger") != "push"] == []

    # `asobi reloads` prints the cluster records after the node's own table.
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "asobi", "reloads", "--url", d.http],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"push {record2['id']}" in out.stdout and f"push {record['id']}" in out.stdout
    assert "d (late)" in out.stdout


async def test_a_bundle_over_the_bound_or_with_a_bad_path_is_refused(
    cluster: Cluster, tmp_path: Path
) -> None:
    a = await cluster.start_node(
        {"match.lua": V1}, node_id="a", env={**ENV, "ASOBI_MAX_SCRIPT_BYTES": "2000"}
    )
    admin = await a.client()
    await admin.send("admin.auth", {"token": ADMIN_TOKEN})
    await admin.expect("admin.authed")
    too_big = [{"path": "match.lua", "size": 1500}, {"path": "other.lua", "size": 600}]
    await admin.send("admin.push", {"files": too_big, "hash": "0" * 64}, cid=1)
    error = await admin.expect("error", skip=("admin.log",))
    assert error["cid"] == 1 and "at most 2000 bytes" in error["payload"]["message"]
    for bad in ("../escape.lua", "/etc/x.lua", "a/.hidden/x.lua", "x.txt"):
        await admin.send("admin.push", {"files": [{"path": bad, "size": 1}], "hash": "0" * 64})
        error = await admin.expect("error", skip=("admin.log",))
        assert "not a script path" in error["payload"]["message"], bad
    # Bytes that do not match the announced address are refused, and nothing is stored.
    await admin.send("admin.push", {"files": [{"path": "m.lua", "size": 3}], "hash": "0" * 64})
    await admin.expect("admin.push_ready", skip=("admin.log",))
    await admin.send("admin.push_data", {"offset": 0, "data": "YWJj"}, cid=2)
    error = await admin.expect("error", skip=("admin.log",))
    assert "do not match" in error["payload"]["message"]
    _, body = a.get("/api/v1/reloads")
    assert body["cluster_reloads"] == []

    # The command reads the game dir with the same bound and says which file is too large.
    big = write_game(tmp_path / "big", {"match.lua": V1 + "--" + "x" * 3000 + "\n"})
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "asobi", "push", str(big), "--url", a.http],
        env={**os.environ, **ENV, "ASOBI_MAX_SCRIPT_BYTES": "2000"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "match.lua" in out.stderr and "2000" in out.stderr

    # A bundle of many chunks (more than the connection's frame rate allows: chunks refused as
    # `rate_limited` are sent again) goes to a node with the default bound; the node with the
    # small bound refuses it on its own.
    slow = {"ASOBI_RATE_LIMIT_PER_S": "20", "ASOBI_RATE_LIMIT_BURST": "10"}
    b = await cluster.start_node({"match.lua": V1}, node_id="b", env={**ENV, **slow})
    padding = "-- " + "x" * 99 + "\n"
    large = V1.replace("tick_rate = 20", "tick_rate = 25") + padding * 30_000
    code, out, err = await asyncio.to_thread(
        push, b, write_game(tmp_path / "large", {"match.lua": large})
    )
    assert code == 1, (out, err)
    _, body = b.get("/api/v1/reloads")
    record = body["cluster_reloads"][0]
    assert record["bytes"] == len(large) > 3_000_000
    assert answers(record) == {"a": {"match.lua": "refused"}, "b": {"match.lua": "reloaded"}}
    refused = next(x for x in record["answers"] if x["node_id"] == "a")["scripts"][0]
    assert "larger than 2000 bytes" in refused["errors"][0]
    assert (b.game_dir / "match.lua").read_text() == large
