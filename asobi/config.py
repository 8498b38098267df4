"""Server settings: defaults, then `ASOBI_*` environment variables, then command-line flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from asobi.lua.runtime import Limits

RELOAD_MODES = ("watch", "poll", "off")
COMPRESSION_MODES = ("none", "deflate")
LOG_FORMATS = ("auto", "json", "console")
# How much of its period early a match may tick (ASOBI_TICK_EARLY_SHARE, see asobi/ticker.py): by
# default, and at most.
TICK_EARLY_SHARE = 0.04
MAX_TICK_EARLY_SHARE = 0.25


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8080
    game_dir: Path = Path("./game")
    data_dir: Path = Path("./data")
    secret: str | None = None
    token_ttl_s: int = 7 * 24 * 3600
    admin_token: str | None = None
    reload: str = "watch"
    reload_poll_ms: int = 200
    reload_debounce_ms: int = 50
    log_level: str = "info"
    max_frame_bytes: int = 64 * 1024
    max_message_bytes: int = 1024 * 1024
    connect_timeout_s: float = 10.0
    # WebSocket limits and hygiene (see docs/protocol.md).
    rate_limit_per_s: float = 60.0
    rate_limit_burst: int = 60
    max_connections: int = 10_000
    connect_rate_per_ip: float = 20.0
    connect_burst_per_ip: int = 40
    ping_interval_s: float = 20.0
    ping_timeout_s: float = 20.0
    compression: str = "none"
    outbound_soft_bytes: int = 256 * 1024
    outbound_hard_bytes: int = 4 * 1024 * 1024
    slow_reader_timeout_s: float = 10.0
    # A closing handshake the client does not answer ends this long after the server's close frame.
    close_timeout_s: float = 2.0
    # On SIGTERM: how long connections get to close before they are cut, so that the store is
    # always written out well inside a container runtime's stop grace period (10 s by default).
    shutdown_timeout_s: float = 5.0
    socket_sndbuf_bytes: int = 0  # 0: the kernel sizes (and autotunes) each send buffer
    ticket_ttl_s: float = 60.0
    # Matchmaking caps: modes with players waiting, and tickets one player may hold at once.
    max_queues: int = 1000
    max_tickets_per_player: int = 16
    # Scripts larger than this are refused (reload_failed) without being read further.
    max_script_bytes: int = 4 * 1024 * 1024
    reconnect_grace_s: float = 15.0
    max_consecutive_failures: int = 10
    # Inputs one player may have waiting in their match; more are dropped, counted and logged.
    max_queued_inputs: int = 64
    # Reload transactions (switches) one engine pass runs at most; the other matches a reload
    # concerns switch at their next ticks (0: no cap).  See docs/hot-reload.md.
    reload_switches_per_tick: int = 16
    # ASOBI_TICK_EARLY_SHARE: how much of its period early a match may tick to share the loop's
    # wake-up with matches due now (asobi/ticker.py; 0 to 0.25).  More batches more matches per
    # wake-up, for less CPU per frame (docs/performance.md), and lets frames leave up to that
    # much early; the schedule never moves.
    tick_early_share: float = TICK_EARLY_SHARE
    # ASOBI_HUGE_PAGES=0: `asobi serve` does not start again with glibc's huge-page tunable
    # (asobi/huge_pages.py).
    huge_pages: bool = True
    # ASOBI_MATCH_SEED: seed every match's random generator with this number (replays, tests).
    match_seed: int | None = None
    # ASOBI_SNAPSHOT_TICKS: ticks between a match's snapshots in the journal (docs/durability.md);
    # 0: once a second at the match's tick rate; a negative number turns the journal off.
    snapshot_ticks: int = 0
    # ASOBI_RECORD=1: record every match's inputs, joins, leaves and state digests per tick, for
    # `asobi replay` (docs/durability.md, "Replay").
    record: bool = False
    # The watchdog (asobi/watchdog.py): a Lua call still running this long after its deadline is
    # wedged; a loop that has not turned for wedge_exit_s exits the process; /ready is false for
    # wedge_ready_hold_s after a wedge; after SIGTERM a loop stuck this long is not waited for.
    wedge_after_s: float = 0.5
    wedge_exit_s: float = 10.0
    wedge_ready_hold_s: float = 30.0
    stop_stuck_s: float = 3.0
    # Empty: SQLite in data_dir.  postgresql://user:pass@host/db for PostgreSQL.
    database_url: str = ""
    # -- cluster (docs/cluster.md) --
    # ASOBI_REDIS_URL makes this server a node of a cluster (redis://host:6379/0, unix:///path).
    redis_url: str = ""
    # This node's id (default: hostname and process id) and the ws:// URL clients use to reach
    # this process directly, sent to them when a match they join runs here.
    node_id: str = ""
    public_url: str = ""
    # A node whose heartbeat is older than this is gone (its matches and tickets with it).
    node_ttl_s: float = 5.0
    heartbeat_s: float = 1.0
    # -- first-run experience --
    # ASOBI_LOG_FORMAT: json, console (coloured text), or auto (console on a terminal).
    log_format: str = "auto"
    # ASOBI_STRICT_MODES=1: a mode with no script of its own is refused, not run on match.lua.
    strict_modes: bool = False
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> Settings:
        env = dict(os.environ if env is None else env)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "limits":
                continue
            raw = env.get("ASOBI_" + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _coerce(f.name, raw)
        limits = Limits()
        limit_values = {}
        for f in fields(Limits):
            raw = env.get("ASOBI_LUA_" + f.name.upper())
            if raw:
                limit_values[f.name] = type(getattr(limits, f.name))(float(raw))
        values["limits"] = replace(limits, **limit_values)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        if settings.reload not in RELOAD_MODES:
            raise ValueError(f"ASOBI_RELOAD must be one of {', '.join(RELOAD_MODES)}")
        if settings.log_format not in LOG_FORMATS:
            raise ValueError(f"ASOBI_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
        if settings.compression not in COMPRESSION_MODES:
            raise ValueError(f"ASOBI_COMPRESSION must be one of {', '.join(COMPRESSION_MODES)}")
        if not 0.0 <= settings.tick_early_share <= MAX_TICK_EARLY_SHARE:
            raise ValueError(
                f"ASOBI_TICK_EARLY_SHARE must be from 0 to {MAX_TICK_EARLY_SHARE} (of a period)"
            )
        return settings


def _coerce(name: str, raw: str) -> Any:
    # A slots dataclass keeps no defaults as class attributes: read them from the fields.
    default = next((f.default for f in fields(Settings) if f.name == name), None)
    if name in ("game_dir", "data_dir"):
        return Path(raw)
    if name == "match_seed":
        return int(raw, 0)
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
