"""`asobi serve | token | check`: the command line, at the edge of everything else."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from asobi import log as logsetup
from asobi.config import RELOAD_MODES, Settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: getattr(args, key, None) for key in ("host", "port", "game_dir", "data_dir", "reload")
    }
    return Settings.from_env(**overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from asobi.app import App
    from asobi.server import AsobiServer

    settings = _settings(args)
    logsetup.configure(settings.log_level)
    app = App.create(settings)
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
    registry = ScriptRegistry(game_dir, settings.limits)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
