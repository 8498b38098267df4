"""Reload across the cluster: `asobi push` puts a bundle in force on every node, and one record
says what each node made of it.

The pushing node stores the bundle (`asobi.cluster.bundles`), opens a cluster reload record,
moves the cluster's current-bundle pointer and announces the bundle on the bus.  Every node,
the pusher included, then runs each script of the bundle through its own `Reloader` (the very
transaction a saved file goes through: vetting on a worker thread, then each running match
switching at a tick boundary, or refusing and keeping the old code), waits for its matches to
settle, and writes its outcome into the record.  The pusher answers once every node that was
live at the push answered (or left the cluster, or the wait ran out).

What a node ends up running is also written to its game dir: the scripts now in force, never
one it refused.  So its files and its memory agree, its own file watcher sees nothing new (the
written content is the version in force: `unchanged`), a restart of that node loads what it ran,
and a local save still wins on that node until the next push.  A node starting after a push
reads the current-bundle pointer before it serves and applies that bundle the same way, adding
its outcome (`late`) to the push's record.  A node that missed an announcement (pub/sub drops
messages while Redis restarts) finds the pointer moved on its next check.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from asobi.cluster.bundles import Bundle, BundleStore, write_scripts
from asobi.cluster.link import RedisLink, Unavailable, key
from asobi.scripts import content_hash

if TYPE_CHECKING:
    from asobi.cluster.nodes import NodeDirectory
    from asobi.reload import Reloader, ReloadRecord

log = structlog.get_logger("asobi.cluster.reloads")

RECORDS = key("reloads")
RECORD_SEQ = key("reloads", "seq")
RECORDS_KEPT = 100
RECORD_TTL_S = 30 * 24 * 3600
# How long a node waits for its matches to switch or refuse before it answers "pending".
SETTLE_S = 5.0
# How long the pusher waits for every node's answer.
PUSH_WAIT_S = 15.0
# How often a node compares the current-bundle pointer with what it applied.
CATCH_UP_S = 5.0
# The log event of a node's outcome (`bundle_pending`: its matches had not all settled).
APPLY_EVENTS = {"reloaded": "bundle_applied", "refused": "bundle_refused"}


def _record_key(record_id: int) -> str:
    return key("reload", str(record_id))


class ReloadRecords:
    """Cluster reload records in Redis: a hash per record (`meta`, and `node:<id>` per node
    that answered) and a list of the latest record ids."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def create(self, meta: dict[str, Any]) -> int:
        redis = self.link.redis
        record_id = int(await self.link.call("open a reload record", redis.incr(RECORD_SEQ)))
        meta = dict(meta, id=record_id)
        name = _record_key(record_id)
        pipe = redis.pipeline(transaction=True)
        pipe.hset(name, "meta", orjson.dumps(meta))
        pipe.expire(name, RECORD_TTL_S)
        pipe.lpush(RECORDS, record_id)
        pipe.ltrim(RECORDS, 0, RECORDS_KEPT - 1)
        await self.link.call("open a reload record", pipe.execute())
        return record_id

    async def answer(self, record_id: int, node_id: str, outcome: dict[str, Any]) -> None:
        name = _record_key(record_id)
        await self.link.call(
            "answer a reload record",
            self.link.redis.hset(name, "node:" + node_id, orjson.dumps(outcome)),
        )

    async def get(self, record_id: int) -> dict[str, Any] | None:
        raw = await self.link.call(
            "read a reload record", self.link.redis.hgetall(_record_key(record_id))
        )
        if not raw or b"meta" not in raw:
            return None
        record: dict[str, Any] = orjson.loads(raw.pop(b"meta"))
        answers = [orjson.loads(v) for k, v in sorted(raw.items()) if k.startswith(b"node:")]
        record["answers"] = answers
        record["outcome"] = summarize(record)
        return record

    async def recent(self, count: int = 20) -> list[dict[str, Any]]:
        """The latest records, newest first."""
        ids = await self.link.call(
            "list reload records", self.link.redis.lrange(RECORDS, 0, count - 1)
        )
        records = [await self.get(int(i)) for i in ids]
        return [r for r in records if r is not None]


def summarize(record: dict[str, Any]) -> str:
    """One word for a record: `reloaded` (every node took or already had every script),
    `refused` (some node refused some script), `pending` (a node still waits on its matches)
    or `incomplete` (a node live at the push has not answered)."""
    answers = record.get("answers") or []
    outcomes = {a.get("outcome") for a in answers}
    if "refused" in outcomes:
        return "refused"
    if "pending" in outcomes:
        return "pending"
    answered = {a.get("node_id") for a in answers}
    if set(record.get("nodes") or []) - answered:
        return "incomplete"
    return "reloaded"


class ClusterReloader:
    """This node's part in cluster reloads: pushing bundles, and applying every push."""

    def __init__(
        self,
        link: RedisLink,
        nodes: NodeDirectory,
        reloader: Reloader,
        max_bytes: int,
    ) -> None:
        self.link = link
        self.nodes = nodes
        self.reloader = reloader
        self.max_bytes = max_bytes
        self.bundles = BundleStore(link)
        self.records = ReloadRecords(link)
        self.applied = 0  # the latest record this node applied
        self._lock = asyncio.Lock()
        self._catch_up: asyncio.Task[None] | None = None

    # -- lifecycle (Cluster.on_start) -------------------------------------------------------------
    async def start(self) -> None:
        """Before the node serves: run the latest pushed bundle, not older local files."""
        self.link.on("bundle", self._announced)
        try:
            await self.catch_up(late=True)
        except Unavailable as exc:
            # Redis answered a moment ago; the periodic check applies the push once it is back.
            log.warning("bundle_catch_up_failed", node_id=self.link.node_id, error=str(exc))
        self._catch_up = asyncio.create_task(self._keep_up())

    async def stop(self) -> None:
        if self._catch_up is not None:
            self._catch_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._catch_up

    async def catch_up(self, *, late: bool = False) -> None:
        current = await self.bundles.current()
        if current is not None and current[0] > self.applied:
            await self.apply(current[0], current[1], late=late)

    async def _keep_up(self) -> None:
        while True:
            await asyncio.sleep(CATCH_UP_S)
            try:
                await self.catch_up()
            except Unavailable:
                pass
            except Exception:
                log.exception("bundle_catch_up_failed", node_id=self.link.node_id)

    # -- pushing ----------------------------------------------------------------------------------
    async def push(self, bundle: Bundle) -> dict[str, Any]:
        """Store `bundle`, make it the cluster's, have every node apply it; the record once
        every node live now answered (or left), or after PUSH_WAIT_S."""
        self.link.require_up("push scripts")
        stored = await self.bundles.put(bundle)
        expected = sorted({*self.nodes.nodes, self.link.node_id})
        record_id = await self.records.create(
            {
                "bundle": bundle.hash,
                "files": list(bundle.files),
                "bytes": bundle.size,
                "pushed_by": self.link.node_id,
                "started_at": time.time(),
                "nodes": expected,
            }
        )
        await self.bundles.set_current(bundle.hash, record_id)
        log.info(
            "bundle_pushed",
            record=record_id,
            bundle=bundle.hash,
            files=len(bundle.files),
            bytes=bundle.size,
            stored=stored,
            nodes=expected,
        )
        await self.link.broadcast("bundle", {"record": record_id, "bundle": bundle.hash})
        return await self.wait(record_id)

    async def wait(self, record_id: int, timeout_s: float = PUSH_WAIT_S) -> dict[str, Any]:
        """The record once every node it expects answered or left the cluster."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            record = await self.records.get(record_id)
            if record is None:
                raise Unavailable(f"reload record {record_id} vanished from Redis")
            answered = {a["node_id"] for a in record["answers"]}
            waiting = [n for n in record["nodes"] if n not in answered and self.nodes.alive(n)]
            gone = [n for n in record["nodes"] if n not in answered and not self.nodes.alive(n)]
            if not waiting or asyncio.get_running_loop().time() > deadline:
                record["gone"] = gone
                record["no_answer"] = waiting
                return record
            await asyncio.sleep(0.05)

    # -- applying ---------------------------------------------------------------------------------
    async def _announced(self, message: dict[str, Any]) -> None:
        record_id, address = message.get("record"), message.get("bundle")
        if isinstance(record_id, int) and isinstance(address, str):
            await self.apply(record_id, address)

    async def apply(self, record_id: int, address: str, *, late: bool = False) -> None:
        """Put the bundle of push `record_id` in force here and answer the record.  Pushes are
        applied one at a time and never backwards (an older push arriving late is skipped)."""
        async with self._lock:
            if record_id <= self.applied:
                return
            started = time.perf_counter()
            bundle = await self.bundles.get(address)
            if bundle is None:
                outcome: dict[str, Any] = {
                    "outcome": "refused",
                    "scripts": [],
                    "error": f"bundle {address[:12]} is not in Redis (expired?)",
                }
            else:
                outcome = await self._apply_bundle(bundle)
            outcome.update(
                node_id=self.link.node_id,
                bundle=address,
                late=late,
                elapsed_ms=round((time.perf_counter() - started) * 1000, 3),
            )
            await self.records.answer(record_id, self.link.node_id, outcome)
            # Only once answered: a node that could not answer applies it again at its next
            # check (finding its scripts unchanged) and answers then.
            self.applied = record_id
            event = APPLY_EVENTS.get(outcome["outcome"], "bundle_pending")
            logger = log.info if event == "bundle_applied" else log.warning
            logger(
                event,
                record=record_id,
                bundle=address,
                node_id=self.link.node_id,
                late=late,
                scripts={s["script"]: s["outcome"] for s in outcome["scripts"]},
                errors=[e for s in outcome["scripts"] for e in s.get("errors", [])][:3],
            )

    async def _apply_bundle(self, bundle: Bundle) -> dict[str, Any]:
        registry = self.reloader.registry
        sources: list[tuple[str, bytes]] = []
        scripts: dict[str, dict[str, Any]] = {}
        for path in bundle.apply_order():
            # The node's own reading of the path (a folder that is a symbolic link here, say).
            if registry.relative_name(registry.game_dir / path) != path:
                scripts[path] = _refused(path, [f"{path} is not a script path in this game dir"])
            else:
                sources.append((path, bundle.files[path]))
        applied = await self.reloader.apply_sources(sources, "push")
        records = [r for _, r in applied if r is not None]
        await _settled(records, SETTLE_S)
        for path, result in applied:
            scripts[path] = self._script_outcome(path, result)
        # The files follow what is in force: written when this node took them, never otherwise.
        in_force = {
            path: data
            for path, data in bundle.files.items()
            if (v := registry.get(path)) is not None and v.hash == content_hash(data)
        }
        write_errors = await asyncio.to_thread(write_scripts, registry.game_dir, in_force)
        for line in write_errors:
            log.warning("bundle_write_failed", node_id=self.link.node_id, error=line)
        ordered = [scripts[p] for p in bundle.files]
        outcomes = {s["outcome"] for s in ordered}
        return {
            "outcome": "refused"
            if "refused" in outcomes
            else "pending"
            if "pending" in outcomes
            else "reloaded",
            "scripts": ordered,
            "write_errors": write_errors,
        }

    def _script_outcome(self, path: str, result: ReloadRecord | None) -> dict[str, Any]:
        if result is None:
            return {"script": path, "outcome": "unchanged"}
        out: dict[str, Any] = {
            "script": path,
            "reload_id": result.id,
            "version": result.version,
            "matches": len(result.matches),
            "switched": len(result.switched),
        }
        if result.outcome == "pending":
            return dict(out, outcome="pending")
        current = self.reloader.registry.get(path)
        if result.outcome == "reloaded" or (current is not None and current.hash == result.hash):
            # Taken (matches that refused keep their code; new matches start on this one).
            out["outcome"] = "reloaded"
            if result.errors:
                out["errors"] = list(result.errors)
            return out
        return dict(out, outcome="refused", errors=list(result.errors) or [result.outcome])


def _refused(path: str, errors: list[str]) -> dict[str, Any]:
    return {"script": path, "outcome": "refused", "errors": errors}


async def _settled(records: list[ReloadRecord], timeout_s: float) -> None:
    """Wait until every record's matches switched or refused (a tick or two), or timeout_s."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while any(r.outcome == "pending" for r in records):
        if asyncio.get_running_loop().time() > deadline:
            return
        await asyncio.sleep(0.01)
