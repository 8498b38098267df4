"""Reading scripts from the game directory: regular files only, bounded, and never blocking.

Anything can be put in the game directory under a `.lua` name.  A FIFO blocks `open()` until
some process opens it for writing, and a read until it writes; a device or a huge file can take
as long as it likes.  Every script read therefore checks the file's type before and after
opening it, opens with O_NONBLOCK (so a FIFO swapped in between cannot block the open), stops at
a size cap, and runs on a worker thread during reloads, so that the event loop never waits on it.

Symbolic links are followed only to files inside the game directory (`ScriptRegistry.relative_name`
resolves every path, and the resolved name is what gets read, with O_NOFOLLOW): a link pointing
outside it, or to a device, is never read.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

_OPEN_FLAGS = (
    os.O_RDONLY
    | os.O_NONBLOCK
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_NOFOLLOW", 0)
)
_CHUNK = 256 * 1024


class UnreadableScript(Exception):
    """A `.lua` file that is not read as a script; the message says why, after the file name."""


def script_paths(game_dir: Path) -> list[Path]:
    """Every `*.lua` path under `game_dir` that is not a directory, sorted."""
    return sorted(p for p in game_dir.rglob("*.lua") if not p.is_dir())


def read_script(path: Path, max_bytes: int) -> bytes:
    """The content of the regular file at `path`, at most `max_bytes` long.

    Raises UnreadableScript for anything else (FIFO, socket, device, symbolic link, too large),
    and OSError (FileNotFoundError when it is gone) when the file cannot be opened.
    """
    _check(os.stat(path, follow_symlinks=False), max_bytes)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _check(os.fstat(fd), max_bytes)  # what was opened, which may not be what was looked at
        chunks = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > max_bytes:
        raise UnreadableScript(_too_large(size, max_bytes, growing=True))
    return b"".join(chunks)


def _check(st: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableScript(
            f"is {_kind(st.st_mode)}, not a regular file; only regular files are loaded"
        )
    if st.st_size > max_bytes:
        raise UnreadableScript(_too_large(st.st_size, max_bytes))


def _too_large(size: int, max_bytes: int, *, growing: bool = False) -> str:
    what = f"grew past {max_bytes} bytes while being read" if growing else f"is {size} bytes"
    return f"{what}; scripts may be at most {max_bytes} bytes (ASOBI_MAX_SCRIPT_BYTES)"


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a file"
