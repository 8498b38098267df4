"""The capacity model of docs/cluster.md ("Capacity: 10k, 100k, 1M players"), computed from one
`cluster-cost` run's measured costs, so the table follows the measurements it rests on.

What Redis carries at each cluster size: nodes' heartbeats (every node reads every record each
second), the match listing (every node reads every other node's list each second) and the
matchmaker (scripts and bus messages per match formed).
"""

from __future__ import annotations

from typing import Any

from bench import game

# The capacity model's assumptions (docs/cluster.md, "Capacity: 10k, 100k, 1M players").
MODEL_PLAYERS = (10_000, 100_000, 1_000_000)
MATCH_S = 300.0  # a match lasts 5 minutes: each player queues once per 5 minutes
# Players per node: one process on one core, per-player `get_state`, the quiet machine's figure
# (docs/performance.md, 400 matches x 4).  A shared machine's run measures less (see `workers`).
PLAYERS_PER_NODE = 1600
PUBLISHES_PER_MATCH = 5  # mm.place request and reply, mm.matched to up to 3 other home nodes
NODE_RECORD_BYTES = 300  # one heartbeat record (`NodeInfo` as JSON), as read by every node


def _linear(points: list[tuple[float, float]], x: float) -> float:
    """Between the two measured points around `x` (or the last two, beyond them): a call's
    cost grows with the keys it reads."""
    i = next((i for i in range(1, len(points)) if x <= points[i][0]), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return max(y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 != x0 else y1, min(y0, y1))


def model(cost: dict[str, Any]) -> list[dict[str, Any]]:
    """Nodes, Redis operations, Redis CPU and bytes per second at each cluster size, from the
    run's measured costs: per-node capacity, heartbeat and listing cost by cluster size, the
    matchmaker's Redis CPU and bytes per match formed, a PUBLISH."""
    per_node = PLAYERS_PER_NODE
    ops = cost["redis_ops"]
    beat = [(r["nodes"], r["cpu_us_per_round"]) for r in ops["heartbeat"]]
    listing = [(r["nodes"], r["cpu_us_per_round"]) for r in ops["listing"]]
    # one node's listing value: a node lists at most 100 matches (`Engine.list_matches`), so a
    # loaded node's value is the measured one whatever its number of matches
    listing_bytes = ops["listing_bytes"]
    mm = list(cost["frame_cost"]["matchmaking"].values())[-1]["queue_to_playing"]
    matches = list(cost["frame_cost"]["matchmaking"].values())[-1]["matches"]
    mm_cpu_us = mm["cpu_s"] / matches * 1e6
    # commands as nodes send them (scripts, SMEMBERS); those the scripts run inside are CPU
    mm_cmds = sum(mm["per_command"].get(c, {}).get("calls", 0) for c in ("evalsha", "smembers"))
    mm_cmds /= matches
    mm_bytes = (mm["bytes_in_per_s"] + mm["bytes_out_per_s"]) * mm["elapsed_s"] / matches
    pub = ops["publish"]["cpu_us_per_round"] / 10
    rows = []
    for players in MODEL_PLAYERS:
        nodes = -(-players // max(per_node, 1))
        formed = players / game.MATCH_SIZE / MATCH_S
        heartbeat = {
            "ops": 4 * nodes,
            "cpu": nodes * _linear(beat, nodes),
            "bytes": nodes * nodes * NODE_RECORD_BYTES,
        }
        listing_part = {
            "ops": 2 * nodes,
            "cpu": nodes * _linear(listing, nodes),
            "bytes": nodes * (nodes - 1) * listing_bytes,
        }
        matchmaking = {
            "ops": formed * (mm_cmds + PUBLISHES_PER_MATCH),
            "cpu": formed * (mm_cpu_us + PUBLISHES_PER_MATCH * pub),
            "bytes": formed * mm_bytes,
        }
        parts = {"heartbeats": heartbeat, "listing": listing_part, "matchmaking": matchmaking}
        rows.append(
            {
                "players": players,
                "nodes": nodes,
                "matches_formed_per_s": round(formed, 1),
                **{name: {k: round(v, 1) for k, v in part.items()} for name, part in parts.items()},
                "redis_cpu_cores": round(sum(p["cpu"] for p in parts.values()) / 1e6, 3),
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| players | nodes | matches formed/s | part | Redis ops/s | Redis CPU (cores) | bytes/s |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        for part in ("heartbeats", "listing", "matchmaking"):
            p = r[part]
            lines.append(
                f"| {r['players']:,} | {r['nodes']:,} | {r['matches_formed_per_s']:,} | {part} "
                f"| {p['ops']:,.0f} | {p['cpu'] / 1e6:.3f} | {_bytes(p['bytes'])} |"
            )
    return lines


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"
