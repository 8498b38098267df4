"""The JavaScript client and compact state frames, in a real headless Chromium: it decodes what
the Python encoder writes (keys like `__proto__` included) and, against a real server, rebuilds
the states a full JSON client gets (skipped without Chromium)."""

from __future__ import annotations

import base64
import random

import orjson
import pytest

from asobi import compact_state, merge_patch
from tests.browser_support import Browser
from tests.test_browser_patch import KEYS, random_value
from tests.test_state_patch import game

pytestmark = pytest.mark.timeout(60)


async def test_js_decodes_what_python_encodes(start_server, browser: Browser) -> None:
    """A chain of compact frames (full, patches adding keys, a new full frame that starts a new
    table, patches again) read by the client: each `match.state` event is the state sent."""
    server = await start_server()
    rng = random.Random(11)
    keys = [*KEYS, *(f"id{i}" for i in range(40))]
    states = [
        {k: random_value(rng) for k in rng.sample(keys, rng.randint(0, 8))} for _ in range(200)
    ]
    frames = []
    table = compact_state.EMPTY
    for seq, state in enumerate(states, 1):
        if seq % 50 == 1:
            frame, table = compact_state.encode_full(seq, state)
        else:
            patch = merge_patch.diff(states[seq - 2], state)
            frame, table = compact_state.encode_patch(seq, seq - 1, patch, table)
        frames.append(base64.b64encode(frame).decode())
    await browser.get(server.http + "/")
    seen = await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        const c = new Asobi('ws://unused', { stateEncoding: 'compact' });
        await c._loadDecoder();
        const out = [];
        c.on('match.state', (s) => out.push(JSON.stringify(s)));
        c.resync = () => out.push('resync');
        for (const b64 of args[0]) {
          c._receive(Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0)).buffer);
        }
        // A patch that does not follow the last frame is not applied: a resync is asked for.
        c._receive(Uint8Array.from(atob(args[1]), (ch) => ch.charCodeAt(0)).buffer);
        return out;
        """,
        frames,
        base64.b64encode(compact_state.encode_patch(10**6, 10**6 - 2, {"a": 1}, table)[0]).decode(),
    )
    assert seen[-1] == "resync"
    assert [orjson.loads(s) for s in seen[:-1]] == states


async def test_js_client_rebuilds_states_from_compact_frames(
    start_server, browser: Browser
) -> None:
    server = await start_server({"match.lua": game(10)})
    await browser.get(server.http + "/")
    await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        const c = new Asobi(undefined, { stateEncoding: 'compact' });
        const t = window.t = { c, binary: 0, text: [], states: {} };
        const receive = c._receive.bind(c);
        c._receive = (data) => {
          if (typeof data === 'string') t.text.push(JSON.parse(data).type); else t.binary++;
          receive(data);
        };
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
    text = await browser.js("return window.t.text")
    assert "match.state" not in text and "match.patch" not in text
    assert "matchmaker.matched" in text
    assert await browser.js("return window.t.binary") >= 30
    page = {int(k): v for k, v in (await browser.js("return window.t.states")).items()}
    common = sorted(set(page) & set(seen))
    assert len(common) >= 20
    assert all(page[t] == seen[t] for t in common)
    # The socket drops: the client resumes, asks for compact frames again, and the new
    # connection's first state frame starts a new key table.
    await browser.js(
        "Object.assign(window.t, {states: {}, text: [], binary: 0}); window.t.c.drop();"
    )
    await browser.wait(
        "return window.t.c.connected && Object.keys(window.t.states).length >= 10",
        what="10 states after the resume",
    )
    seen = {s["tick"]: s for s in await full.states(40)}
    page = {int(k): v for k, v in (await browser.js("return window.t.states")).items()}
    common = sorted(set(page) & set(seen))
    assert len(common) >= 10
    assert all(page[t] == seen[t] for t in common)
    text = await browser.js("return window.t.text")
    assert "session.connected" in text and "match.state" not in text
    assert await browser.js("return window.t.binary") >= 10
