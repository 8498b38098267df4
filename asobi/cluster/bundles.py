"""Pushed scripts: a game dir's scripts as one content-addressed bundle, kept in Redis.

A bundle is a set of (path, bytes) pairs.  Its address is the SHA-256 of those pairs in path
order, so the same scripts pushed twice (from any machine) are one bundle, stored once.  Redis
holds each bundle as a hash (`asobi:bundle:<address>`: path -> bytes) and a pointer to the
cluster's current one (`asobi:bundle:current`: its address and the reload record that pushed
it), which a node starting later reads to run what was pushed rather than its own older files.

A bundle overlays a node's game dir: the scripts it names replace the node's, the node's other
scripts stay.  It is bounded like the scripts themselves (`ASOBI_MAX_SCRIPT_BYTES` for the whole
bundle) and its paths are plain relative script names, checked on the way in and again on each
node against its own game dir.
"""

from __future__ import annotations

import base64
import binascii
import graphlib
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asobi import names
from asobi.cluster.link import RedisLink, key
from asobi.script_files import UnreadableScript, read_script, script_paths
from asobi.scripts import is_script_path, literal_requires

MAX_BUNDLE_FILES = 1000
# Script paths a bundle may carry: relative, `/`-separated, no dot-directories, `.lua`.
SCRIPT_PATH = names.NameRule(r"([A-Za-z0-9_-]+/){0,16}[A-Za-z0-9_-]+\.lua")
MAX_PATH_CHARS = 256
CURRENT = key("bundle", "current")
# A bundle no longer current is dropped this long after it was replaced.
RETIRED_TTL_S = 7 * 24 * 3600

# Move the pointer only forward: of two pushes racing, the later record wins everywhere.
_SET_CURRENT = """
local held = redis.call('HGET', KEYS[1], 'record')
if held and tonumber(held) >= tonumber(ARGV[1]) then return nil end
local previous = redis.call('HGET', KEYS[1], 'bundle')
redis.call('HSET', KEYS[1], 'record', ARGV[1], 'bundle', ARGV[2])
return previous or ''
"""


class BadBundle(Exception):
    """A bundle (or its manifest) that is refused; the message says why."""


def bundle_hash(files: Mapping[str, bytes]) -> str:
    """The content address: SHA-256 over the (path, bytes) pairs in path order, each part
    length-prefixed so that no two different bundles share a byte stream."""
    digest = hashlib.sha256()
    for path in sorted(files):
        encoded = path.encode()
        digest.update(b"%d:%s%d:" % (len(encoded), encoded, len(files[path])))
        digest.update(files[path])
    return digest.hexdigest()


def check_path(path: Any) -> str:
    """`path` if a bundle may carry it; raises BadBundle naming the problem."""
    if not SCRIPT_PATH.accepts(path) or len(path) > MAX_PATH_CHARS:
        raise BadBundle(
            f"not a script path: {str(path)[:80]!r} (relative, letters, digits, _ and -, "
            f"/ between folders, ending in .lua, at most {MAX_PATH_CHARS} characters)"
        )
    return path


def check_sizes(sizes: Mapping[str, int], max_bytes: int) -> None:
    """Refuse a bundle over its bounds before any of its bytes are taken in."""
    if not sizes:
        raise BadBundle("the bundle holds no scripts")
    if len(sizes) > MAX_BUNDLE_FILES:
        raise BadBundle(f"a bundle holds at most {MAX_BUNDLE_FILES} scripts, not {len(sizes)}")
    for path, size in sizes.items():
        check_path(path)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BadBundle(f"{path}: size must be a byte count")
    total = sum(sizes.values())
    if total > max_bytes:
        raise BadBundle(
            f"the bundle is {total} bytes; a push carries at most {max_bytes} bytes of scripts "
            "(ASOBI_MAX_SCRIPT_BYTES)"
        )


@dataclass(frozen=True, slots=True)
class Bundle:
    files: dict[str, bytes]
    hash: str

    @classmethod
    def of(cls, files: Mapping[str, bytes], max_bytes: int) -> Bundle:
        check_sizes({p: len(b) for p, b in files.items()}, max_bytes)
        ordered = {p: files[p] for p in sorted(files)}
        return cls(ordered, bundle_hash(ordered))

    @property
    def size(self) -> int:
        return sum(len(b) for b in self.files.values())

    def apply_order(self) -> list[str]:
        """Paths with the modules a script `require`s (literally) before it, so that vetting a
        script finds the bundle's version of its modules already in force; otherwise path order
        (also for a cycle)."""
        graph: dict[str, list[str]] = {}
        for path, source in self.files.items():
            wanted = {module.replace(".", "/") + ".lua" for _, module in literal_requires(source)}
            graph[path] = sorted(wanted & self.files.keys() - {path})
        try:
            sorter = graphlib.TopologicalSorter(graph)
            sorter.prepare()
            order: list[str] = []
            while sorter.is_active():
                ready = sorted(sorter.get_ready())
                order.extend(ready)
                sorter.done(*ready)
            return order
        except graphlib.CycleError:
            return list(self.files)


def read_game_dir(game_dir: Path, max_script_bytes: int) -> dict[str, bytes]:
    """The scripts under `game_dir` as a bundle carries them (`asobi push`), read the way the
    server reads them (regular files only, bounded).  Raises BadBundle naming a file that cannot
    go: a name outside the bundle's path rule or an unreadable file."""
    root = game_dir.resolve()
    files: dict[str, bytes] = {}
    for path in script_paths(root):
        rel = path.relative_to(root)
        if not is_script_path(rel):
            continue  # editor droppings and hidden folders, which the server skips too
        name = check_path(rel.as_posix())
        try:
            files[name] = read_script(path, max_script_bytes)
        except (UnreadableScript, OSError) as exc:
            raise BadBundle(f"{name}: {exc}") from None
    return files


class BundleUpload:
    """A bundle arriving in pieces (an admin connection's frames are capped well below a
    bundle's bound): the manifest first, so the size is known and bounded before any byte
    comes in, then base64 chunks in order."""

    def __init__(self, manifest: Any, claimed_hash: Any, max_bytes: int) -> None:
        if not isinstance(manifest, list) or not all(isinstance(f, dict) for f in manifest):
            raise BadBundle("files must be a list of {path, size}")
        sizes: dict[str, Any] = {}  # sizes as sent; check_sizes checks them
        for entry in manifest:
            path = check_path(entry.get("path"))
            if path in sizes:
                raise BadBundle(f"{path} is listed twice")
            sizes[path] = entry.get("size")
        check_sizes(sizes, max_bytes)
        if not isinstance(claimed_hash, str) or len(claimed_hash) != 64:
            raise BadBundle("hash must be the bundle's SHA-256 address (64 hex digits)")
        self.sizes: dict[str, int] = {path: int(size) for path, size in sizes.items()}
        self.claimed_hash = claimed_hash
        self.max_bytes = max_bytes
        self.total = sum(self.sizes.values())
        self._data = bytearray()

    @property
    def received(self) -> int:
        return len(self._data)

    @property
    def complete(self) -> bool:
        return len(self._data) == self.total

    def add(self, offset: Any, data: Any) -> None:
        """Append one chunk; a repeated chunk (a retry) is ignored, a gap or excess refused."""
        if isinstance(offset, bool) or not isinstance(offset, int) or not isinstance(data, str):
            raise BadBundle("a chunk is {offset, data} with data in base64")
        try:
            chunk = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadBundle("chunk data is not base64") from None
        if offset + len(chunk) <= len(self._data):
            return
        if offset != len(self._data):
            raise BadBundle(f"chunk at offset {offset}, expected {len(self._data)}")
        if len(self._data) + len(chunk) > self.total:
            raise BadBundle(f"more bytes than the {self.total} announced")
        self._data += chunk

    def bundle(self) -> Bundle:
        """The assembled bundle, checked against the address the sender computed."""
        files: dict[str, bytes] = {}
        at = 0
        for path, size in self.sizes.items():
            files[path] = bytes(self._data[at : at + size])
            at += size
        bundle = Bundle.of(files, self.max_bytes)
        if bundle.hash != self.claimed_hash:
            raise BadBundle("the bytes received do not match the bundle's hash")
        return bundle


class BundleStore:
    """Bundles in Redis, each stored once, and the cluster's current one."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    async def put(self, bundle: Bundle) -> bool:
        """Store `bundle` unless it is there already; True when it was new."""
        redis = self.link.redis
        name = key("bundle", bundle.hash)
        if await self.link.call("store a bundle", redis.exists(name)):
            await self.link.call("store a bundle", redis.persist(name))
            return False
        await self.link.call("store a bundle", redis.hset(name, mapping=bundle.files))
        return True

    async def get(self, address: str) -> Bundle | None:
        raw = await self.link.call("read a bundle", self.link.redis.hgetall(key("bundle", address)))
        if not raw:
            return None
        files = {path.decode(): bytes(data) for path, data in raw.items()}
        bundle = Bundle({p: files[p] for p in sorted(files)}, bundle_hash(files))
        return bundle if bundle.hash == address else None

    async def set_current(self, address: str, record_id: int) -> bool:
        """Point the cluster at `address` (pushed by record `record_id`) unless a later push
        already did; the bundle it replaces is left to expire."""
        redis = self.link.redis
        previous = await self.link.call(
            "point at a bundle", redis.eval(_SET_CURRENT, 1, CURRENT, record_id, address)
        )
        if previous is None:
            return False
        if previous and previous.decode() != address:
            await self.link.call(
                "retire a bundle", redis.expire(key("bundle", previous.decode()), RETIRED_TTL_S)
            )
        return True

    async def current(self) -> tuple[int, str] | None:
        """(record id, bundle address) of the latest push, or None before the first."""
        raw = await self.link.call("read the current bundle", self.link.redis.hgetall(CURRENT))
        if not raw or b"record" not in raw or b"bundle" not in raw:
            return None
        return int(raw[b"record"]), raw[b"bundle"].decode()


def write_scripts(game_dir: Path, files: Mapping[str, bytes]) -> list[str]:
    """Write scripts into the game dir, each atomically (temp file + rename), skipping those
    whose file already holds these bytes.  Blocking: run on a worker thread.  Returns an error
    line per script that could not be written."""
    errors = []
    for path, data in files.items():
        target = game_dir / path
        try:
            if target.is_file() and read_script(target, len(data)) == data:
                continue
        except (UnreadableScript, OSError):
            pass
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".push-", suffix=".tmp", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(temp, target)
            except BaseException:
                Path(temp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    return errors
