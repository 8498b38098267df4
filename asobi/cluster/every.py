"""A step that runs now and then every so often, in a task of its own, until stopped.

Heartbeats and the match listing both write to Redis on a fixed period.  A step that fails
because Redis is unreachable is simply retried next period (the link logs the outage once); any
other failure is logged under the step's own event name and retried the same way, so a bug in
one period never ends the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from asobi.cluster.link import Unavailable

log = structlog.get_logger("asobi.cluster")


class Every:
    def __init__(
        self, interval_s: float, step: Callable[[], Awaitable[None]], failed: str, node_id: str
    ) -> None:
        self.interval_s = interval_s
        self.step = step
        self.failed = failed
        self.node_id = node_id
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Run the step once (Redis being down is no reason not to start), then periodically."""
        with contextlib.suppress(Unavailable):
            await self.step()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except Unavailable:
                pass  # logged once by the link; the next period retries
            except Exception:
                log.exception(self.failed, node_id=self.node_id)
