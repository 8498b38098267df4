"""`asobi serve` with one test-only way to wedge the event loop, for the watchdog's tests.

The watchdog exists for what escapes every budget, so its tests need a call that escapes on
purpose, and one that stays open whatever the sandbox closes.  Here `game.log("info", "wedge:S")`
sleeps S seconds inside the host function: the budgeted Lua call (say `tick`) is then in flight,
its budget cannot interrupt it (count hooks only fire in Lua code), the GIL is released, and the
main thread cannot run signal handlers -- exactly the state of a Lua C function that never
returns.  `"spin:S"` busy-waits in Python instead, holding the GIL between switch intervals (a
runaway Python-side loop).  Nothing else differs from `python -m asobi serve`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from asobi import cli
from asobi.match_host import MatchHost

_log = MatchHost.log


def _wedging_log(self: MatchHost, level: bytes, message: bytes, meta: Any) -> None:
    if isinstance(message, bytes) and message.startswith(b"wedge:"):
        time.sleep(float(message[6:]))
    elif isinstance(message, bytes) and message.startswith(b"spin:"):
        stop = time.perf_counter() + float(message[5:])
        while time.perf_counter() < stop:
            pass
    _log(self, level, message, meta)


MatchHost.log = _wedging_log  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
