"""Pushed bundles without a cluster: their address, their bounds, the order scripts are applied
in, their assembly from chunks and their writing into a game dir."""

from __future__ import annotations

import asyncio
import base64
import urllib.request
from pathlib import Path

import orjson
import pytest

from asobi.cluster.bundles import (
    BadBundle,
    Bundle,
    BundleUpload,
    bundle_hash,
    read_game_dir,
    write_scripts,
)

LIMIT = 10_000


def test_the_address_is_the_content_whatever_the_order() -> None:
    one = {"match.lua": b"a", "lib/x.lua": b"b"}
    two = {"lib/x.lua": b"b", "match.lua": b"a"}
    assert bundle_hash(one) == bundle_hash(two) == Bundle.of(two, LIMIT).hash
    # Moving bytes between a path and its content, or renaming, is another bundle.
    assert bundle_hash({"ab.lua": b"c"}) != bundle_hash({"a.lua": b"bc"})
    assert bundle_hash({"m.lua": b"x"}) != bundle_hash({"n.lua": b"x"})


def test_modules_required_in_the_bundle_are_applied_first() -> None:
    files = {
        "match.lua": b'local z = require("zlib")\nlocal u = require "util.deep"\n',
        "zlib.lua": b"return {}",
        "util/deep.lua": b'-- require("match")\nreturn {}',
        "arena.lua": b"local z = require('zlib')",
    }
    order = Bundle.of(files, LIMIT).apply_order()
    assert order.index("zlib.lua") < order.index("match.lua")
    assert order.index("zlib.lua") < order.index("arena.lua")
    assert order.index("util/deep.lua") < order.index("match.lua")
    # A cycle cannot be ordered: path order, every script still applied.
    cycle = {"a.lua": b'require("b")', "b.lua": b'require("a")'}
    assert Bundle.of(cycle, LIMIT).apply_order() == ["a.lua", "b.lua"]


@pytest.mark.parametrize(
    "path", ["../x.lua", "/abs.lua", "a/../b.lua", ".hidden.lua", "a/.git/x.lua", "x.txt", ""]
)
def test_paths_outside_the_rule_are_refused(path: str) -> None:
    with pytest.raises(BadBundle, match="not a script path"):
        BundleUpload([{"path": path, "size": 1}], "0" * 64, LIMIT)


def test_a_bundle_is_bounded_as_a_whole() -> None:
    with pytest.raises(BadBundle, match="at most 10000 bytes"):
        Bundle.of({"a.lua": b"x" * 6000, "b.lua": b"x" * 5000}, LIMIT)
    with pytest.raises(BadBundle, match="size must be a byte count"):
        BundleUpload([{"path": "a.lua", "size": -1}], "0" * 64, LIMIT)
    with pytest.raises(BadBundle, match="listed twice"):
        BundleUpload([{"path": "a.lua", "size": 1}] * 2, "0" * 64, LIMIT)


def test_chunks_assemble_into_the_announced_bundle() -> None:
    files = {"match.lua": b"print(1)\n" * 50, "lib/u.lua": bytes(range(256))}
    bundle = Bundle.of(files, LIMIT)
    manifest = [{"path": p, "size": len(b)} for p, b in bundle.files.items()]
    upload = BundleUpload(manifest, bundle.hash, LIMIT)
    data = b"".join(bundle.files.values())
    for offset in range(0, len(data), 100):
        chunk = base64.b64encode(data[offset : offset + 100]).decode()
        upload.add(offset, chunk)
        upload.add(offset, chunk)  # a chunk sent again is taken once
    assert upload.complete and upload.bundle() == bundle
    with pytest.raises(BadBundle, match="expected 0"):
        BundleUpload(manifest, bundle.hash, LIMIT).add(100, base64.b64encode(b"x").decode())
    tampered = BundleUpload(manifest, bundle.hash, LIMIT)
    tampered.add(0, base64.b64encode(b"X" + data[1:]).decode())
    with pytest.raises(BadBundle, match="do not match"):
        tampered.bundle()


def test_scripts_are_written_only_when_they_differ(tmp_path: Path) -> None:
    (tmp_path / "match.lua").write_bytes(b"same")
    before = (tmp_path / "match.lua").stat().st_mtime_ns
    errors = write_scripts(tmp_path, {"match.lua": b"same", "lib/new.lua": b"return {}"})
    assert errors == []
    assert (tmp_path / "match.lua").stat().st_mtime_ns == before
    assert (tmp_path / "lib" / "new.lua").read_bytes() == b"return {}"
    assert read_game_dir(tmp_path, LIMIT) == {"lib/new.lua": b"return {}", "match.lua": b"same"}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["lib", "match.lua", "new.lua"]


async def test_a_single_server_refuses_a_push_and_keeps_its_reload_listing(start_server) -> None:
    server = await start_server(admin_token="admin-token-for-push-tests")
    client = await server.client()
    await client.request("admin.auth", {"token": "admin-token-for-push-tests"}, "admin.authed")
    files = [{"path": "match.lua", "size": 1}]
    await client.send("admin.push", {"files": files, "hash": "0" * 64}, cid=7)
    error = await client.expect("error", skip=("admin.log",))
    assert error["cid"] == 7 and error["payload"]["code"] == "unavailable"
    assert "ASOBI_REDIS_URL" in error["payload"]["message"]
    url = f"http://127.0.0.1:{server.server.port}/api/v1/reloads"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
    assert set(orjson.loads(body)) == {"reloads"}
