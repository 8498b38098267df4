"""Transparent huge pages for the server's heaps (Linux with glibc): `asobi serve` starts again
with glibc's `glibc.malloc.hugetlb=1` tunable when it was started without it.

Every match is a Lua state with a heap of its own, and a pass over hundreds of matches touches a
few tens of KiB in each of hundreds of heaps spread over the process's memory: much of a
match-tick's cost at scale is cache and TLB misses, not work.  With the tunable, malloc asks the
kernel (`madvise(MADV_HUGEPAGE)`) to back the memory it gets with 2 MiB pages, so one TLB entry
covers what took 512.  Measured side by side (`python -m bench.side_by_side`, both slot orders):
1.5-3.6% less server CPU per delivered frame on the bench games, nearly every window lower; the
same memory per match (`python -m bench.match_memory`).

glibc reads its tunables once, when a process starts, so the only way to turn this on from inside
is to execute the same command again with the tunable in the environment (`os.execve` keeps the
process id, its open files and its terminal).  That happens before the server opens anything.
It is skipped where it cannot help: not Linux, not glibc 2.35 or later (where the tunable
appeared), or the kernel's transparent huge pages set to `never`; and when the environment
already names the tunable (a deployment's own choice, or the started-again process itself).
`ASOBI_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb"
ENV = "GLIBC_TUNABLES"
# Set in the started-again process: it never starts again, whatever glibc did to GLIBC_TUNABLES.
STARTED_AGAIN = "ASOBI_HUGE_PAGES_STARTED"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, _, version = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (ValueError, OSError, AttributeError):
        return None


def kernel_offers_huge_pages(setting: Path = THP_SETTING) -> bool:
    """The kernel backs memory with huge pages when asked (`[always]` or `[madvise]`)."""
    try:
        text = setting.read_text()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def environment_to_start_again(
    environ: Mapping[str, str],
    *,
    platform: str = sys.platform,
    glibc: tuple[int, int] | None = None,
    offered: bool | None = None,
) -> dict[str, str] | None:
    """The environment to start again with, or None when the process should go on as it is."""
    if platform != "linux" or STARTED_AGAIN in environ or _setting(environ) is not None:
        return None
    version = glibc if glibc is not None else glibc_version()
    if version is None or version < (2, 35):
        return None
    if not (offered if offered is not None else kernel_offers_huge_pages()):
        return None
    env = dict(environ)
    current = environ.get(ENV, "")
    env[ENV] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    env[STARTED_AGAIN] = "1"
    return env


def _setting(environ: Mapping[str, str]) -> str | None:
    """The value GLIBC_TUNABLES gives the tunable (`name=value` items joined by ':'), if any."""
    for item in environ.get(ENV, "").split(":"):
        name, _, value = item.partition("=")
        if name == TUNABLE:
            return value
    return None


def in_use(environ: Mapping[str, str] = os.environ) -> bool:
    """This process was started with malloc on huge pages (the tunable set to 1 or 2), as far
    as its environment says: logged with `server_started` so an operator can tell."""
    return _setting(environ) in ("1", "2")


def start_again_with_huge_pages() -> None:
    """Execute this process's own command again with the tunable set (see the module
    docstring); returns only when that is not needed or not possible."""
    env = environment_to_start_again(os.environ)
    if env is None or not sys.executable or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # run on without huge pages rather than not at all
