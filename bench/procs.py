"""Server processes under test: start pinned to one core, read CPU and RSS from /proc.

CPU comes from utime+stime in /proc/<pid>/stat (all threads of the process), RSS from
/proc/<pid>/statm; both are sampled around a measurement window and reported as deltas.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cores() -> tuple[set[int] | None, set[int] | None]:
    """(server core, load generator core); None when there are not two cores to split."""
    available = sorted(os.sched_getaffinity(0))
    if len(available) < 2:
        return None, None
    return {available[0]}, {available[1]}


def cpu_seconds(pid: int) -> float:
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def core_busy_seconds(core: int) -> float:
    """Busy time of one CPU (all processes) from /proc/stat, to see foreign load on it."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / CLK_TCK
    return 0.0


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


@dataclass
class ServerProcess:
    """A server subprocess; its log goes to a file so a full pipe can never stall it."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    stats_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self, grace: float = 1.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds: a bench has no use for a slow drain."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(
    argv: list[str],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    core: set[int] | None = None,
    port_of: Callable[[str], int | None],
    timeout: float = 20.0,
) -> ServerProcess:
    """Start `argv` pinned to `core` (set before exec, so every thread inherits it) and wait
    until its log shows the listening port."""
    log = open(log_path, "wb")  # noqa: SIM115 - owned by the ServerProcess

    def pin() -> None:
        if core:
            os.sched_setaffinity(0, core)

    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        preexec_fn=pin,
    )
    server = ServerProcess(proc, log_path, _log=log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited ({proc.returncode}):\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            port = port_of(log_path.read_text(errors="replace"))
            if port:
                server.port = port
                return server
        time.sleep(0.02)
    server.stop()
    raise RuntimeError(f"{argv[0]} did not start within {timeout}s:\n{server.log_tail()}")


def spawn_asobi(
    game_dir: Path,
    data_dir: Path,
    secret: str,
    *,
    reload: str,
    core: set[int] | None,
    log_path: Path,
    env: dict[str, str] | None = None,
    source: Path | None = None,
    python: str | None = None,
) -> ServerProcess:
    """`asobi serve` for the bench; `env` adds settings (a cluster node's, for instance).
    `source`: run the `asobi` package of that checkout instead of the installed one (another
    commit, for a side-by-side run); `python`: another interpreter than this one."""
    stats = data_dir / "bench-stats.json"
    if source is not None:
        env = {**(env or {}), "PYTHONPATH": str(source)}
    server = spawn(
        [
            python or sys.executable,
            "-m",
            "asobi",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--game-dir",
            str(game_dir),
            "--data-dir",
            str(data_dir),
            "--reload",
            reload,
        ],
        log_path=log_path,
        env={
            "ASOBI_SECRET": secret,
            "ASOBI_BENCH_STATS": str(stats),
            "ASOBI_LOG_LEVEL": "info",
            # Every bench client connects from 127.0.0.1: lift the per-IP handshake limits.
            "ASOBI_CONNECT_RATE_PER_IP": "100000",
            "ASOBI_CONNECT_BURST_PER_IP": "100000",
            "ASOBI_MAX_CONNECTIONS": "100000",
            **(env or {}),
        },
        core=core,
        port_of=_asobi_port,
        cwd=source,
    )
    server.stats_path = stats
    return server


def _asobi_port(text: str) -> int | None:
    for line in text.splitlines():
        if '"server_started"' in line:
            found = re.search(r'"port":(\d+)', line)
            return int(found.group(1)) if found else None
    return None


async def read_stats(
    server: ServerProcess, sig: int, sleep: Callable[[float], object], timeout: float = 5.0
) -> dict:
    """Signal the server to write its stats file and read the fresh snapshot."""
    import orjson

    assert server.stats_path is not None
    path = server.stats_path
    before = path.read_bytes() if path.exists() else b""
    os.kill(server.pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        await sleep(0.01)  # type: ignore[misc]
        with contextlib.suppress(OSError, ValueError):
            raw = path.read_bytes()
            if raw != before:
                return orjson.loads(raw)
    raise RuntimeError("the server did not write its stats file (is it overloaded or gone?)")


def build_extensions(checkout: Path, python: str | None = None) -> None:
    """Put `checkout`'s compiled extensions (asobi/lua/_native.c, if it has any) beside its
    sources, as an editable install does for this checkout: a fresh worktree has none, and its
    server would silently run without them; neither has a checkout served by another Python
    release (`python`: extensions are built per release).  Built as pip builds them, from a
    wheel.  Each file is written beside its target and renamed over it: a library already
    loaded (by this process, say) keeps its old file, where writing into it would crash it."""
    pip = [python or sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    with tempfile.TemporaryDirectory(prefix="asobi-wheel-") as out:
        subprocess.run([*pip, "-w", out, str(checkout)], check=True, capture_output=True)
        for wheel in Path(out).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for name in archive.namelist():
                    if name.startswith("asobi/") and name.endswith((".so", ".pyd")):
                        target = checkout / name
                        fresh = target.with_name(f".{target.name}.{os.getpid()}")
                        fresh.write_bytes(archive.read(name))
                        os.replace(fresh, target)


def interpreter(python: str | None = None) -> str:
    """`python`'s version and build as the report names it ("3.11.2 (/usr/bin/python3.11)"):
    the server's interpreter moves its CPU per frame by several percent (a PGO build against
    one without), so a run says which it measured."""
    if python is None:
        return f"{platform.python_version()} ({sys.executable})"
    version = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{version} ({python})"
