"""The `asobi` command: new, serve, token, check, reloads, reload, nodes, push, drain, replay
(argument parsing and output)."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from asobi import log as logsetup
from asobi.config import RELOAD_MODES, Settings
from asobi.handoff import ENV as HANDOFF_ENV

if TYPE_CHECKING:
    from asobi.server import AsobiServer


class BadSetting(Exception):
    """A setting outside its choices: one line for the user, not a traceback."""


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None) for key in ("host", "port", "game_dir", "data_dir", "reload")
    }
    try:
        return Settings.from_env(**overrides)
    except ValueError as exc:
        raise BadSetting(str(exc)) from None


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections: a tick allocates many short-lived objects (frames,
    converted tables) that reference counting frees anyway, and a full collection walking every
    long-lived object is a pause that shows up as tick lateness.  Objects alive after start-up
    (modules, the app) are moved out of the collector's sight."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.huge_pages:
        from asobi.huge_pages import start_again_with_huge_pages

        start_again_with_huge_pages()  # before anything is imported or opened: it may exec
    from asobi.app import App
    from asobi.server import AsobiServer

    logsetup.configure(settings.log_level, fmt=settings.log_format)
    if args.workers != 1:
        from asobi import supervisor

        return supervisor.main(settings, args.workers)
    app = App.create(settings)
    _tune_gc()
    app.metrics.watch_gc()
    try:
        # A worker of --workers N is reached through its supervisor, which says where.
        announce = None if os.environ.get(HANDOFF_ENV) else _announce
        asyncio.run(AsobiServer(app).serve_forever(announce))
    except OSError as exc:
        print(
            f"asobi serve: cannot listen on {settings.host}:{settings.port}: {_why(exc)}",
            file=sys.stderr,
        )
        return 1
    return 0


def _announce(server: AsobiServer) -> None:
    """One plain line saying where to connect, whatever the log format."""
    host = server.settings.host
    shown = "localhost" if host in ("0.0.0.0", "::", "") else host
    registry = server.app.registry
    count = len(registry.names())
    print(
        f"listening on ws://{shown}:{server.port}/ws "
        f"(game: {registry.game_dir}, {count} script{'' if count == 1 else 's'})",
        file=sys.stderr,
        flush=True,
    )


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is already in use (stop the other server, or pick --port/ASOBI_PORT)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "this machine has no such address (check --host/ASOBI_HOST)"
    if exc.errno == errno.EACCES:
        return "permission denied (ports below 1024 need privileges)"
    return exc.strerror or str(exc)


def cmd_token(args: argparse.Namespace) -> int:
    from asobi.auth import SecretNotFound, TokenSigner, find_secret

    settings = _settings(args)
    logsetup.configure("error", sys.stderr)
    try:
        secret = find_secret(settings.data_dir, settings.secret)
    except SecretNotFound as exc:
        print(f"asobi token: {exc}", file=sys.stderr)
        return 2
    signer = TokenSigner(secret, args.ttl or settings.token_ttl_s)
    try:
        print(signer.issue(args.player_id))
    except ValueError as exc:
        print(f"asobi token: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from asobi.scripts import ScriptRegistry

    settings = _settings(args)
    logsetup.configure("error", sys.stderr)
    game_dir = settings.game_dir
    if not game_dir.is_dir():
        print(f"asobi check: {game_dir} is not a directory", file=sys.stderr)
        return 2
    # The server's own vetting (compile, top level within its budget, callbacks, globals),
    # then the `require`s that would fail when the code reaches them.
    registry = ScriptRegistry(game_dir, settings.limits, max_script_bytes=settings.max_script_bytes)
    errors = registry.load_all()
    unresolved = {name: registry.unresolved_requires(name) for name in registry.names()}
    ok = [name for name in registry.names() if not unresolved[name]]
    for name in ok:
        print(f"ok    {name}")
    for name, problems in unresolved.items():
        if problems:
            print(f"error {name}")
            for line in problems:
                print(f"      {line}")
    for error in errors:
        print(f"error {error.name}")
        for line in error.errors:
            print(f"      {line}")
        if error.truncated:
            print(f"      ... {error.error_count - len(error.errors)} more")
    failed = len(errors) + len(registry.names()) - len(ok)
    print(f"{len(ok)} ok, {failed} with errors")
    return 1 if failed else 0


TEMPLATES = ("match.lua", "tug.lua", "README.md")


def cmd_new(args: argparse.Namespace) -> int:
    """Write a ready game folder from the templates shipped with the package."""
    from importlib.resources import files

    target: Path = args.dir
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        print(f"asobi new: {target} already exists and is not empty", file=sys.stderr)
        return 2
    target.mkdir(parents=True, exist_ok=True)
    templates = files("asobi.templates")
    for name in TEMPLATES:
        text = templates.joinpath(name).read_text(encoding="utf-8")
        if name == "README.md":
            text = text.replace("{name}", str(target))
        (target / name).write_text(text, encoding="utf-8")
        print(f"wrote {target / name}")
    print(f"\nnext: asobi serve --game-dir {target}   (see {target / 'README.md'})")
    return 0


def _server_url(args: argparse.Namespace) -> str:
    if args.url:
        url: str = args.url
        return url.rstrip("/")
    settings = Settings.from_env()
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{host}:{settings.port}"


def _get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, object]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"null")


def _print_reloads(records: list[dict[str, Any]]) -> None:
    # ms: save noticed -> every match resolved; tick_ms: the switching ticks' run time, summed.
    # new_matches: which version new matches start on ("previous": this one was refused).
    columns = (
        "id",
        "when",
        "script",
        "outcome",
        "matches",
        "new_matches",
        "ms",
        "tick_ms",
        "errors",
    )
    rows = []
    for r in records:
        when = time.strftime("%H:%M:%S", time.localtime(r.get("started_at", 0)))
        errors = "; ".join(r.get("errors") or [])
        if r.get("errors_truncated"):
            errors += f" (+{r['error_count'] - len(r['errors'])} more)"
        rows.append(
            (
                str(r["id"]),
                when,
                r["script"],
                r["outcome"],
                str(len(r.get("matches") or [])),
                str(r.get("new_matches", "")),
                f"{r.get('elapsed_ms', 0):.1f}",
                f"{r.get('switch_ms_total', 0):.1f}",
                errors,
            )
        )
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _print_push(record: dict[str, Any]) -> None:
    """A cluster reload record: the push, then one line per node and script."""
    when = time.strftime("%H:%M:%S", time.localtime(record.get("started_at", 0)))
    files = record.get("files") or []
    print(
        f"push {record['id']}  {when}  {record['outcome']}  bundle {record['bundle'][:12]}  "
        f"{len(files)} script{'' if len(files) == 1 else 's'}, {record.get('bytes', 0)} bytes  "
        f"from {record.get('pushed_by')}"
    )
    rows = []
    for answer in record.get("answers") or []:
        node = answer["node_id"] + (" (late)" if answer.get("late") else "")
        if answer.get("error"):
            rows.append((node, "-", answer["outcome"], "", answer["error"]))
        for script in answer.get("scripts") or []:
            errors = "; ".join(script.get("errors") or [])
            matches = f"{script['switched']}/{script['matches']}" if "matches" in script else ""
            rows.append((node, script["script"], script["outcome"], matches, errors))
        rows.extend((node, "-", "write failed", "", e) for e in answer.get("write_errors") or [])
    answered = {a["node_id"] for a in record.get("answers") or []}
    for node in record.get("nodes") or []:
        if node not in answered:
            why = "left the cluster" if node in (record.get("gone") or []) else "no answer"
            rows.append((node, "-", why, "", ""))
    columns = ("node", "script", "outcome", "switched", "errors")
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _reload_records(
    command: str, url: str, headers: dict[str, str] | None = None
) -> list[dict[str, Any]] | None:
    """The `reloads` list a server route answers with, or None after printing why not."""
    try:
        status, body = _get_json(url, headers)
    except OSError as exc:
        print(f"asobi {command}: cannot reach the server: {exc}", file=sys.stderr)
        return None
    if status != 200 or not isinstance(body, dict):
        print(f"asobi {command}: server answered {status}: {body}", file=sys.stderr)
        return None
    records: list[dict[str, Any]] = body["reloads"]
    return records


def cmd_reloads(args: argparse.Namespace) -> int:
    url = _server_url(args) + "/api/v1/reloads"
    try:
        status, body = _get_json(url)
    except OSError as exc:
        print(f"asobi reloads: cannot reach the server: {exc}", file=sys.stderr)
        return 2
    if status != 200 or not isinstance(body, dict):
        print(f"asobi reloads: server answered {status}: {body}", file=sys.stderr)
        return 2
    _print_reloads(body["reloads"])
    if "cluster_reloads_error" in body:
        print(f"\ncluster pushes: {body['cluster_reloads_error']}")
    for record in body.get("cluster_reloads") or []:
        print()
        _print_push(record)
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    token = Settings.from_env().admin_token
    if not token:
        print(
            "asobi reload: set ASOBI_ADMIN_TOKEN (the same value as the server's)", file=sys.stderr
        )
        return 2
    url = _server_url(args) + "/api/v1/admin/reload"
    if args.script:
        url += "?" + urllib.parse.urlencode({"script": args.script})
    records = _reload_records("reload", url, {"Authorization": f"Bearer {token}"})
    if records is None:
        return 2
    if not records:
        print("nothing changed on disk")
        return 0
    _print_reloads(records)
    return 1 if any(r["outcome"] != "reloaded" for r in records) else 0


DESCRIPTION = """\
asobi runs multiplayer matches scripted in Lua. Put match.lua in a folder, start the server on
it, and players connect over WebSocket; edit the script while matches run and they pick it up.
"""

EPILOG = """\
first steps:
  asobi new mygame                 make a game folder with two example scripts
  asobi serve --game-dir mygame    start the server (ws://localhost:8080/ws)
  npx -y wscat -c ws://localhost:8080/ws   then send {"type":"auth.guest","payload":{}}

every setting is also an ASOBI_* environment variable (see README.md)
"""


def cmd_replay(args: argparse.Namespace) -> int:
    from asobi.replay import ReplayError, limits_for, load_record, replay
    from asobi.store import open_backend

    settings = _settings(args)
    # The report is stdout; what the replayed match logs (its failures, game.log) goes to stderr.
    logsetup.configure("info", stream=sys.stderr, fmt="console")

    async def load() -> Any:
        backend = open_backend(settings.database_url, settings.data_dir)
        await backend.open()
        try:
            return await load_record(backend, args.match_id)
        finally:
            await backend.close()

    try:
        record = asyncio.run(load())
        limits, note = limits_for(record, settings.limits, use_local=args.local_limits)
        outcome = replay(record, until=args.until, limits=limits)
    except ReplayError as exc:
        print(f"asobi replay: {exc}", file=sys.stderr)
        return 2
    if note:
        print(note)
    print(outcome.text())
    return 0 if outcome.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asobi",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    new = sub.add_parser(
        "new",
        help="create a game folder: the tutorial script, a two-player example, a README",
        description="Write a ready game folder: match.lua (the tutorial), tug.lua (a "
        "two-player game with input) and a README with the commands to run and play it.",
    )
    new.add_argument("dir", type=Path, help="folder to create (must not exist or be empty)")
    new.set_defaults(func=cmd_new)

    serve = sub.add_parser(
        "serve",
        help="start the server on a game folder and reload scripts as you save them",
        description="Start the server on a game folder; saved scripts are reloaded live.",
    )
    serve.add_argument("--host", help="address to listen on (ASOBI_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (ASOBI_PORT, default 8080)")
    serve.add_argument("--game-dir", type=Path, help="scripts (ASOBI_GAME_DIR, default ./game)")
    serve.add_argument("--data-dir", type=Path, help="data (ASOBI_DATA_DIR, default ./data)")
    serve.add_argument("--reload", choices=RELOAD_MODES, help="ASOBI_RELOAD, default watch")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="node processes behind the one port, one per core (needs PostgreSQL and Redis; "
        "see docs/cluster.md)",
    )
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser(
        "token",
        help="print a login token for a player, signed with the server's secret",
        description="Print a token for session.connect, signed with the same secret the server "
        "uses (ASOBI_SECRET, else DATA_DIR/secret.key). Refuses when there is none.",
    )
    token.add_argument("player_id")
    token.add_argument("--data-dir", type=Path, help="where the secret lives (ASOBI_DATA_DIR)")
    token.add_argument("--ttl", type=int, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)

    check = sub.add_parser(
        "check",
        help="check every script the way the server will, without starting it",
        description="Load every script as the server does and report what it would refuse: "
        "syntax errors, missing init/tick/get_state, tick_rate or match_size out of range, "
        "top-level code over its time budget, require()s of missing modules. Exit 1 on errors.",
    )
    check.add_argument("--game-dir", type=Path, help="scripts (ASOBI_GAME_DIR, default ./game)")
    check.set_defaults(func=cmd_check)

    reloads = sub.add_parser(
        "reloads",
        help="show what happened to the last script saves on a running server",
        description="List a running server's recent reloads: which script, whether the matches "
        "took it, and which version new matches start on.",
    )
    reloads.add_argument("--url", help="server base URL (default from ASOBI_HOST/ASOBI_PORT)")
    reloads.set_defaults(func=cmd_reloads)

    reload = sub.add_parser(
        "reload",
        help="make a running server re-read its scripts now (needs ASOBI_ADMIN_TOKEN)",
        description="Make a running server re-read changed scripts now (for --reload off).",
    )
    reload.add_argument("script", nargs="?", help="one script (path under the game dir)")
    reload.add_argument("--url", help="server base URL (default from ASOBI_HOST/ASOBI_PORT)")
    reload.set_defaults(func=cmd_reload)

    replay = sub.add_parser(
        "replay",
        help="re-run a recorded match (ASOBI_RECORD=1) and show where it first differs",
        description="Re-run a match recorded with ASOBI_RECORD=1 from its first snapshot, on "
        "the script versions it ran, feeding its recorded inputs, joins and leaves, and compare "
        "every tick's get_state with the record. Prints the first divergence, or the tick where "
        "a callback failed with the state before it. Exit 1 when it differs or fails.",
    )
    replay.add_argument("match_id", help="the match's id (or a unique start of it)")
    replay.add_argument("--until", type=int, help="stop after this tick")
    replay.add_argument(
        "--local-limits",
        action="store_true",
        help="run under this machine's ASOBI_LUA_* limits, not the ones recorded with the match",
    )
    replay.add_argument("--data-dir", type=Path, help="data (ASOBI_DATA_DIR, default ./data)")
    replay.set_defaults(func=cmd_replay)

    from asobi import cli_cluster  # here: it imports this module

    cli_cluster.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from asobi.cluster.node import ClusterMisconfigured
    from asobi.extras import MissingExtra

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ClusterMisconfigured as exc:
        print(f"asobi: {exc}", file=sys.stderr)
        return 2
    except MissingExtra as exc:
        print(f"asobi: {exc}", file=sys.stderr)
        return 1
    except BadSetting as exc:
        print(f"asobi: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
