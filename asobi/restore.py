"""Matches back from the journal when a server starts: a crash or a restart costs a short pause.

(On a node of a cluster the journal's `all` is empty: the node takes its matches back by claiming
them once its heartbeat names the new process, `Failover.take_back`, and restores each through
`restore_match` as an adopter does.)

Each snapshot in the journal (`asobi.journal`) is a match that was running when the process
stopped.  It is started again on the script in force: on the very version it ran when the content
hash matches, else on the current version with the script's `migrate(state, info)` run on the
restored state first, as a reload does (`info.restored` is true).  What cannot be restored (the
script is gone, the state does not unpack, `migrate` fails or returns something that is not a
table) is logged as `match_restore_refused` and dropped from the journal.

The tick counter, the random generator and the seats continue from the snapshot.  Each seat is
held for the reconnect grace period with the player's resume token from the snapshot: a player who
reconnects with it lands in the restored match and is sent `match.restored {match_id, tick,
lost_ticks}`.  `lost_ticks` counts the ticks known to have run after the snapshot: the last unit
of work the match committed to the store (`match_marks`) says which tick it had reached; when no
unit was committed after the snapshot it is 0, a lower bound (see docs/durability.md).  Those
re-run ticks' writes are not applied twice: the store skips units it already has
(`StoreModel.committed_before`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import structlog

from asobi.journal import Snapshot
from asobi.lua.runtime import ScriptLoadError
from asobi.match import Match
from asobi.match_host import first_line, lua_kind
from asobi.protocol import encode

if TYPE_CHECKING:
    from asobi.app import App

log = structlog.get_logger("asobi.restore")


class RestoreRefused(Exception):
    """This snapshot cannot become a running match."""


async def restore_matches(app: App) -> list[Match]:
    """Start every match in the journal again; returns the ones restored."""
    if app.journal is None:
        return []
    snapshots = await app.journal.all()
    if not snapshots:
        return []
    marks = await app.store.match_marks() if app.store is not None else {}
    restored = []
    for snapshot in snapshots:
        if snapshot.match_id in app.engine.matches:
            continue
        try:
            match = restore_match(app, snapshot, marks.get(snapshot.match_id))
        except (RestoreRefused, ValueError) as exc:  # ValueError: a damaged random state
            log.error(
                "match_restore_refused",
                match_id=snapshot.match_id,
                mode=snapshot.mode,
                script=snapshot.script,
                tick=snapshot.tick,
                error=str(exc),
            )
            app.journal.forget(snapshot.match_id)
            continue
        restored.append(match)
    return restored


def restore_match(
    app: App,
    snapshot: Snapshot,
    mark: tuple[int, int] | None,
    *,
    schedule: bool = True,
    notify: bool = True,
    present: dict[str, str | None] | None = None,
) -> Match:
    """Start one match from its snapshot; raises RestoreRefused.

    `schedule` False registers the match and its seats without ticking it yet: a node receiving
    a drained match starts its clock once the players have arrived (`Engine.adopt`), so they miss
    no tick.  `notify` False sends no `match.restored` (a drained match lost nothing).
    `present` are players already connected here (sent ahead of a drained match): they take
    their seats at once and keep the resume token of the session they opened here."""
    engine = app.engine
    version = app.registry.get(snapshot.script)
    if version is None:
        raise RestoreRefused(f"script {snapshot.script} is not in the game directory any more")
    try:
        match = Match(engine, snapshot.match_id, snapshot.mode, version, [])
    except ScriptLoadError as exc:
        raise RestoreRefused(f"{snapshot.script} failed to load: {first_line(str(exc))}") from None
    lua = match.lua
    match.seed = snapshot.seed
    match.tick_no = snapshot.tick
    lua.set_context(match.id, snapshot.tick, [])
    unpacked = lua.unpack_state(snapshot.state)
    if not unpacked.ok:
        raise RestoreRefused(f"the state does not unpack: {first_line(unpacked.error)}")
    state = unpacked.value
    migrated = version.hash != snapshot.script_hash
    if migrated and lua.function("migrate") is not None:
        info = lua.to_lua(
            {
                "from_version": snapshot.script_version,
                "to_version": version.version,
                "restored": True,
            }
        )
        result = lua.call("migrate", state, info)
        if not result.ok:
            raise RestoreRefused(f"migrate failed: {first_line(result.error)}")
        if result.value is not None:
            if not lua.is_table(result.value):
                raise RestoreRefused(f"migrate returned a {lua_kind(result.value)}, not a table")
            state = result.value
        match.effects.commit_work()
        match.effects.frames.clear()  # nobody is connected yet to receive them
    lua.set_random_state(snapshot.random)
    match.state = state
    match.players = [pid for pid, _ in snapshot.seats]
    lua.set_players(match.players)
    if schedule:
        engine.adopt(match)
    else:
        engine.matches[match.id] = match
        for pid in match.players:
            engine.player_match[pid] = match.id

    lost_ticks = 0
    if mark is not None and mark[0] > snapshot.tick:
        lost_ticks = mark[0] - snapshot.tick
        if app.store is not None:
            app.store.model.committed_before[match.id] = mark
    notice = encode(
        "match.restored", {"match_id": match.id, "tick": snapshot.tick, "lost_ticks": lost_ticks}
    )
    now = time.monotonic()
    unclaimable = []
    for pid, token in snapshot.seats:
        if present is not None and pid in present:
            if present[pid] is None:
                app.presence.issue(pid)
            continue  # seated now, with the resume token of their session here
        if app.presence.restore(pid, token, now):
            if notify:
                engine.restored_notices[pid] = notice
        else:
            unclaimable.append(pid)
    log.info(
        "match_restored",
        match_id=match.id,
        mode=match.mode,
        script=version.name,
        version=version.version,
        migrated_from=snapshot.script_version if migrated else None,
        tick=snapshot.tick,
        lost_ticks=lost_ticks,
        players=match.players,
        snapshot_age_ms=max(0, int(time.time() * 1000) - snapshot.saved_at_ms),
    )
    for pid in unclaimable:
        # No grace period (or no token): nobody can take this seat back.
        engine.remove_player(pid)
    return match
