"""`asobi serve | token | check | reloads | reload`: the command line, at the edge of the rest."""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import orjson

from asobi import log as logsetup
from asobi.config import RELOAD_MODES, Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None) for key in ("host", "port", "game_dir", "data_dir", "reload")
    }
    return Settings.from_env(**overrides)


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections: a tick allocates many short-lived objects (frames,
    converted tables) that reference counting frees anyway, and a full collection walking every
    long-lived object is a pause that shows up as tick lateness.  Objects alive after start-up
    (modules, the app) are moved out of the collector's sight."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def cmd_serve(args: argparse.Namespace) -> int:
    from asobi.app import App
    from asobi.server import AsobiServer

    settings = _settings(args)
    logsetup.configure(settings.log_level)
    app = App.create(settings)
    _tune_gc()
    app.metrics.watch_gc()
    asyncio.run(AsobiServer(app).serve_forever())
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from asobi.auth import TokenSigner, load_or_create_secret

    settings = _settings(args)
    logsetup.configure("error", sys.stderr)
    signer = TokenSigner(
        load_or_create_secret(settings.data_dir, settings.secret), args.ttl or settings.token_ttl_s
    )
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
    registry = ScriptRegistry(game_dir, settings.limits, max_script_bytes=settings.max_script_bytes)
    errors = registry.load_all()
    for name in registry.names():
        print(f"ok    {name}")
    for error in errors:
        print(f"error {error.name}")
        for line in error.errors:
            print(f"      {line}")
        if error.truncated:
            print(f"      ... {error.error_count - len(error.errors)} more")
    print(f"{len(registry.names())} ok, {len(errors)} with errors")
    return 1 if errors else 0


def _server_url(args: argparse.Namespace) -> str:
    if args.url:
        return args.url.rstrip("/")
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


def _print_reloads(records: list[dict]) -> None:
    # ms: save noticed -> every match resolved; tick_ms: the switching ticks' run time, summed.
    columns = ("id", "when", "script", "outcome", "matches", "ms", "tick_ms", "errors")
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
                f"{r.get('elapsed_ms', 0):.1f}",
                f"{r.get('switch_ms_total', 0):.1f}",
                errors,
            )
        )
    widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _reload_records(command: str, url: str, headers: dict[str, str] | None = None) -> list | None:
    """The `reloads` list a server route answers with, or None after printing why not."""
    try:
        status, body = _get_json(url, headers)
    except OSError as exc:
        print(f"asobi {command}: cannot reach the server: {exc}", file=sys.stderr)
        return None
    if status != 200 or not isinstance(body, dict):
        print(f"asobi {command}: server answered {status}: {body}", file=sys.stderr)
        return None
    return body["reloads"]


def cmd_reloads(args: argparse.Namespace) -> int:
    records = _reload_records("reloads", _server_url(args) + "/api/v1/reloads")
    if records is None:
        return 2
    _print_reloads(records)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asobi", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server on a game directory")
    serve.add_argument("--host", help="address to listen on (ASOBI_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (ASOBI_PORT, default 8080)")
    serve.add_argument("--game-dir", type=Path, help="scripts (ASOBI_GAME_DIR, default ./game)")
    serve.add_argument("--data-dir", type=Path, help="data (ASOBI_DATA_DIR, default ./data)")
    serve.add_argument("--reload", choices=RELOAD_MODES, help="ASOBI_RELOAD, default watch")
    serve.set_defaults(func=cmd_serve)

    token = sub.add_parser("token", help="print a signed token for a player")
    token.add_argument("player_id")
    token.add_argument("--data-dir", type=Path, help="where the secret lives (ASOBI_DATA_DIR)")
    token.add_argument("--ttl", type=int, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)

    check = sub.add_parser("check", help="compile every script and report errors (exit 1)")
    check.add_argument("--game-dir", type=Path, help="scripts (ASOBI_GAME_DIR, default ./game)")
    check.set_defaults(func=cmd_check)
    reloads = sub.add_parser("reloads", help="print a running server's reload history")
    reloads.add_argument("--url", help="server base URL (default from ASOBI_HOST/ASOBI_PORT)")
    reloads.set_defaults(func=cmd_reloads)

    reload = sub.add_parser("reload", help="ask a running server to reload scripts now")
    reload.add_argument("script", nargs="?", help="one script (path under the game dir)")
    reload.add_argument("--url", help="server base URL (default from ASOBI_HOST/ASOBI_PORT)")
    reload.set_defaults(func=cmd_reload)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
