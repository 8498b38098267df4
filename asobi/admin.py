"""Admin frames: what the console at /console asks of a server, over the players' protocol.

An `AdminChannel` is the admin side of one connection (a `Session` owns one and routes the
`admin.*` frames here).  Nothing works before `admin.auth {token}` with the server's
`ASOBI_ADMIN_TOKEN`; without a configured token every admin frame is refused, so a server
nobody configured for it has no console.  The token is compared in constant time and never
logged.  Speaking the WebSocket protocol (rather than HTTP endpoints) keeps the console working
the same through anything that carries the game's socket.

The console is sent summaries only: pages of match summaries, and one watched match pushed at
WATCH_INTERVAL_S with what its players last received (taken from the hub's frame tap, so the
inspector shows exactly the frames that went out and costs the tick path nothing extra).
"""

from __future__ import annotations

import asyncio
import difflib
import hmac
import os
import resource
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog

from asobi import admin_feed
from asobi.app import App
from asobi.cluster.bundles import BadBundle, Bundle, BundleUpload
from asobi.cluster.drain import Drainer
from asobi.cluster.link import Unavailable
from asobi.frame_tap import FrameTap, tap_of
from asobi.hub import Peer
from asobi.lua.convert import ConversionError, to_python
from asobi.match import Match
from asobi.protocol import (
    ErrorCode,
    Frame,
    ProtocolError,
    encode,
    encode_error,
    optional_mode,
    optional_str,
    require_str,
)

log = structlog.get_logger("asobi.admin")

CLOSE_KICKED = 4001
MAX_AUTH_FAILURES = 5
WATCH_INTERVAL_S = 0.5
PAGE_MAX = 100
PAGE_DEFAULT = 50
RELOADS_SHOWN = 50
DIFF_MAX_LINES = 400
LATENESS_SAMPLES = 10_000
# Room for the frame's JSON around one `admin.push_data` chunk's base64.
PUSH_FRAME_OVERHEAD = 512


def memory_bytes() -> int:
    """Resident memory of this process (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


_diffs: dict[tuple[int, str, float], str] = {}


def script_diff(record: Any) -> str:
    """Unified diff from the version in force before a reload attempt to its content (cached:
    a record's sources never change; bounded like the history it comes from)."""
    key = (record.id, record.hash, record.started_at)
    cached = _diffs.get(key)
    if cached is not None:
        return cached
    before, after = record.sources()
    old = (before or b"").decode(errors="replace").splitlines(keepends=True)
    new = (after or b"").decode(errors="replace").splitlines(keepends=True)
    lines = list(
        difflib.unified_diff(
            old, new, f"{record.script} (before)", f"{record.script} ({record.hash})", n=2
        )
    )
    if len(lines) > DIFF_MAX_LINES:
        lines = [*lines[:DIFF_MAX_LINES], f"... {len(lines) - DIFF_MAX_LINES} more lines\n"]
    text = "".join(lines)
    if len(_diffs) >= 1024:
        _diffs.clear()
    _diffs[key] = text
    return text


class AdminChannel:
    """The admin side of one connection: authentication, queries, actions, subscriptions."""

    def __init__(self, app: App, peer: Peer, remote: str = "") -> None:
        self.app = app
        self.peer = peer
        self.remote = remote
        self.authorized = False
        self._failures = 0
        self._feed: admin_feed.FeedSubscription | None = None
        self._watched: str | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._reload_tasks: set[asyncio.Task[None]] = set()
        self._upload: BundleUpload | None = None

    def handlers(self) -> dict[str, Callable[[Frame], None]]:
        guarded = {
            "admin.overview": self._overview,
            "admin.matches": self._matches,
            "admin.match": self._match,
            "admin.watch": self._watch,
            "admin.unwatch": self._unwatch,
            "admin.end_match": self._end_match,
            "admin.kick": self._kick,
            "admin.message": self._message,
            "admin.reloads": self._reloads,
            "admin.reload": self._reload,
            "admin.queues": self._queues,
            "admin.push": self._push_begin,
            "admin.push_data": self._push_data,
            "admin.drain": self._drain,
        }
        out: dict[str, Callable[[Frame], None]] = {"admin.auth": self._auth}
        for kind, handler in guarded.items():
            out[kind] = self._guard(handler)
        return out

    def closed(self) -> None:
        if self._feed is not None:
            self._feed.close()
            self._feed = None
        self._stop_watch()

    # -- plumbing ---------------------------------------------------------------------------------
    def _guard(self, handler: Callable[[Frame], None]) -> Callable[[Frame], None]:
        def guarded(frame: Frame) -> None:
            if not self.authorized:
                raise ProtocolError(
                    ErrorCode.ADMIN_UNAUTHORIZED, "send admin.auth {token} first", frame.cid
                )
            handler(frame)

        return guarded

    def _reply(self, frame: Frame, kind: str, payload: Any) -> None:
        self.peer.send_frame(encode(kind, payload, frame.cid))

    def _push(self, kind: str, payload: Any) -> None:
        self.peer.send_frame(encode(kind, payload), droppable=True)

    def _find_match(self, frame: Frame) -> Match:
        match_id = require_str(frame, "match_id", max_length=64)
        match = self.app.engine.matches.get(match_id)
        if match is None or match.finished:
            raise ProtocolError(
                ErrorCode.MATCH_NOT_FOUND, "no running match with this id", frame.cid
            )
        return match

    # -- authentication ---------------------------------------------------------------------------
    def _auth(self, frame: Frame) -> None:
        expected = self.app.settings.admin_token
        if not expected:
            raise ProtocolError(
                ErrorCode.ADMIN_DISABLED,
                "the console is disabled: start the server with ASOBI_ADMIN_TOKEN set",
                frame.cid,
            )
        given = frame.payload.get("token")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected.encode()):
            self._failures += 1
            log.warning("admin_auth_failed", remote=self.remote, failures=self._failures)
            if self._failures >= MAX_AUTH_FAILURES:
                self.peer.close(1008, "too many failed admin.auth attempts")
            raise ProtocolError(ErrorCode.ADMIN_UNAUTHORIZED, "wrong admin token", frame.cid)
        if not self.authorized:
            self.authorized = True
            self._feed = admin_feed.FeedSubscription(lambda ev: self._push("admin.log", ev))
            log.info("admin_connected", remote=self.remote)
        self._reply(frame, "admin.authed", {"recent": admin_feed.recent()})

    # -- queries ----------------------------------------------------------------------------------
    def overview(self) -> dict[str, Any]:
        app = self.app
        recent = list(app.metrics.recent_lateness)[-LATENESS_SAMPLES:]
        recent.sort()
        p50, p99 = percentile(recent, 0.5), percentile(recent, 0.99)
        return {
            "pid": os.getpid(),
            "game_dir": str(app.registry.game_dir),
            "connections": app.metrics.read("connections"),
            "players": len(app.hub),
            "matches": len(app.engine.matches),
            "seats_held": len(app.presence),
            "tickets": len(app.matchmaker),
            "ticks": app.engine.ticks,
            "tick_lateness_ms": {
                "p50": None if p50 is None else round(p50 * 1000, 3),
                "p99": None if p99 is None else round(p99 * 1000, 3),
                "samples": len(recent),
            },
            "memory_bytes": memory_bytes(),
            "scripts": [
                {"name": n, "version": v.version}
                for n in app.registry.names()
                if (v := app.registry.get(n)) is not None
            ],
            "modes": app.registry.known_modes(),
            "reload": app.settings.reload,
        }

    def _overview(self, frame: Frame) -> None:
        self._reply(frame, "admin.overview", self.overview())

    def _matches(self, frame: Frame) -> None:
        mode = optional_mode(frame)
        version = optional_str(frame, "version", max_length=128)
        offset = _int_field(frame, "offset", 0, 0, 10**9)
        limit = _int_field(frame, "limit", PAGE_DEFAULT, 1, PAGE_MAX)
        running = [m for m in self.app.engine.matches.values() if not m.finished]
        chosen = [
            m
            for m in running
            if (mode is None or m.mode == mode) and (version is None or m.script.version == version)
        ]
        self._reply(
            frame,
            "admin.matches",
            {
                "total": len(chosen),
                "running": len(running),
                "offset": offset,
                "limit": limit,
                "modes": sorted({m.mode for m in running}),
                "versions": sorted({m.script.version for m in running}),
                "matches": [_summary(m) for m in chosen[offset : offset + limit]],
            },
        )

    def _match(self, frame: Frame) -> None:
        match = self._find_match(frame)
        self._reply(frame, "admin.match", self._inspect(match, None))

    def _inspect(self, match: Match, rates: dict[str, float] | None) -> dict[str, Any]:
        app = self.app
        out = _summary(match)
        out["players"] = [
            {
                "player_id": pid,
                "connected": app.hub.peer(pid) is not None,
                "seat_held": app.presence.is_held(pid),
            }
            for pid in match.players
        ]
        out["seats"] = {"used": len(match.players), "max": match.script.meta.max_players}
        try:
            raw = orjson.dumps(
                to_python(match.state, what="match state"), option=orjson.OPT_NON_STR_KEYS
            )
            out["state_bytes"] = len(raw)
        except (ConversionError, TypeError) as exc:
            out["state_bytes"] = None
            out["state_error"] = str(exc)[:500]
        tap = app.hub.tap
        views: dict[str, Any] = {}
        if isinstance(tap, FrameTap):
            for pid, view in tap.last_state.get(match.id, {}).items():
                views[pid] = orjson.loads(view)["payload"] if isinstance(view, bytes) else view
        out["views"] = views
        if rates is not None:
            out.update(rates)
        return out

    def _queues(self, frame: Frame) -> None:
        queues = [
            {"mode": mode, "depth": depth, "oldest_wait_s": round(age, 3)}
            for mode, depth, age in self.app.matchmaker.queues()
        ]
        self._reply(frame, "admin.queues", {"queues": queues})

    def _reloads(self, frame: Frame) -> None:
        records = list(self.app.history)[-RELOADS_SHOWN:]
        records.reverse()
        out = []
        for record in records:
            item = record.as_dict()
            item["diff"] = script_diff(record)
            out.append(item)
        self._reply(frame, "admin.reloads", {"reloads": out})

    # -- live inspection --------------------------------------------------------------------------
    def _watch(self, frame: Frame) -> None:
        match = self._find_match(frame)
        self._stop_watch()
        self._watched = match.id
        tap_of(self.app).watch(match.id)
        # Players in patch mode get a full frame next: the tap builds its views on one.
        for pid in match.players:
            match.resync(pid)
        self._watch_task = asyncio.get_running_loop().create_task(self._push_watched(match))
        self._reply(frame, "admin.watching", {"match_id": match.id, "interval_s": WATCH_INTERVAL_S})

    def _unwatch(self, frame: Frame) -> None:
        self._stop_watch()
        self._reply(frame, "admin.unwatched", {})

    def _stop_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            self._watch_task = None
        self._release_tap()

    def _release_tap(self) -> None:
        if self._watched is not None:
            tap = self.app.hub.tap
            if isinstance(tap, FrameTap):
                tap.unwatch(self._watched)
                if not tap.watchers:
                    self.app.hub.tap = None
            self._watched = None

    async def _push_watched(self, match: Match) -> None:
        engine = self.app.engine
        tap = tap_of(self.app)
        last_t = time.monotonic()
        last_inputs = engine.inputs_received.get(match.id, 0)
        last_bytes = tap.bytes_sent.get(match.id, 0)
        try:
            while not match.finished:
                await asyncio.sleep(WATCH_INTERVAL_S)
                if match.finished:
                    break
                now = time.monotonic()
                inputs = engine.inputs_received.get(match.id, 0)
                sent = tap.bytes_sent.get(match.id, 0)
                span = max(now - last_t, 1e-6)
                rates = {
                    "inputs_per_s": round((inputs - last_inputs) / span, 2),
                    "bytes_per_s": round((sent - last_bytes) / span, 1),
                }
                last_t, last_inputs, last_bytes = now, inputs, sent
                try:
                    self._push("admin.match", self._inspect(match, rates))
                except Exception:
                    log.exception("admin_watch_failed", match_id=match.id)
            self._push("admin.match", {"match_id": match.id, "finished": True})
            self._watch_task = None
            self._release_tap()
        except asyncio.CancelledError:
            pass

    # -- actions ----------------------------------------------------------------------------------
    def _end_match(self, frame: Frame) -> None:
        match = self._find_match(frame)
        log.info("admin_match_ended", match_id=match.id, mode=match.mode, remote=self.remote)
        self.app.engine.finish(match, {"reason": "ended_by_admin"})
        self._reply(frame, "admin.match_ended", {"match_id": match.id})

    def _kick(self, frame: Frame) -> None:
        """Take the player out of their match (`leave` runs) and close their connection (4001);
        a seat held for a dropped player is given up too."""
        app = self.app
        player_id = require_str(frame, "player_id", max_length=256)
        peer = app.hub.peer(player_id)
        match = app.engine.match_of(player_id)
        if peer is None and match is None:
            raise ProtocolError(
                ErrorCode.PLAYER_NOT_FOUND, "no such player connected or seated", frame.cid
            )
        app.matchmaker.remove(player_id)
        app.presence.forget(player_id)
        if match is not None:
            app.engine.remove_player(player_id)
        if peer is not None:
            peer.close(CLOSE_KICKED, "kicked by an administrator")
        elif app.store is not None:
            app.store.release(player_id)
        log.info(
            "admin_kicked",
            player_id=player_id,
            match_id=match.id if match is not None else None,
            remote=self.remote,
        )
        self._reply(frame, "admin.kicked", {"player_id": player_id})

    def _message(self, frame: Frame) -> None:
        match = self._find_match(frame)
        text = require_str(frame, "text", max_length=2000)
        out = encode(
            "match.message", {"match_id": match.id, "payload": {"text": text}, "from": "admin"}
        )
        for pid in match.players:
            self.app.hub.send(pid, out)
        log.info("admin_message_sent", match_id=match.id, players=len(match.players))
        self._reply(
            frame, "admin.message_sent", {"match_id": match.id, "players": len(match.players)}
        )

    def _reload(self, frame: Frame) -> None:
        """The manual reload path (`asobi reload`): re-read scripts from disk now.  Outcomes
        arrive as `admin.log` events and in `admin.reloads`."""
        registry = self.app.registry
        script = optional_str(frame, "script", max_length=256)
        if script is not None and registry.relative_name(registry.game_dir / script) != script:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"not a script: {script}", frame.cid)
        # Files are read off the loop, so the answer comes when the reads are done (the frame's
        # cid pairs them); outcomes of the switches that follow arrive as `admin.log` events.
        task = asyncio.get_running_loop().create_task(self._reload_from_disk(frame, script))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _reload_from_disk(self, frame: Frame, script: str | None) -> None:
        try:
            records = await self.app.reloader.reload_now(script, "manual")
        except Exception:
            log.exception("admin_reload_failed", script=script, remote=self.remote)
            self._reply(frame, "admin.reloading", {"reloads": [], "error": "reload crashed"})
            return
        log.info("admin_reload", script=script, attempts=len(records), remote=self.remote)
        self._reply(frame, "admin.reloading", {"reloads": [r.as_dict() for r in records]})

    # -- cluster push (`asobi push`, docs/cluster.md) ---------------------------------------------
    def _push_begin(self, frame: Frame) -> None:
        """`admin.push {files: [{path, size}], hash}` announces a bundle; its bytes follow in
        acknowledged `admin.push_data {offset, data}` chunks (base64), since a frame is capped
        far below a bundle's bound.  The last chunk is answered by `admin.pushed {record}` once
        every node answered."""
        if self.app.cluster_reloader is None:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "asobi push needs a node of a cluster (ASOBI_REDIS_URL); on a single server, "
                "save the files in its game dir or use asobi reload",
                frame.cid,
            )
        try:
            self._upload = upload = BundleUpload(
                frame.payload.get("files"),
                frame.payload.get("hash"),
                self.app.settings.max_script_bytes,
            )
        except BadBundle as exc:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, str(exc), frame.cid) from None
        chunk = (self.app.settings.max_frame_bytes - PUSH_FRAME_OVERHEAD) // 4 * 3
        self._reply(frame, "admin.push_ready", {"chunk_bytes": chunk, "bytes": upload.total})
        if upload.complete:
            self._push_received(frame, upload)

    def _push_data(self, frame: Frame) -> None:
        upload = self._upload
        if upload is None:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "send admin.push first", frame.cid)
        try:
            upload.add(frame.payload.get("offset"), frame.payload.get("data"))
        except BadBundle as exc:
            self._upload = None
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, str(exc), frame.cid) from None
        if upload.complete:
            self._push_received(frame, upload)
        else:
            self._reply(frame, "admin.push_received", {"received": upload.received})

    def _push_received(self, frame: Frame, upload: BundleUpload) -> None:
        self._upload = None
        try:
            bundle = upload.bundle()
        except BadBundle as exc:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, str(exc), frame.cid) from None
        task = asyncio.get_running_loop().create_task(self._push_bundle(frame, bundle))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _push_bundle(self, frame: Frame, bundle: Bundle) -> None:
        assert self.app.cluster_reloader is not None
        try:
            record = await self.app.cluster_reloader.push(bundle)
        except Unavailable as exc:
            self.peer.send_frame(encode_error(ErrorCode.UNAVAILABLE, str(exc), frame.cid))
            return
        except Exception:
            log.exception("admin_push_failed", bundle=bundle.hash, remote=self.remote)
            self.peer.send_frame(encode_error(ErrorCode.INTERNAL, "push crashed", frame.cid))
            return
        log.info("admin_push", record=record["id"], bundle=bundle.hash, remote=self.remote)
        self._reply(frame, "admin.pushed", {"record": record})

    # -- drain (`asobi drain`, docs/durability.md) -----------------------------------------------
    def _drain(self, frame: Frame) -> None:
        """Move every match of this node to the other nodes; answered by `admin.drained`."""
        drainer = self.app.drainer
        if drainer is None:
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "asobi drain needs a node of a cluster (ASOBI_REDIS_URL) with its journal on",
                frame.cid,
            )
        task = asyncio.get_running_loop().create_task(self._run_drain(frame, drainer))
        self._reload_tasks.add(task)
        task.add_done_callback(self._reload_tasks.discard)

    async def _run_drain(self, frame: Frame, drainer: Drainer) -> None:
        try:
            result = await drainer.drain()
        except Exception:
            log.exception("admin_drain_failed", remote=self.remote)
            self.peer.send_frame(encode_error(ErrorCode.INTERNAL, "drain crashed", frame.cid))
            return
        log.info("admin_drain", remote=self.remote, **result.as_dict())
        self._reply(frame, "admin.drained", result.as_dict())


def _summary(match: Match) -> dict[str, Any]:
    return {
        "match_id": match.id,
        "mode": match.mode,
        "script": match.script.name,
        "version": match.script.version,
        "players": len(match.players),
        "max_players": match.script.meta.max_players,
        "tick": match.tick_no,
        "tick_rate": match.script.meta.tick_rate,
        "last_error": (match.last_error or "").split("\n", 1)[0][:300] or None,
    }


def _int_field(frame: Frame, key: str, default: int, low: int, high: int) -> int:
    value = frame.payload.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"{frame.type}: payload.{key} must be an integer from {low} to {high}",
            frame.cid,
        )
    return value
