"""Nodes of a cluster: heartbeats, the node listing, a node killed with -9, refused settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

from tests.cluster_support import SECRET, Cluster, needs_cluster

pytestmark = needs_cluster


async def test_three_nodes_list_each_other_and_a_killed_node_expires(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    c = await cluster.start_node()
    everyone = {a.node_id, b.node_id, c.node_id}
    for node in (a, b, c):
        await cluster.wait_nodes(node, everyone)
    status, body = a.get("/api/v1/cluster")
    assert status == 200 and body["cluster"] is True and body["node_id"] == a.node_id
    listed = {n["node_id"]: n for n in body["nodes"]}
    assert listed[b.node_id]["public_url"] == b.url
    assert {"matches", "players", "lateness_p99_ms", "cpu"} <= set(listed[c.node_id])

    killed_at = time.monotonic()
    c.kill9()
    await cluster.wait_nodes(a, {a.node_id, b.node_id}, timeout=8)
    assert time.monotonic() - killed_at < 5.0 + 1.5  # TTL plus one heartbeat and one poll
    await a.wait_event("node_gone", node_id=c.node_id)

    # A clean stop leaves the listing at once (no TTL to wait for).
    await b.stop()
    waited = await cluster.wait_nodes(a, {a.node_id}, timeout=3)
    assert waited < 2.5


async def test_asobi_nodes_prints_the_cluster(cluster: Cluster) -> None:
    a = await cluster.start_node()
    b = await cluster.start_node()
    await cluster.wait_nodes(a, {a.node_id, b.node_id})
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "asobi", "nodes", "--url", a.http],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert a.node_id in out.stdout and b.node_id in out.stdout and b.url in out.stdout


async def test_a_node_refuses_sqlite_and_a_foreign_secret(cluster: Cluster, tmp_path) -> None:
    base = {
        **os.environ,
        "ASOBI_REDIS_URL": cluster.redis.url,
        "ASOBI_SECRET": SECRET,
        "ASOBI_PORT": "0",
        "ASOBI_HOST": "127.0.0.1",
        "ASOBI_DATA_DIR": str(tmp_path / "d"),
        "ASOBI_GAME_DIR": str(tmp_path / "g"),
    }
    (tmp_path / "g").mkdir()
    sqlite = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "asobi", "serve"],
        env={**base, "ASOBI_DATABASE_URL": ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert sqlite.returncode == 2
    assert "needs PostgreSQL" in sqlite.stderr and "Traceback" not in sqlite.stderr

    await cluster.start_node()  # the cluster now knows its secret
    foreign = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "asobi", "serve"],
        env={**base, "ASOBI_DATABASE_URL": cluster.database_url, "ASOBI_SECRET": "x" * 40},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert foreign.returncode == 2
    assert "secret differs" in foreign.stderr and "Traceback" not in foreign.stderr
