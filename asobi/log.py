"""Structured JSON logs: one line per event on stdout, rendered by structlog with orjson."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, TextIO, cast

import orjson
import structlog

from asobi import admin_feed

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _dumps(obj: object, default: Callable[[Any], Any] | None = None) -> bytes:
    return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS)


def configure(level: str = "info", stream: TextIO | None = None, fmt: str = "json") -> None:
    """JSON lines with `event`, `level` and an ISO timestamp, fast path (bytes, cached).

    `fmt` "console" renders the same events as coloured, aligned text for a person watching a
    terminal; "auto" picks console when the stream is a terminal and JSON otherwise (pipes, log
    collectors, containers).
    """
    out = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if _is_terminal(out) else "json"
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        admin_feed.forward,  # script errors and reloads to the console's live stream
    ]
    if fmt == "console":
        structlog.configure(
            processors=[
                *shared,
                structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
                structlog.dev.ConsoleRenderer(colors=True),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
            logger_factory=structlog.PrintLoggerFactory(file=out),
            cache_logger_on_first_use=True,
        )
        return
    # A text stream's byte buffer; a stream without one takes bytes itself (the tests' capture).
    binary = out.buffer if hasattr(out, "buffer") else cast(BinaryIO, out)
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.BytesLoggerFactory(file=binary),
        cache_logger_on_first_use=True,
    )


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (OSError, ValueError):
        return False
