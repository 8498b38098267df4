"""This node's connection to Redis: its health, key names, and the bus between nodes.

Redis can restart or become unreachable while matches run.  Nothing on the tick path waits for
it, so the cost of an outage is what needs Redis answering `Unavailable` for a while: callers turn
that into an `unavailable` error frame.  `up` is this node's last-known answer, updated by every
call that goes through `call` and by the heartbeat, so a request that arrives during an outage is
refused at once instead of waiting on a timeout.

The bus is Redis pub/sub on two channels per node: one every node listens to, one only this node
does.  Messages are small JSON objects with a `kind`; `request` adds an id and waits for the
`reply` a handler sends back.  Pub/sub is fire-and-forget (a message published while a node is
reconnecting is lost), so nothing here relies on it for data that must survive: it carries
notifications and requests with timeouts, and the state they talk about lives in Redis keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson
import structlog

log = structlog.get_logger("asobi.cluster")

PREFIX = "asobi:"
ALL = PREFIX + "bus:all"
POOL_CONNECTIONS = 100  # connections to Redis per node, the pub/sub one included
T = TypeVar("T")
Handler = Callable[[dict[str, Any]], Awaitable[None] | None]


class Unavailable(Exception):
    """Redis cannot be reached right now; the message says what could not be done."""


def key(*parts: str) -> str:
    """A key under this project's prefix: `key("node", id)` is `asobi:node:<id>`."""
    return PREFIX + ":".join(parts)


def node_channel(node_id: str) -> str:
    return PREFIX + "bus:node:" + node_id


class RedisLink:
    """One Redis client (a connection pool) and one pub/sub connection for this node."""

    def __init__(self, url: str, node_id: str, *, timeout_s: float = 2.0) -> None:
        from redis.asyncio import BlockingConnectionPool, Redis  # the `cluster` extra

        self.url = url
        self.node_id = node_id
        self.timeout_s = timeout_s
        # A blocking pool: a burst of calls (hundreds of players connecting at once) waits for a
        # free connection.  redis-py's default pool raises at its size instead, which `call`
        # would take for Redis being down, and every queued ticket of the node would be dropped.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=POOL_CONNECTIONS,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            health_check_interval=5,
        )
        self.redis: Any = Redis.from_pool(pool)
        self.up = False
        self._handlers: dict[str, Handler] = {}
        # request id -> (the node asked, the future its reply resolves)
        self._pending: dict[str, tuple[str, asyncio.Future[dict[str, Any]]]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- health -----------------------------------------------------------------------------------
    def mark(self, up: bool, error: BaseException | None = None) -> None:
        """Record Redis's health; transitions are logged once each (`redis_down`, `redis_up`)."""
        if up and not self.up:
            log.info("redis_up", node_id=self.node_id)
        elif not up and self.up:
            log.warning("redis_down", node_id=self.node_id, error=str(error)[:200])
        self.up = up

    def require_up(self, doing: str) -> None:
        """Raise `Unavailable` at once while Redis is known to be down."""
        if not self.up:
            raise Unavailable(f"cannot {doing}: the cluster's Redis is unreachable, retry shortly")

    async def call(self, doing: str, operation: Awaitable[T]) -> T:
        """Await a Redis operation; a connection failure marks Redis down and raises
        `Unavailable` naming what could not be done."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            result = await operation
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self.mark(False, exc)
            raise Unavailable(
                f"cannot {doing}: the cluster's Redis is unreachable, retry shortly"
            ) from None
        self.mark(True)
        return result

    async def ping(self) -> bool:
        try:
            await self.call("ping", self.redis.ping())
        except Unavailable:
            return False
        return True

    # -- bus --------------------------------------------------------------------------------------
    def on(self, kind: str, handler: Handler) -> None:
        """Run `handler(message)` for every bus message of this kind (to all, or to this node)."""
        self._handlers[kind] = handler

    async def publish(self, channel: str, kind: str, payload: dict[str, Any]) -> None:
        message = dict(payload, kind=kind, sender=self.node_id)
        await self.call(f"send {kind}", self.redis.publish(channel, orjson.dumps(message)))

    async def broadcast(self, kind: str, payload: dict[str, Any]) -> None:
        """To every node, this one included."""
        await self.publish(ALL, kind, payload)

    async def send(self, node_id: str, kind: str, payload: dict[str, Any]) -> None:
        await self.publish(node_channel(node_id), kind, payload)

    async def request(
        self, node_id: str, kind: str, payload: dict[str, Any], timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Send to one node and wait for its `reply` (raises `Unavailable` on timeout)."""
        request_id = uuid.uuid4().hex
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (node_id, future)
        try:
            await self.send(node_id, kind, dict(payload, request_id=request_id))
            return await asyncio.wait_for(future, timeout_s or self.timeout_s)
        except TimeoutError:
            raise Unavailable(f"node {node_id} did not answer {kind} in time") from None
        finally:
            self._pending.pop(request_id, None)

    def abandon(self, node_id: str) -> None:
        """`node_id` is gone (`NodeDirectory.on_gone`): requests waiting on its reply fail now
        with `Unavailable` instead of at their timeout.  A drain that picked a node which then
        stopped too would otherwise wait out the whole request timeout for it."""
        for asked, future in list(self._pending.values()):
            if asked == node_id and not future.done():
                future.set_exception(Unavailable(f"node {node_id} is gone"))

    async def reply(self, request: dict[str, Any], payload: dict[str, Any]) -> None:
        """Answer a message that `request` sent."""
        sender = request.get("sender")
        request_id = request.get("request_id")
        if isinstance(sender, str) and isinstance(request_id, str):
            await self.send(sender, "reply", dict(payload, request_id=request_id))

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), self.timeout_s * 2)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    async def _listen(self) -> None:
        """Read the bus forever, resubscribing after Redis comes back."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(ALL, node_channel(self.node_id))
                self._subscribed.set()
                self.mark(True)
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        await self._dispatch(message.get("data"))
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                raise
            except Exception as exc:
                self.mark(False, exc)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                await asyncio.sleep(0.5)

    async def _dispatch(self, data: Any) -> None:
        try:
            message = orjson.loads(data)
        except (orjson.JSONDecodeError, TypeError):
            log.warning("bus_message_invalid", node_id=self.node_id)
            return
        if not isinstance(message, dict):
            return
        kind = message.get("kind")
        if kind == "reply":
            pending = self._pending.get(str(message.get("request_id")))
            if pending is not None and not pending[1].done():
                pending[1].set_result(message)
            return
        handler = self._handlers.get(str(kind))
        if handler is None:
            return
        # Each message runs in its own task: a handler may itself send a request, whose reply
        # arrives through this same reader.
        task = asyncio.create_task(self._run(handler, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, handler: Handler, message: dict[str, Any]) -> None:
        try:
            result = handler(message)
            if result is not None:
                await result
        except Unavailable as exc:
            log.warning("bus_handler_unavailable", kind=message.get("kind"), error=str(exc))
        except Exception:
            log.exception("bus_handler_failed", kind=message.get("kind"), node_id=self.node_id)
