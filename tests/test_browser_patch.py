"""The JavaScript client and `match.patch` frames, in a real headless Chromium: its merge-patch
apply agrees with Python's, and against a real server it rebuilds the states a full-frame client
gets and asks for a full frame when a patch does not follow (skipped without Chromium)."""

from __future__ import annotations

import itertools
import random
import time
from typing import Any

import orjson
import pytest

from asobi import merge_patch
from tests.browser_support import Browser
from tests.test_state_patch import game

pytestmark = pytest.mark.timeout(60)

KEYS = ["a", "b", "c", "hp", "pos", "1", "__proto__", "constructor"]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """A value as full frames carry it (no null; empty tables are {}); numbers JS holds exactly."""
    roll = rng.random()
    if depth < 3 and roll < 0.25:
        return {k: random_value(rng, depth + 1) for k in rng.sample(KEYS, rng.randint(0, 4))}
    if depth < 3 and roll < 0.4:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(1, 3))]
    return rng.choice(
        [
            rng.randint(-(2**31), 2**31),
            rng.random() * 100,
            rng.random() < 0.5,
            "s" * rng.randint(0, 3),
        ]
    )


async def test_js_apply_matches_python(start_server, browser: Browser) -> None:
    server = await start_server()
    rng = random.Random(7)
    states = [
        {k: random_value(rng) for k in rng.sample(KEYS, rng.randint(0, 6))} for _ in range(300)
    ]
    patches = [merge_patch.diff(a, b) for a, b in itertools.pairwise(states)]
    await browser.get(server.http + "/")
    rebuilt = await browser.js_async(
        """
        const { applyMergePatch } = await import('/static/asobi.js');
        let held = JSON.parse(args[0]);
        const out = [];
        for (const patch of JSON.parse(args[1])) {
          const before = JSON.stringify(held);
          const next = applyMergePatch(held, patch);
          if (JSON.stringify(held) !== before) throw new Error('apply changed its target');
          held = next;
          // undefined spelled out: a key left holding it is not a deleted key.
          out.push(JSON.stringify(held, (k, v) => (v === undefined ? '<undefined>' : v)));
        }
        return out;
        """,
        _json(states[0]),
        _json(patches),
    )
    assert [orjson.loads(s) for s in rebuilt] == states[1:]


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


async def test_js_client_rebuilds_states_and_resyncs(start_server, browser: Browser) -> None:
    server = await start_server({"match.lua": game(100_000)})
    await browser.get(server.http + "/")
    await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        const c = new Asobi();
        const t = window.t = { c, kinds: [], states: {} };
        const receive = c._receive.bind(c);
        c._receive = (data) => { t.kinds.push(JSON.parse(data).type); receive(data); };
        c.on('match.state', (s) => { t.states[s.tick] = s; });
        await c.guest();
        await c.queue('duel');
        """
    )
    full = await server.client()
    await full.send("auth.guest", {"state_sync": "full"})
    await full.expect("session.connected", skip=("auth.token",))
    await full.send("matchmaker.add", {"mode": "duel"})
    await full.expect("matchmaker.queued", skip=("matchmaker.matched",))
    seen = {s["tick"]: s for s in await full.states(30)}
    await browser.wait("return Object.keys(window.t.states).length >= 30", what="30 states")
    kinds = await browser.js("return window.t.kinds.filter((k) => k.startsWith('match.'))")
    state_kinds = [k for k in kinds if k in ("match.state", "match.patch")]
    assert state_kinds[0] == "match.state"
    assert state_kinds[1:].count("match.patch") >= 25 and "match.state" not in state_kinds[1:]
    page = {int(k): v for k, v in (await browser.js("return window.t.states")).items()}
    common = sorted(set(page) & set(seen))
    assert len(common) >= 20
    assert all(page[t] == seen[t] for t in common)
    # A patch that does not follow the last frame: the client asks for a full frame.
    await browser.js(
        "window.t.c._receive(JSON.stringify({type: 'match.patch', seq: 10 ** 9, "
        "base: 10 ** 9 - 1, payload: {tick: -1}}));"
        "window.t.kinds = [];"
    )
    await browser.wait(
        "return window.t.kinds.includes('match.state')", what="a full frame after the gap"
    )
    assert -1 not in {int(k) for k in await browser.js("return Object.keys(window.t.states)")}
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and len(await browser.js("return window.t.kinds")) < 5:
        await browser.call(time.sleep, 0.05)
    after = await browser.js("return window.t.kinds")
    assert after.count("match.state") == 1, after
