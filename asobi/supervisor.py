"""`asobi serve --workers N`: N node processes behind one published port, under one supervisor.

One Python process runs on one core; a machine's other cores need other processes, and those
processes must form a cluster (shared matchmaker, shared data), which is what `ASOBI_REDIS_URL`
and PostgreSQL give them.  The supervisor:

- binds the published port itself and hands every accepted connection to a worker
  (`asobi.handoff`): to the worker named by `?node=<id>` in the request line (the URL a redirect
  sends a client to), else to the next ready worker in turn;
- starts the workers (`python -m asobi serve` with `ASOBI_REDIS_URL`, `ASOBI_NODE_ID`,
  `ASOBI_PUBLIC_URL` set for each), restarts one that dies (backing off when it keeps dying), and
  on SIGTERM/SIGINT stops them gracefully and waits for them;
- without `ASOBI_REDIS_URL`, runs a private `redis-server` on a Unix socket in the data dir for
  as long as it runs itself.

A restarted worker is a new node (a new id): its matches died with the old process, and the
cluster must see the old node go rather than a node that silently lost everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog

from asobi import handoff
from asobi.config import Settings

log = structlog.get_logger("asobi.supervisor")

REDIS_BINARY = "redis-server"
REDIS_SOCKET = "redis.sock"
# Longest Unix socket path Linux takes (sun_path is 108 bytes with its terminating zero).
MAX_SOCKET_PATH = 107
REDIS_START_S = 10.0
# Time for every worker to open its store, load its scripts and report ready.
START_TIMEOUT_S = 60.0
# A worker that dies sooner than this after starting counts as dying repeatedly.
HEALTHY_AFTER_S = 10.0
BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 30.0
# After the workers' own shutdown budget (connections, then the store), how long to wait more.
STOP_MARGIN_S = 5.0
ACCEPT_BACKLOG = 1024
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class CannotStart(Exception):
    """One line for the user: why the workers cannot run here."""


def preflight(settings: Settings, workers: int) -> None:
    """Refuse at once what no worker could run with (raises CannotStart)."""
    if workers < 1:
        raise CannotStart("--workers must be 1 or more")
    if not settings.database_url.startswith(("postgresql://", "postgres://")):
        raise CannotStart(
            f"--workers {workers} runs a cluster, which needs PostgreSQL: set "
            "ASOBI_DATABASE_URL=postgresql://USER:PASS@HOST/DB (SQLite stays in one process)"
        )
    if not settings.redis_url and shutil.which(REDIS_BINARY) is None:
        raise CannotStart(
            f"--workers {workers} needs Redis: set ASOBI_REDIS_URL=redis://HOST:6379/0, "
            "or install redis-server (apt install redis-server) to run a private one"
        )


def main(settings: Settings, workers: int) -> int:
    """Run the supervisor until SIGTERM/SIGINT; the exit status of `asobi serve --workers N`."""
    from asobi.auth import load_or_create_secret
    from asobi.cli import _why

    try:
        preflight(settings, workers)
    except CannotStart as exc:
        print(f"asobi serve: {exc}", file=sys.stderr)
        return 2
    try:
        listener = _listen(settings.host, settings.port)
    except OSError as exc:
        print(
            f"asobi serve: cannot listen on {settings.host}:{settings.port}: {_why(exc)}",
            file=sys.stderr,
        )
        return 1
    # Every worker must sign and verify tokens alike: make the stored secret before any starts.
    load_or_create_secret(settings.data_dir, settings.secret)
    try:
        return asyncio.run(Supervisor(settings, workers, listener).run())
    except CannotStart as exc:
        print(f"asobi serve: {exc}", file=sys.stderr)
        return 1
    finally:
        listener.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.create_server((host, port), family=family, backlog=ACCEPT_BACKLOG)
    listener.setblocking(False)
    return listener


def node_url(base: str, node_id: str) -> str:
    """`base` (a ws:// URL) with `node=<node_id>` added to its query: the worker's own URL."""
    parts = urlsplit(base)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != handoff.NODE_PARAM]
    query.append((handoff.NODE_PARAM, node_id))
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- the private redis-server ----------------------------------------------------------------------
class PrivateRedis:
    """A `redis-server` on a Unix socket, nothing on disk, alive as long as the supervisor."""

    def __init__(self, data_dir: Path) -> None:
        path = data_dir.resolve() / REDIS_SOCKET
        if len(str(path).encode()) > MAX_SOCKET_PATH:
            path = Path(tempfile.mkdtemp(prefix="asobi-redis-")) / REDIS_SOCKET
        self.path = path
        self.url = f"unix://{path}"
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        if await _redis_answers(self.path):
            raise CannotStart(
                f"a Redis server already answers on {self.path}: is another "
                "`asobi serve --workers` running on this data dir?"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._process = await asyncio.create_subprocess_exec(
            *(REDIS_BINARY, "--port", "0", "--unixsocket", str(self.path)),
            *("--unixsocketperm", "700", "--save", "", "--appendonly", "no"),
            *("--dir", str(self.path.parent), "--loglevel", "warning"),
            stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor, which decides
            preexec_fn=_stop_with_parent,
        )
        deadline = time.monotonic() + REDIS_START_S
        while not await _redis_answers(self.path):
            if self._process.returncode is not None:
                raise CannotStart(f"redis-server exited with status {self._process.returncode}")
            if time.monotonic() > deadline:
                await self.stop()
                raise CannotStart(f"redis-server did not answer on {self.path}")
            await asyncio.sleep(0.05)
        log.info("private_redis_started", url=self.url, pid=self._process.pid)

    async def stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_MARGIN_S)
        except TimeoutError:
            process.kill()
            await process.wait()
        log.info("private_redis_stopped", status=process.returncode)


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies, even of SIGKILL (Linux),
    so that a private Redis never outlives it and blocks the next start on its socket."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


async def _redis_answers(path: Path) -> bool:
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()


# -- the workers -----------------------------------------------------------------------------------
@dataclass(slots=True)
class Worker:
    """One slot: the process currently filling it and its handoff channel."""

    index: int
    incarnation: int = 0
    node_id: str = ""
    process: asyncio.subprocess.Process | None = None
    channel: socket.socket | None = None
    ready: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0
    restarts: int = 0
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)


class Supervisor:
    def __init__(self, settings: Settings, count: int, listener: socket.socket) -> None:
        self.settings = settings
        self.listener = listener
        self.port: int = listener.getsockname()[1]
        self.workers = [Worker(index=i + 1) for i in range(count)]
        self.base_id = settings.node_id or socket.gethostname()
        host = settings.host
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        self.public_base = settings.public_url or f"ws://{shown}:{self.port}/ws"
        self.redis_url = settings.redis_url
        self._redis: PrivateRedis | None = None
        self._stop = asyncio.Event()
        # Why the start failed: printed as stderr's last line once every worker has stopped (a
        # worker still stopping would otherwise print its own error after it).
        self._failed: str | None = None
        self._started = False
        self._next = 0
        self._routing: set[asyncio.Task[None]] = set()
        self.handed_off = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            if not self.redis_url:
                self._redis = PrivateRedis(self.settings.data_dir)
                await self._redis.start()
                self.redis_url = self._redis.url
            for worker in self.workers:
                await self._spawn(worker)
            if not await self._wait_ready():
                return 0 if self._failed is None and self._stop.is_set() else 1
            self._started = True
            self._announce()
            accepting = asyncio.create_task(self._accept())
            await self._stop.wait()
            accepting.cancel()
            return 0
        finally:
            await self._shutdown()
            if self._failed is not None:
                print(f"asobi serve: {self._failed}", file=sys.stderr, flush=True)

    def _announce(self) -> None:
        host = self.settings.host
        shown = "localhost" if host in ("0.0.0.0", "::", "") else host
        print(
            f"listening on ws://{shown}:{self.port}/ws "
            f"(game: {self.settings.game_dir}, {len(self.workers)} workers, "
            f"redis: {'private' if self._redis else self.redis_url})",
            file=sys.stderr,
            flush=True,
        )
        log.info(
            "supervisor_started",
            port=self.port,
            workers=[w.node_id for w in self.workers],
            pids=[w.process.pid for w in self.workers if w.process],
            redis=self.redis_url,
            cpu_s=round(time.process_time(), 3),
        )

    async def _wait_ready(self) -> bool:
        """True once every worker reported ready; False if one died first or a stop came."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(w.ready for w in self.workers):
            if self._failed is not None or self._stop.is_set():
                return False
            if time.monotonic() > deadline:
                self._failed = f"the workers were not ready after {START_TIMEOUT_S:.0f} s"
                return False
            await asyncio.sleep(0.05)
        return True

    def _worker_env(self, worker: Worker, channel_fd: int) -> dict[str, str]:
        s = self.settings
        env = dict(os.environ)
        env.update(
            ASOBI_REDIS_URL=self.redis_url,
            ASOBI_NODE_ID=worker.node_id,
            ASOBI_PUBLIC_URL=node_url(self.public_base, worker.node_id),
            # Each worker also listens on its own loopback port (for a look at one worker alone);
            # clients come through the supervisor's port.
            ASOBI_HOST="127.0.0.1",
            ASOBI_PORT="0",
            ASOBI_GAME_DIR=str(s.game_dir),
            ASOBI_DATA_DIR=str(s.data_dir),
            ASOBI_RELOAD=s.reload,
        )
        env[handoff.ENV] = str(channel_fd)
        return env

    async def _spawn(self, worker: Worker) -> None:
        worker.incarnation += 1
        suffix = f"-{worker.incarnation}" if worker.incarnation > 1 else ""
        worker.node_id = f"{self.base_id}-w{worker.index}{suffix}"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "asobi", "serve"),
                env=self._worker_env(worker, theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # signals come from the supervisor only
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        worker.channel = ours
        worker.ready = False
        worker.started_at = time.monotonic()
        asyncio.get_running_loop().add_reader(ours.fileno(), self._on_channel, worker, ours)
        worker.watcher = asyncio.create_task(self._watch(worker, worker.process))
        log.info(
            "worker_started",
            node_id=worker.node_id,
            public_url=node_url(self.public_base, worker.node_id),
            worker=worker.index,
            pid=worker.process.pid,
        )

    def _on_channel(self, worker: Worker, channel: socket.socket) -> None:
        try:
            data = channel.recv(16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data == handoff.READY and worker.channel is channel:
            worker.ready = True
            log.info("worker_ready", node_id=worker.node_id, worker=worker.index)
        elif not data:
            asyncio.get_running_loop().remove_reader(channel.fileno())
            if worker.channel is channel:
                worker.ready = False

    def _forget_channel(self, worker: Worker) -> None:
        channel, worker.channel, worker.ready = worker.channel, None, False
        if channel is not None and channel.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(channel.fileno())
            channel.close()

    async def _watch(self, worker: Worker, process: asyncio.subprocess.Process) -> None:
        status = await process.wait()
        self._forget_channel(worker)
        ran_s = time.monotonic() - worker.started_at
        report = log.info if self._stop.is_set() else log.warning
        report(
            "worker_exited",
            node_id=worker.node_id,
            worker=worker.index,
            pid=process.pid,
            status=status,
            signal=signal.Signals(-status).name if status < 0 else None,
            ran_s=round(ran_s, 3),
        )
        if self._stop.is_set():
            return
        if not self._started:
            self._failed = (
                f"worker {worker.index} exited with status {status} before it was ready "
                "(its error is above)"
            )
            return
        worker.quick_deaths = worker.quick_deaths + 1 if ran_s < HEALTHY_AFTER_S else 0
        delay = _backoff(worker.quick_deaths)
        if delay:
            log.warning(
                "worker_backoff",
                worker=worker.index,
                delay_s=delay,
                quick_deaths=worker.quick_deaths,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
        previous = worker.node_id
        await self._spawn(worker)
        worker.restarts += 1
        log.warning(
            "worker_restarted",
            node_id=worker.node_id,
            previous=previous,
            worker=worker.index,
            pid=worker.process.pid if worker.process else None,
            restarts=worker.restarts,
        )

    # -- connections ------------------------------------------------------------------------------
    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self.listener)
            except OSError as exc:  # out of descriptors, for one: let some close
                log.warning("accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._route(conn))
            self._routing.add(task)
            task.add_done_callback(self._routing.discard)

    async def _route(self, conn: socket.socket) -> None:
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                node = await _peek_node(conn)
                worker = await self._pick(node)
            assert worker.channel is not None
            handoff.send_socket(worker.channel, conn)
            self.handed_off += 1
        except (OSError, TimeoutError, ConnectionError) as exc:
            log.debug("handoff_failed", error=str(exc) or type(exc).__name__)
        finally:
            conn.close()  # the worker holds its own descriptor now

    async def _pick(self, node: str | None) -> Worker:
        """The named worker if it is ready, else the next ready one (waits while none is)."""
        while True:
            ready = [w for w in self.workers if w.ready and w.channel is not None]
            if ready:
                break
            await asyncio.sleep(0.05)
        if node is not None:
            for worker in ready:
                if worker.node_id == node:
                    return worker
        self._next = (self._next + 1) % len(ready)
        return ready[self._next]

    async def _shutdown(self) -> None:
        self._stop.set()
        self.listener.close()  # new clients are refused from now on, not left in the backlog
        for task in list(self._routing):
            task.cancel()
        running = [w for w in self.workers if w.process and w.process.returncode is None]
        for worker in running:
            assert worker.process is not None
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        wait_s = self.settings.shutdown_timeout_s + self.settings.stop_stuck_s + STOP_MARGIN_S
        for worker in running:
            assert worker.process is not None
            try:
                await asyncio.wait_for(worker.process.wait(), wait_s)
            except TimeoutError:
                log.error("worker_killed", node_id=worker.node_id, waited_s=wait_s)
                worker.process.kill()
                await worker.process.wait()
        watchers = [w.watcher for w in self.workers if w.watcher is not None]
        await asyncio.gather(*watchers, return_exceptions=True)
        if self._redis is not None:
            await self._redis.stop()
        log.info(
            "supervisor_stopped", handed_off=self.handed_off, cpu_s=round(time.process_time(), 3)
        )


def _backoff(quick_deaths: int) -> float:
    """No wait after one early death; then 0.5 s, 1 s, 2 s... up to BACKOFF_MAX_S."""
    if quick_deaths <= 1:
        return 0.0
    return float(min(BACKOFF_FIRST_S * 2 ** (quick_deaths - 2), BACKOFF_MAX_S))


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _peek_node(conn: socket.socket) -> str | None:
    """The node a new connection asks for, read without consuming a byte of its request."""
    loop = asyncio.get_running_loop()
    while True:
        readable = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, readable)
        try:
            await readable
        finally:
            loop.remove_reader(conn.fileno())
        peeked = conn.recv(handoff.PEEK_BYTES, socket.MSG_PEEK)
        if not peeked:
            raise ConnectionError("closed before its request")
        try:
            return handoff.requested_node(peeked)
        except handoff.Incomplete:
            await asyncio.sleep(0.005)  # the rest of the line is on its way (readable stays set)
