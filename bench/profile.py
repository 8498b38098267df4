"""Sample the server with py-spy while it carries load, and rank where its CPU time goes.

py-spy (from PyPI) attaches to the running process from outside; time spent inside Lua or other
C code is charged to the Python frame that called it.  Idle samples (the loop waiting in epoll)
are left out, so shares are of the server's busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def _name(frame: str) -> str:
    found = _FRAME.match(frame.strip())
    if not found:
        return frame.strip()
    path = found["file"]
    for marker in ("site-packages/", "/asobi/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/asobi/":
                path = "asobi/" + path
            break
    return f"{found['func']} ({path})"


def record(pid: int, seconds: float, out: Path) -> dict[str, Any]:
    exe = py_spy()
    if exe is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = out.with_suffix(".txt")
    done = subprocess.run(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(raw),
            "--nonblocking",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not raw.exists():
        return {"error": f"py-spy failed ({done.returncode}): {done.stderr.strip()[-400:]}"}
    return summarize(raw.read_text())


# Entry frames every sample passes through: they say nothing about where the time goes.
_ROOT_FILES = (
    "<frozen runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asobi/cli.py",
    "asobi/__main__.py",
    "asyncio/events.py",
)
_ROOT_SUFFIXES = tuple(f + ")" for f in _ROOT_FILES)


def summarize(text: str, top: int = 15) -> dict[str, Any]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        own[frames[-1]] += n
        for name in set(frames):
            if not name.endswith(_ROOT_SUFFIXES):
                inclusive[name] += n
    if not total:
        return {"error": "no samples"}
    return {
        "samples": total,
        "self": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)],
        "inclusive": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common(top)],
    }
