"""The console's live stream of script errors and reloads, fed by the server's own log events.

A structlog processor (installed by `asobi.log.configure`) looks at every log line's event name;
the few that matter to someone editing scripts (`callback_failed`, `reload_failed`,
`reload_rolled_back`, `reloaded`, `match_crashed`, scripts' own warnings and errors) are turned
into small summaries with the script's `file:line` and handed to the subscribed admin
connections.  Using the log events means the console shows exactly what the logs say, with no
second reporting path to keep in step.  Both the recent backlog and each subscriber's rate are
bounded: a script failing every tick of a thousand matches cannot flood a console.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from typing import Any

from asobi.limits import TokenBucket

FORWARDED = frozenset(
    {
        "callback_failed",
        "reload_failed",
        "reload_rolled_back",
        "reloaded",
        "match_crashed",
        "script_log",
    }
)
RECENT_SIZE = 100
TEXT_LIMIT = 2000
WHERE_RE = re.compile(r"([\w./-]+\.lua):(\d+):")

Subscriber = Callable[[dict[str, Any]], None]

_subscribers: set[Subscriber] = set()
_recent: deque[dict[str, Any]] = deque(maxlen=RECENT_SIZE)


def forward(_logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: pass the line on unchanged, copying the watched ones to the feed."""
    event = event_dict.get("event")
    if event in FORWARDED and (event != "script_log" or method in ("warning", "error")):
        summary = summarize(event, method, event_dict)
        _recent.append(summary)
        for subscriber in tuple(_subscribers):
            try:
                subscriber(summary)
            except Exception:  # a console must never break the code that logged
                _subscribers.discard(subscriber)
    return event_dict


def summarize(event: str, level: str, fields: MutableMapping[str, Any]) -> dict[str, Any]:
    """The fields a console shows for one event, with `where` = the first `file.lua:line`."""
    errors = fields.get("errors")
    if event == "script_log":
        message = fields.get("message")
    elif fields.get("error") is not None:
        message = fields.get("error")
    elif errors:
        message = "\n".join(str(e) for e in errors)
    else:
        message = ""
    text = str(message)[:TEXT_LIMIT]
    found = WHERE_RE.search(text) or WHERE_RE.search(str(fields.get("traceback") or ""))
    out: dict[str, Any] = {"event": event, "level": level, "ts": time.time(), "message": text}
    if found:
        out["where"] = f"{found.group(1)}:{found.group(2)}"
    for key in ("match_id", "mode", "script", "callback", "tick", "version", "id"):
        value = fields.get(key)
        if value is not None:
            out[key] = value
    return out


def recent() -> list[dict[str, Any]]:
    return list(_recent)


class FeedSubscription:
    """One admin connection's share of the feed, at most `rate` events per second (excess
    events are counted and the count is sent with the next one that gets through)."""

    def __init__(self, send: Subscriber, rate: float = 20.0, burst: float = 50.0) -> None:
        self._send = send
        self._bucket = TokenBucket(rate, burst, time.monotonic())
        self.dropped = 0
        _subscribers.add(self)

    def __call__(self, summary: dict[str, Any]) -> None:
        if not self._bucket.take(time.monotonic()):
            self.dropped += 1
            return
        if self.dropped:
            summary = {**summary, "dropped_before": self.dropped}
            self.dropped = 0
        self._send(summary)

    def close(self) -> None:
        _subscribers.discard(self)
