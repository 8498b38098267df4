"""The `asobi` commands that talk to a cluster: nodes, push, drain."""

from __future__ import annotations

import argparse
import base64
import contextlib
import sys
import time
import urllib.error
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from asobi.cli import _get_json, _print_push, _server_url
from asobi.config import Settings


def cmd_nodes(args: argparse.Namespace) -> int:
    url = _server_url(args) + "/api/v1/cluster"
    try:
        status, body = _get_json(url)
    except (urllib.error.URLError, OSError) as exc:
        print(f"asobi nodes: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200 or not isinstance(body, dict):
        print(f"asobi nodes: {url} answered {status}", file=sys.stderr)
        return 1
    nodes = body.get("nodes") or []
    if not body.get("cluster"):
        print("single node (no ASOBI_REDIS_URL)")
    print(f"{'NODE':<28} {'URL':<36} {'MATCHES':>7} {'PLAYERS':>7} {'P99 MS':>7} {'CPU':>5}")
    for node in nodes:
        print(
            f"{str(node.get('node_id'))[:28]:<28} {str(node.get('public_url'))[:36]:<36} "
            f"{node.get('matches', 0):>7} {node.get('players', 0):>7} "
            f"{node.get('lateness_p99_ms', 0):>7} {node.get('cpu', 0):>5}"
        )
    return 0


PUSH_TIMEOUT_S = 60.0


def cmd_push(args: argparse.Namespace) -> int:
    from asobi.cluster.bundles import BadBundle, bundle_hash, read_game_dir

    settings = Settings.from_env()
    if not settings.admin_token:
        print("asobi push: set ASOBI_ADMIN_TOKEN (the same value as the nodes')", file=sys.stderr)
        return 2
    game_dir: Path = args.game_dir or settings.game_dir
    if not game_dir.is_dir():
        print(f"asobi push: {game_dir} is not a directory", file=sys.stderr)
        return 2
    try:
        files = read_game_dir(game_dir, settings.max_script_bytes)
    except BadBundle as exc:
        print(f"asobi push: {exc}", file=sys.stderr)
        return 2
    if not files:
        print(f"asobi push: no scripts in {game_dir}", file=sys.stderr)
        return 2
    url = _ws_url(args)
    try:
        record = _push(url, settings.admin_token, files, bundle_hash(files))
    except (OSError, TimeoutError) as exc:
        print(f"asobi push: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    except AdminRefused as exc:
        print(f"asobi push: {exc}", file=sys.stderr)
        return 2
    _print_push(record)
    return 0 if record["outcome"] == "reloaded" else 1


class AdminRefused(Exception):
    """The node answered an admin frame with an error; the message is its words."""


def _ws_url(args: argparse.Namespace) -> str:
    http = urllib.parse.urlsplit(_server_url(args))
    return f"{'wss' if http.scheme == 'https' else 'ws'}://{http.netloc}/ws"


@contextlib.contextmanager
def _admin(url: str, token: str) -> Iterator[Callable[..., dict[str, Any]]]:
    """An authenticated admin channel to a node: yields `call(kind, payload, want)`, which sends
    one frame and returns the payload of the first answer whose type is in `want` (a frame
    refused by the rate limit is sent again; any other error raises `AdminRefused`)."""
    from websockets.sync.client import connect

    with connect(url, open_timeout=10, close_timeout=2) as ws:

        def call(kind: str, payload: dict[str, Any], want: tuple[str, ...]) -> dict[str, Any]:
            frame_text = orjson.dumps({"type": kind, "payload": payload, "cid": kind}).decode()
            ws.send(frame_text)
            deadline = time.monotonic() + PUSH_TIMEOUT_S
            while True:
                frame = orjson.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
                if frame.get("type") in want:
                    return dict(frame.get("payload") or {})
                if frame.get("type") == "error":
                    error = frame.get("payload") or {}
                    if error.get("code") == "rate_limited":
                        time.sleep(0.5)
                        ws.send(frame_text)
                        continue
                    raise AdminRefused(f"{error.get('code')}: {error.get('message')}")

        call("admin.auth", {"token": token}, ("admin.authed",))
        yield call


def _push(url: str, token: str, files: dict[str, bytes], digest: str) -> dict[str, Any]:
    """Send a bundle over the admin channel: announce it, send its bytes in the chunks the node
    asks for (one at a time, each acknowledged), then wait for the record."""
    with _admin(url, token) as call:
        manifest = [{"path": p, "size": len(b)} for p, b in files.items()]
        ready = call("admin.push", {"files": manifest, "hash": digest}, ("admin.push_ready",))
        data = b"".join(files.values())
        step = int(ready["chunk_bytes"])
        if not data:
            raise AdminRefused("every script is empty")
        for offset in range(0, len(data), step):
            chunk = base64.b64encode(data[offset : offset + step]).decode()
            answer = call(
                "admin.push_data",
                {"offset": offset, "data": chunk},
                ("admin.push_received", "admin.pushed"),
            )
        return dict(answer["record"])


def cmd_drain(args: argparse.Namespace) -> int:
    """Move every match of a node to the other nodes of its cluster (docs/durability.md)."""
    settings = Settings.from_env()
    if not settings.admin_token:
        print("asobi drain: set ASOBI_ADMIN_TOKEN (the same value as the nodes')", file=sys.stderr)
        return 2
    url = _ws_url(args)
    try:
        with _admin(url, settings.admin_token) as call:
            answer = call("admin.drain", {}, ("admin.drained",))
    except (OSError, TimeoutError) as exc:
        print(f"asobi drain: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    except AdminRefused as exc:
        print(f"asobi drain: {exc}", file=sys.stderr)
        return 2
    nodes = ", ".join(answer.get("nodes") or []) or "-"
    print(
        f"moved {answer.get('moved', 0)} matches to {nodes} in {answer.get('elapsed_ms', 0)} ms; "
        f"kept {answer.get('kept', 0)}" + (f" ({answer['reason']})" if answer.get("reason") else "")
    )
    return 0 if not answer.get("kept") else 1


def add_commands(sub: Any) -> None:
    """Add nodes, push and drain to the `asobi` command's subparsers."""
    nodes = sub.add_parser(
        "nodes",
        help="list the nodes of a running cluster with their load",
        description="List the live nodes of the cluster a server belongs to (its heartbeats).",
    )
    nodes.add_argument("--url", help="server base URL (default from ASOBI_HOST/ASOBI_PORT)")
    nodes.set_defaults(func=cmd_nodes)

    push = sub.add_parser(
        "push",
        help="put a folder's scripts in force on every node of a cluster (needs ASOBI_ADMIN_TOKEN)",
        description="Send the scripts of GAME_DIR to a node of a cluster as one bundle; every "
        "node vets and reloads them as it would a saved file, and the record of what each node "
        "did is printed. Exit 1 when a node refused a script or did not answer.",
    )
    push.add_argument("game_dir", nargs="?", type=Path, help="scripts (default ASOBI_GAME_DIR)")
    push.add_argument("--url", help="a node's base URL (default from ASOBI_HOST/ASOBI_PORT)")
    push.set_defaults(func=cmd_push)

    drain = sub.add_parser(
        "drain",
        help="move every match of a cluster node to the other nodes (needs ASOBI_ADMIN_TOKEN)",
        description="Move every match running on a node to the other live nodes of its "
        "cluster: players follow their match with no tick lost. Exit 1 when a match stayed.",
    )
    drain.add_argument("--url", help="the node's base URL (default from ASOBI_HOST/ASOBI_PORT)")
    drain.set_defaults(func=cmd_drain)
