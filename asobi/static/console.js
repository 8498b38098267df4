// The console: admin.* frames over the game's own WebSocket (docs/protocol.md, "Admin frames").
import { Asobi } from "/static/asobi.js";
import { $, bytes, el, tree } from "/static/ui.js";

const PAGE = 50;
const MAX_ERRORS = 200;
const RELOAD_EVENTS = new Set(["reloaded", "reload_failed", "reload_rolled_back"]);

const client = new Asobi(undefined, { reconnect: false });
let offset = 0;
let watched = null;
let polling = null;

function setOptions(select, values) {
  const current = select.value;
  const options = [el("option", { value: "", text: "all" }), ...values.map((v) => el("option", { value: v, text: v }))];
  select.replaceChildren(...options);
  select.value = values.includes(current) ? current : "";
}

function fact(list, label, value) {
  list.append(el("dt", { text: label }), el("dd", { text: value === null || value === undefined ? "-" : String(value) }));
}

async function refreshOverview() {
  const o = await client.request("admin.overview", {}, "admin.overview");
  const list = $("overview");
  list.replaceChildren();
  fact(list, "players", o.players);
  fact(list, "connections", o.connections);
  fact(list, "matches", o.matches);
  fact(list, "seats held", o.seats_held);
  fact(list, "tickets", o.tickets);
  fact(list, "tick lateness p50", o.tick_lateness_ms.p50 === null ? "-" : `${o.tick_lateness_ms.p50} ms`);
  fact(list, "tick lateness p99", o.tick_lateness_ms.p99 === null ? "-" : `${o.tick_lateness_ms.p99} ms`);
  fact(list, "memory", bytes(o.memory_bytes));
  fact(list, "reload", o.reload);
  fact(list, "scripts", o.scripts.map((s) => `${s.name} @ ${s.version}`).join(", "));
}

async function refreshQueues() {
  const { queues } = await client.request("admin.queues", {}, "admin.queues");
  $("queues").replaceChildren(
    ...queues.map((q) => el("tr", {}, el("td", { text: q.mode }), el("td", { text: String(q.depth) }), el("td", { text: `${q.oldest_wait_s.toFixed(1)} s` }))),
  );
}

async function refreshMatches() {
  const filter = { offset, limit: PAGE };
  if ($("filter-mode").value) filter.mode = $("filter-mode").value;
  if ($("filter-version").value) filter.version = $("filter-version").value;
  const page = await client.request("admin.matches", filter, "admin.matches");
  if (page.offset >= page.total && page.total > 0 && offset > 0) {
    offset = Math.max(0, page.total - PAGE);
    return refreshMatches();
  }
  setOptions($("filter-mode"), page.modes);
  setOptions($("filter-version"), page.versions);
  $("match-count").textContent = `${page.total} shown of ${page.running} running`;
  $("page-info").textContent = page.total ? `${page.offset + 1}-${page.offset + page.matches.length} of ${page.total}` : "none";
  $("match-rows").replaceChildren(
    ...page.matches.map((m) => {
      const inspect = el("button", { type: "button", text: "inspect", class: "inspect" });
      inspect.addEventListener("click", () => watch(m.match_id));
      const row = el(
        "tr",
        { class: m.match_id === watched ? "selected" : "" },
        el("td", { class: "mono", text: m.match_id.slice(0, 12) }),
        el("td", { text: m.mode }),
        el("td", { text: m.script }),
        el("td", { class: "mono", text: m.version }),
        el("td", { text: `${m.players}/${m.max_players}` }),
        el("td", { text: String(m.tick) }),
        el("td", { class: "error", text: m.last_error ?? "" }),
        el("td", {}, inspect),
      );
      row.dataset.matchId = m.match_id;
      return row;
    }),
  );
}

async function refreshReloads() {
  const { reloads } = await client.request("admin.reloads", {}, "admin.reloads");
  $("reloads").replaceChildren(...reloads.map(reloadItem));
}

function reloadItem(r) {
  const when = new Date(r.started_at * 1000).toLocaleTimeString();
  const head = el(
    "div",
    { class: "reload-head" },
    el("b", { class: `outcome ${r.outcome}`, text: r.outcome }),
    ` ${r.script} ${r.version ?? r.hash} · ${r.trigger} · ${when} · ${r.elapsed_ms} ms`,
  );
  const outcomes = el("ul", { class: "plain" });
  if (r.switched.length) outcomes.append(el("li", { text: `switched: ${r.switched.length} match(es)` }));
  for (const x of [...r.rolled_back, ...r.failed]) outcomes.append(el("li", { class: "error", text: `${x.match_id.slice(0, 12)}: ${x.error}` }));
  for (const e of r.errors) outcomes.append(el("li", { class: "error", text: e }));
  if (r.new_matches !== "none") outcomes.append(el("li", { text: `new matches start on the ${r.new_matches} version` }));
  const diff = el("pre", { class: "diff" });
  for (const line of r.diff.split("\n")) {
    const kind = line.startsWith("@@") ? "hunk" : line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "";
    diff.append(el("span", { class: kind, text: `${line}\n` }));
  }
  const details = el("details", {}, el("summary", { text: "what changed" }), diff);
  const item = el("li", {}, head, outcomes, r.diff ? details : null);
  item.dataset.reloadId = String(r.id);
  return item;
}

function showMatch(m) {
  if (m.match_id !== watched) return;
  if (m.finished) {
    $("inspect-live").textContent = "(finished)";
    return;
  }
  $("inspect-id").textContent = m.match_id;
  $("inspect-live").textContent = `live · tick ${m.tick}`;
  const facts = $("inspect-facts");
  facts.replaceChildren();
  fact(facts, "mode", m.mode);
  fact(facts, "script", `${m.script} @ ${m.version}`);
  fact(facts, "seats", `${m.seats.used}/${m.seats.max}`);
  fact(facts, "raw state", m.state_bytes === null ? m.state_error : bytes(m.state_bytes));
  fact(facts, "inputs/s", m.inputs_per_s);
  fact(facts, "bytes/s", m.bytes_per_s === undefined ? "-" : bytes(m.bytes_per_s));
  fact(facts, "last error", m.last_error);
  $("inspect-players").replaceChildren(
    ...m.players.map((p) => {
      const kick = el("button", { type: "button", class: "danger kick", text: "kick" });
      kick.addEventListener("click", () => act("admin.kick", { player_id: p.player_id }, `kicked ${p.player_id}`));
      return el("li", {}, el("span", { class: "mono player", text: p.player_id }), ` ${p.connected ? "connected" : p.seat_held ? "seat held" : "away"} `, kick);
    }),
  );
  $("inspect-views").replaceChildren(
    ...Object.entries(m.views).map(([pid, view]) => el("div", { class: "view" }, el("h4", { class: "mono", text: pid }), tree(view))),
  );
}

async function watch(matchId) {
  watched = matchId;
  $("inspector").hidden = false;
  $("inspect-id").textContent = matchId;
  $("inspect-live").textContent = "loading…";
  $("action-result").textContent = "";
  try {
    showMatch(await client.request("admin.match", { match_id: matchId }, "admin.match"));
    await client.request("admin.watch", { match_id: matchId }, "admin.watching");
  } catch (err) {
    $("inspect-live").textContent = `${err.code}: ${err.message}`;
  }
}

async function act(type, payload, done) {
  try {
    await client.request(type, payload);
    $("action-result").textContent = done;
  } catch (err) {
    $("action-result").textContent = `${err.code}: ${err.message}`;
  }
}

function showLog(ev) {
  if (RELOAD_EVENTS.has(ev.event)) refreshReloads().catch(() => {});
  if (ev.event === "reloaded") return;
  const list = $("errors");
  const when = new Date(ev.ts * 1000).toLocaleTimeString();
  list.prepend(
    el(
      "li",
      { class: ev.level },
      el("span", { class: "muted", text: when }),
      " ",
      el("b", { text: ev.event }),
      " ",
      el("span", { class: "mono where", text: ev.where ?? ev.script ?? "" }),
      " ",
      el("span", { class: "message", text: ev.message }),
      ev.dropped_before ? el("span", { class: "muted", text: ` (${ev.dropped_before} earlier events not shown)` }) : null,
      ev.match_id ? el("span", { class: "muted mono", text: ` match ${String(ev.match_id).slice(0, 12)}` }) : null,
    ),
  );
  while (list.children.length > MAX_ERRORS) list.lastChild.remove();
}

let pollBusy = false;

async function poll() {
  if (pollBusy) return; // a slow server gets one round of requests at a time
  pollBusy = true;
  try {
    await Promise.all([refreshOverview(), refreshMatches(), refreshQueues()]);
  } catch (err) {
    $("conn").textContent = `${err.code}: ${err.message}`;
  } finally {
    pollBusy = false;
  }
}

async function login(token) {
  $("login-error").textContent = "";
  try {
    const { recent } = await client.admin(token);
    sessionStorage.setItem("asobi.admin", token);
    $("login").hidden = true;
    $("app").hidden = false;
    $("conn").textContent = "connected";
    for (const ev of recent) showLog(ev);
    await Promise.all([poll(), refreshReloads()]);
    polling = setInterval(poll, 1000);
    setInterval(() => refreshReloads().catch(() => {}), 5000);
  } catch (err) {
    sessionStorage.removeItem("asobi.admin");
    $("login-error").textContent = `${err.code}: ${err.message}`;
  }
}

function start() {
  client.on("admin.log", showLog);
  client.on("admin.match", showMatch);
  client.on("close", (p) => {
    $("conn").textContent = `disconnected (${p.code}) - reload the page`;
    clearInterval(polling);
  });
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    login($("token").value);
  });
  $("filter-mode").addEventListener("change", () => {
    offset = 0;
    refreshMatches();
  });
  $("filter-version").addEventListener("change", () => {
    offset = 0;
    refreshMatches();
  });
  $("prev").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE);
    refreshMatches();
  });
  $("next").addEventListener("click", () => {
    offset += PAGE;
    refreshMatches();
  });
  $("end-match").addEventListener("click", () => act("admin.end_match", { match_id: watched }, "match ended"));
  $("message-form").addEventListener("submit", (event) => {
    event.preventDefault();
    act("admin.message", { match_id: watched, text: $("message-text").value }, "message sent");
  });
  $("reload-now").addEventListener("click", async () => {
    try {
      const { reloads } = await client.request("admin.reload", {}, "admin.reloading");
      $("reload-result").textContent = reloads.length ? `${reloads.length} script(s) reloading` : "nothing changed on disk";
      await refreshReloads();
    } catch (err) {
      $("reload-result").textContent = `${err.code}: ${err.message}`;
    }
  });
  const saved = sessionStorage.getItem("asobi.admin");
  if (saved) login(saved);
}

window.asobiConsole = { client };
start();
