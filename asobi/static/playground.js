// The playground: join a mode as a guest, watch match.state live, send inputs.
import { Asobi } from "/static/asobi.js";
import { $, el, flatten, sparkline, tree } from "/static/ui.js";

const HISTORY = 120;
const MAX_PLOTS = 12;
const MAX_EVENTS = 50;

const client = new Asobi(undefined, {
  token: sessionStorage.getItem("asobi.token"),
  resumeToken: sessionStorage.getItem("asobi.resume"),
});
let previous = new Map();
let latest = null;
let changed = new Set();
let frames = 0;
let drawPending = false;
const series = new Map();

function status(text) {
  $("status").textContent = text;
}

function logEvent(type, payload) {
  const list = $("events");
  const text = JSON.stringify(payload);
  list.prepend(el("li", {}, el("b", { text: type }), " ", text.length > 300 ? `${text.slice(0, 300)}…` : text));
  while (list.children.length > MAX_EVENTS) list.lastChild.remove();
}

function draw() {
  drawPending = false;
  if (latest === null) return;
  $("state").replaceChildren(tree(latest, changed));
  const plots = $("plots");
  const rows = [];
  for (const [path, values] of series) {
    const canvas = el("canvas", { width: "160", height: "32" });
    sparkline(canvas, values);
    rows.push(el("div", { class: "plot" }, el("span", { class: "key", text: path }), canvas, el("span", { text: String(values[values.length - 1]) })));
  }
  plots.replaceChildren(...rows);
  $("frames").textContent = String(frames);
}

client.on("match.state", (payload) => {
  frames += 1;
  const flat = flatten(payload);
  changed = new Set();
  for (const [path, value] of flat) {
    if (previous.size && previous.get(path) !== value) changed.add(path);
    if (typeof value === "number") {
      if (!series.has(path) && series.size >= MAX_PLOTS) continue;
      const values = series.get(path) ?? [];
      values.push(value);
      if (values.length > HISTORY) values.shift();
      series.set(path, values);
    }
  }
  previous = flat;
  latest = payload;
  if (!drawPending) {
    drawPending = true;
    requestAnimationFrame(draw);
  }
});

client.on("*", (payload, frame) => {
  if (frame && frame.type !== "match.state") logEvent(frame.type, payload);
});
client.on("session", (payload) => {
  sessionStorage.setItem("asobi.token", client.token);
  sessionStorage.setItem("asobi.resume", payload.resume_token);
  $("player").textContent = payload.player_id;
  status(payload.resumed ? "connected (resumed)" : "connected");
});
client.on("matchmaker.queued", (p) => status(`queued for ${p.mode}`));
for (const type of ["matchmaker.matched", "match.joined", "match.rejoined"]) {
  client.on(type, (p) => {
    $("match").textContent = `${p.match_id} (${p.mode})`;
    status("in a match");
    series.clear();
    previous = new Map();
  });
}
client.on("match.finished", (p) => {
  $("match").textContent = `${p.match_id} (finished)`;
  status("match finished");
});
client.on("reconnecting", (p) => status(`reconnecting (attempt ${p.attempt})`));
client.on("close", (p) => {
  if (p.code === 4000) status("replaced by another tab with this player");
  else if (p.code === 4001) status("kicked");
});

async function join(event) {
  event.preventDefault();
  const mode = $("mode").value.trim();
  try {
    if (!client.playerId) await client.guest();
    await client.queue(mode);
  } catch (err) {
    status(`${err.code ?? "error"}: ${err.message}`);
  }
}

function sendInput(event) {
  event.preventDefault();
  const box = $("input-error");
  box.textContent = "";
  let payload;
  try {
    payload = JSON.parse($("input").value);
  } catch (err) {
    box.textContent = `not JSON: ${err.message}`;
    return;
  }
  if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
    box.textContent = "the input must be a JSON object";
    return;
  }
  client.input(payload);
  logEvent("sent match.input", payload);
}

async function leave() {
  try {
    await client.leave();
    status("left the match");
  } catch (err) {
    status(`${err.code}: ${err.message}`);
  }
}

async function measure() {
  if (!client.connected || !client.playerId) return;
  try {
    $("rtt").textContent = `${(await client.ping()).toFixed(1)} ms`;
  } catch {
    $("rtt").textContent = "-";
  }
}

async function start() {
  $("join-form").addEventListener("submit", join);
  $("input-form").addEventListener("submit", sendInput);
  $("leave").addEventListener("click", leave);
  setInterval(measure, 2000);
  try {
    const { modes } = await (await fetch("/api/v1/modes")).json();
    $("modes").replaceChildren(...modes.map((m) => el("option", { value: m })));
    if (modes.length && !modes.includes($("mode").value)) $("mode").value = modes[0];
  } catch {
    // the datalist only offers suggestions
  }
  if (client.token) {
    status("reconnecting to this tab's session…");
    client.connect().catch((err) => status(`${err.code}: ${err.message}`));
  }
}

window.asobiPlayground = { client };
start();
