"""auth.register / auth.login over real sockets, with argon2 hashes in the real database."""

from __future__ import annotations

import asyncio

from tests.conftest import Client, run_queue_wait, take_lateness


async def _auth(client: Client, kind: str, username: object, password: object) -> dict:
    """The reply to an auth frame; the first token on a connection also opens its session."""
    await client.send(kind, {"username": username, "password": password}, cid=kind)
    frame = await client.recv()
    assert frame["cid"] == kind
    if frame["type"] == "auth.token" and client.player_id is None:
        connected = await client.expect("session.connected")
        assert connected["cid"] == kind
        assert connected["payload"]["player_id"] == frame["payload"]["player_id"]
        client.player_id = connected["payload"]["player_id"]
    return frame


async def test_register_login_and_connect(start_server) -> None:
    server = await start_server()
    c = await server.client()
    reg = await _auth(c, "auth.register", "Alice_1", "correct horse")
    assert reg["type"] == "auth.token"
    player_id = reg["payload"]["player_id"]
    assert player_id.startswith("p-")
    login = await _auth(c, "auth.login", "alice_1", "correct horse")  # usernames ignore case
    assert login["type"] == "auth.token" and login["payload"]["player_id"] == player_id
    assert c.player_id == player_id  # register opened the session; login only gave a token
    other = await server.client()
    await other.send("session.connect", {"token": login["payload"]["token"]})
    assert (await other.expect("session.connected"))["payload"]["player_id"] == player_id
    # The stored hash is argon2id, never the password.
    found = await server.app.store.find_account("Alice_1")
    assert found is not None and found[0] == player_id
    assert found[1].startswith("$argon2id$") and "correct horse" not in found[1]


async def test_refusals_have_distinct_codes(start_server) -> None:
    server = await start_server()
    c = await server.client()
    assert (await _auth(c, "auth.register", "bob", "password-1"))["type"] == "auth.token"
    taken = await _auth(c, "auth.register", "BOB", "password-2")
    assert taken["payload"]["code"] == "username_taken"
    wrong = await _auth(c, "auth.login", "bob", "password-2")
    assert wrong["payload"]["code"] == "invalid_credentials"
    unknown = await _auth(c, "auth.login", "nobody", "password-1")
    assert unknown["payload"]["code"] == "invalid_credentials"
    assert unknown["payload"]["message"] == wrong["payload"]["message"]
    for username, password in (
        ("ab", "password-1"),
        ("x" * 33, "password-1"),
        ("has space", "password-1"),
        ("carol", "short"),
        ("carol", "p" * 129),
        (None, "password-1"),
        ("carol", 12345678),
    ):
        bad = await _auth(c, "auth.register", username, password)
        assert bad["payload"]["code"] == "invalid_account_input", (username, password, bad)
    # None of that touched the connection: guests still work, and bob can still log in.
    assert (await _auth(c, "auth.login", "bob", "password-1"))["type"] == "auth.token"
    await (await server.client()).login_guest()


async def test_concurrent_registrations_of_one_name(start_server) -> None:
    server = await start_server()
    clients = [await server.client() for _ in range(4)]
    frames = await asyncio.gather(
        *(_auth(c, "auth.register", "dave", f"password-{i}") for i, c in enumerate(clients))
    )
    kinds = sorted(f["type"] for f in frames)
    assert kinds == ["auth.token", "error", "error", "error"]
    assert all(f["payload"]["code"] == "username_taken" for f in frames if f["type"] == "error")


async def test_hashing_does_not_block_matches(start_server) -> None:
    """Registrations hash on worker threads; a running match keeps its tick rate meanwhile."""
    server = await start_server()
    player = await server.player("hello")
    await player.expect("matchmaker.matched")
    await player.states(2)
    clients = [await server.client() for _ in range(4)]
    take_lateness(server.app)  # only the ticks that run while the hashes do count
    waited = run_queue_wait()
    frames = await asyncio.gather(
        *(_auth(c, "auth.register", f"user{i}", "password-x") for i, c in enumerate(clients))
    )
    assert [f["type"] for f in frames] == ["auth.token"] * 4
    lateness = take_lateness(server.app)
    # Measured by the server's own scheduler.  One argon2 hash costs well over 0.1 s of CPU, so
    # a single hash on the event loop makes some tick at least that late.  The time this process
    # waited for a CPU (other processes' doing) is allowed on top; it is 0 on an idle machine.
    stolen = max(run_queue_wait() - waited, 0.0)
    assert lateness and max(lateness) < 0.1 + stolen, (max(lateness), stolen)
