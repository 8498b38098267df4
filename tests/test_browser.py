"""The playground, the console and the JavaScript client in a real headless Chromium against a
real server (skipped only when the Chromium binaries are absent; `.ci/run` installs them)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from asobi.app import App
from asobi.lua.convert import to_python
from asobi.match import Match
from tests.browser_support import Browser

pytestmark = pytest.mark.timeout(60)

ADMIN = "console-test-token-0123456789"

ECHO = """\
match_size = 1
max_players = 4
tick_rate = 20
function init(state)
  state.counter = 0
  state.last = "none"
  state.got = {}
  return state
end
function handle_input(state, player_id, input)
  if input.value ~= nil then state.last = input.value end
  if input.n ~= nil then state.got[#state.got + 1] = input.n end
  return state
end
function tick(state)
  state.counter = state.counter + 1
  return state
end
function get_state(state, player_id)
  return { counter = state.counter, last = state.last, got = state.got }
end
"""


def chromium_size(browser: Browser, height: int) -> None:
    browser.driver.set_window_size(1280, height)


def state_of(match: Match) -> dict[str, Any]:
    return to_python(match.state)


def only_match(app: App) -> Match:
    matches = list(app.engine.matches.values())
    assert len(matches) == 1, matches
    return matches[0]


async def test_playground_shows_frames_and_sends_an_input(start_server, browser: Browser) -> None:
    server = await start_server({"match.lua": ECHO})
    await browser.get(server.http + "/")
    await browser.wait("return document.getElementById('modes').children.length > 0", what="modes")
    await browser.fill("mode", "match")
    await browser.submit("join-form")
    await browser.wait(
        "return Number(document.getElementById('frames').textContent) >= 5", what="5 states shown"
    )
    match = only_match(server.app)
    player = await browser.text("player")
    assert match.players == [player]
    assert (await browser.text("match")).startswith(match.id)
    # The tree shows the state the server sent; the counter is plotted over time.
    assert "counter" in await browser.text("state")
    assert await browser.js("return document.querySelectorAll('#plots canvas').length") >= 1

    await browser.fill("input", '{"value": "from-the-page"}')
    await browser.submit("input-form")
    await browser.wait(
        "return document.getElementById('state').textContent.includes('from-the-page')",
        what="state changed by the input",
    )
    assert state_of(match)["last"] == "from-the-page"
    # The changed field is highlighted at least once as the counter moves on.
    await browser.wait("return document.querySelectorAll('#state .changed').length > 0")
    await browser.wait("return document.getElementById('rtt').textContent.endsWith('ms')")
    await browser.screenshot("playground.png")


async def test_console_lists_inspects_reloads_and_ends_a_match(
    start_server, browser: Browser
) -> None:
    server = await start_server({"match.lua": ECHO}, admin_token=ADMIN)
    player = await server.player("match")
    await player.expect("matchmaker.matched")
    match = only_match(server.app)

    await browser.get(server.http + "/console")
    await browser.fill("token", ADMIN)
    await browser.submit("login")
    row = "return document.querySelector('#match-rows tr[data-match-id=\"' + arguments[0] + '\"]')"
    await browser.wait(row + " !== null", match.id, what="the match listed")
    assert "token" not in await browser.js("return location.href")

    await browser.js(row + ".querySelector('button.inspect').click()", match.id)
    await browser.wait(
        "return document.getElementById('inspect-views').textContent.includes(arguments[0])",
        player.player_id,
        what="the player's live view",
    )
    first = await browser.text("inspect-live")
    await browser.wait(
        "return document.getElementById('inspect-live').textContent !== arguments[0]",
        first,
        what="a pushed update",
    )
    assert "raw state" in await browser.text("inspect-facts")

    # Save a new version: the console lists the reload within a second.
    before = await browser.js("return document.querySelectorAll('#reloads > li').length")
    saved = time.monotonic()
    server.write("match.lua", ECHO.replace('state.last = "none"', 'state.last = "v2"'))
    await browser.wait(
        "return document.querySelectorAll('#reloads > li').length > arguments[0]",
        before,
        timeout=5,
        what="the reload in the history",
    )
    shown_after = time.monotonic() - saved
    record = list(server.app.history)[-1]
    assert record.outcome == "reloaded" and record.switched == [match.id]
    assert shown_after < 1.0, f"reload shown {shown_after:.2f}s after the save"
    newest = "document.querySelector('#reloads > li')"
    assert await browser.js(f"return {newest}.dataset.reloadId") == str(record.id)
    assert '+  state.last = "v2"' in await browser.js(f"return {newest}.textContent")
    await browser.click("reload-now")  # the manual path: nothing changed since the save
    await browser.wait(
        "return document.getElementById('reload-result').textContent === 'nothing changed on disk'"
    )
    await browser.js("document.querySelector('#reloads details').open = true")
    await browser.call(chromium_size, browser, 1700)
    await browser.screenshot("console.png")
    await browser.call(chromium_size, browser, 1000)

    await browser.fill("message-text", "server restarts in 5 minutes")
    await browser.submit("message-form")
    message = await player.expect("match.message")
    assert message["payload"]["payload"] == {"text": "server restarts in 5 minutes"}

    await browser.click("end-match")
    finished = await player.expect("match.finished")
    assert finished["payload"]["result"] == {"reason": "ended_by_admin"}
    assert match.id not in server.app.engine.matches
    await browser.wait(row + " === null", match.id, what="the ended match leaving the list")


async def test_js_client_resumes_after_a_forced_drop_without_losing_inputs(
    start_server, browser: Browser
) -> None:
    server = await start_server({"match.lua": ECHO})
    await browser.get(server.http + "/")
    await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        const c = new Asobi();
        window.t = { c, sessions: [], closes: [] };
        c.on('session', (p) => window.t.sessions.push(p));
        c.on('close', (p) => {
          window.t.closes.push(p.code);
          for (let n = 6; n <= 10; n++) c.input({ n });  // sent while the socket is down
        });
        await c.guest();
        try {
          await c.queue('no such mode!');
        } catch (err) {
          window.t.refused = [err.name, err.code];
        }
        const matched = c.matched();
        await c.queue('match');
        await matched;
        for (let n = 1; n <= 5; n++) c.input({ n });
        """
    )
    assert await browser.js("return window.t.refused") == ["AsobiError", "invalid_message"]
    match = only_match(server.app)
    pid = match.players[0]
    deadline = time.monotonic() + 5
    while len(state_of(match)["got"]) < 5:
        assert time.monotonic() < deadline, "the first inputs never arrived"
        await asyncio.sleep(0.02)
    server.app.hub.peer(pid).ws.transport.abort()  # the network goes away under the client
    await browser.wait(
        "return window.t.sessions.length === 2 && window.t.c.connected", what="resumed"
    )
    sessions = await browser.js("return window.t.sessions")
    assert sessions[1]["resumed"] is True and sessions[1]["player_id"] == pid
    deadline = time.monotonic() + 5
    while len(state_of(match)["got"]) < 10:
        assert time.monotonic() < deadline, f"inputs lost: {state_of(match)['got']}"
        await asyncio.sleep(0.02)
    assert state_of(match)["got"] == list(range(1, 11))
    assert await browser.js("return window.t.c.matchId") == match.id
    assert server.app.engine.match_of(pid) is match
    # States flow to the page again after the resume.
    got = await browser.js_async(
        """
        const c = window.t.c;
        return await new Promise((r) => {
          const off = c.on('match.state', (s) => { off(); r(s.got); });
        });
        """
    )
    assert got == list(range(1, 11))


HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


async def test_hostile_text_is_shown_and_never_run(start_server, browser: Browser) -> None:
    """A script's state values and keys, its log text and a player id (as the pages render
    it) carry markup: it must show up as text and create no element."""
    script = ECHO.replace(
        "function tick(state)",
        "function tick(state)\n  if state.counter % 10 == 0 then game.log('error', HOSTILE) end",
    ).replace("return { counter", "return { [HOSTILE] = HOSTILE, counter")
    server = await start_server(
        {"match.lua": f"HOSTILE = {HOSTILE!r}\n" + script}, admin_token=ADMIN
    )

    await browser.get(server.http + "/")
    await browser.fill("mode", "match")
    await browser.submit("join-form")
    await browser.wait(
        "return document.getElementById('state').textContent.includes('onerror')",
        what="the hostile state shown",
    )
    # The server only issues ids of [A-Za-z0-9_.:@-]; the page must hold up to one anyway.
    hostile_id = "p" + HOSTILE
    session = {"player_id": hostile_id, "resume_token": "r", "resumed": True}
    await browser.js(
        "window.asobiPlayground.client._receive(JSON.stringify("
        "{type: 'session.connected', payload: arguments[0]}))",
        session,
    )
    assert await browser.text("player") == hostile_id
    await _assert_inert(browser, ("state", "player", "events", "plots"))

    await browser.new_tab()
    await browser.get(server.http + "/console")
    await browser.fill("token", ADMIN)
    await browser.submit("login")
    await browser.wait("return document.querySelector('#match-rows button.inspect')")
    await browser.js("document.querySelector('#match-rows button.inspect').click()")
    await browser.wait(
        "return document.getElementById('inspect-views').textContent.includes('onerror')",
        what="the hostile state in the inspector",
    )
    await browser.wait(
        "return document.getElementById('errors').textContent.includes('<img src=x')",
        what="the script's hostile log line",
    )
    match = only_match(server.app)
    await browser.js(
        "const m = arguments[0]; m.players = [{player_id: arguments[1], connected: true}];"
        "window.asobiConsole.client._receive(JSON.stringify({type: 'admin.match', payload: m}))",
        {**_inspected(match), "views": {hostile_id: {HOSTILE: HOSTILE}}},
        hostile_id,
    )
    await browser.wait(
        "return document.getElementById('inspect-players').textContent.includes(arguments[0])",
        hostile_id,
        what="the hostile id in the inspector",
    )
    await _assert_inert(browser, ("inspect-players", "inspect-views", "errors", "match-rows"))


def _inspected(match: Match) -> dict[str, Any]:
    return {
        "match_id": match.id,
        "mode": match.mode,
        "script": match.script.name,
        "version": match.script.version,
        "tick": 1,
        "seats": {"used": 1, "max": 4},
        "state_bytes": 10,
        "inputs_per_s": 0,
        "bytes_per_s": 0,
        "last_error": HOSTILE,
    }


async def _assert_inert(browser: Browser, ids: tuple[str, ...]) -> None:
    for element_id in ids:
        planted = await browser.js(
            "return document.getElementById(arguments[0]).querySelectorAll('script, img').length",
            element_id,
        )
        assert planted == 0, f"markup from the game became elements in #{element_id}"
    assert await browser.js("return window.__pwned === undefined")


@pytest.mark.parametrize("kind", ["matchmaker.matched", "match.moved"])
async def test_js_client_follows_a_cluster_redirect(
    start_server, browser: Browser, kind: str
) -> None:
    """The cluster hook: a `matchmaker.matched` (or a drained node's `match.moved`) naming
    another node moves the session there.  The frame is handed to the page's client directly;
    the move itself goes to a second real server."""
    first = await start_server({"match.lua": ECHO})
    second = await start_server({"match.lua": ECHO})  # same secret: a node of one cluster
    await browser.get(first.http + "/")
    result = await browser.js_async(
        """
        const { Asobi } = await import('/static/asobi.js');
        const c = new Asobi();
        const redirects = [];
        c.on('redirect', (p) => redirects.push(p.url));
        await c.guest();
        const moved = new Promise((r) => { const off = c.on('session', (p) => { off(); r(p); }); });
        c._receive(JSON.stringify({type: args[1], payload: {
          match_id: 'm1', mode: 'match', players: [c.playerId],
          node_url: args[0], node_id: 'n2', seat_token: 'seat-1'}}));
        const late = new Promise((_, no) => setTimeout(() => no(new Error('no move')), 5000));
        const session = await Promise.race([moved, late]);
        return { player: c.playerId, url: c.url, redirects, session };
        """,
        second.url,
        kind,
    )
    assert result["redirects"] == [second.url] and result["url"] == second.url
    player = result["player"]
    assert result["session"]["player_id"] == player
    assert second.app.hub.peer(player) is not None
    deadline = time.monotonic() + 3
    while first.app.hub.peer(player) is not None:
        assert time.monotonic() < deadline, "the first node kept the connection"
        await asyncio.sleep(0.02)


async def test_console_pages_through_a_thousand_matches(start_server, browser: Browser) -> None:
    slow = ECHO.replace("tick_rate = 20", "tick_rate = 1")
    server = await start_server({"match.lua": slow}, admin_token=ADMIN, reload="off")
    script = server.app.registry.resolve_mode("match")
    for i in range(1000):
        server.app.engine.start_match("match", script, [f"p{i}"])
    await browser.get(server.http + "/console")
    await browser.fill("token", ADMIN)
    await browser.submit("login")
    info = "return document.getElementById('page-info').textContent === arguments[0]"
    await browser.wait(info, "1-50 of 1000", what="the first page")
    assert await browser.js("return document.querySelectorAll('#match-rows tr').length") == 50
    took_ms = await browser.js_async(
        """
        const t0 = performance.now();
        document.getElementById('next').click();
        while (document.getElementById('page-info').textContent !== '51-100 of 1000') {
          await new Promise((r) => setTimeout(r, 5));
        }
        return performance.now() - t0;
        """
    )
    assert took_ms < 1000, f"the next page took {took_ms:.0f} ms"
    assert await browser.js("return document.querySelectorAll('#match-rows tr').length") == 50


async def test_two_tabs_are_two_players_and_a_reloaded_tab_keeps_its_seat(
    start_server, browser: Browser
) -> None:
    duel = ECHO.replace("match_size = 1", "match_size = 2")
    server = await start_server({"match.lua": duel})
    in_match = "return document.getElementById('status').textContent === 'in a match'"
    for _ in range(2):
        await browser.new_tab()
        await browser.get(server.http + "/")
        await browser.fill("mode", "match")
        await browser.submit("join-form")
    await browser.wait(in_match, what="the second tab matched")
    match = only_match(server.app)
    assert len(set(match.players)) == 2
    second = await browser.text("player")
    assert second in match.players

    await browser.get(server.http + "/")  # a page reload: this tab's session resumes
    await browser.wait(
        "return document.getElementById('status').textContent.startsWith('connected (resumed)')"
        " || document.getElementById('status').textContent === 'in a match'",
        what="the resumed session",
    )
    await browser.wait(
        "return Number(document.getElementById('frames').textContent) >= 2", what="states again"
    )
    assert await browser.text("player") == second
    assert server.app.engine.match_of(second) is match
