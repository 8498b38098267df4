// The benchmark game as an idiomatic Colyseus room: a @colyseus/schema state with the same
// ~20 fields as bench/game.py, a 10 Hz simulation interval and a 10 Hz patch rate.
//
// Lateness: Colyseus cannot report it, so the room measures it itself as the overshoot of each
// simulation interval beyond 100 ms (performance.now between ticks).  SIGWINCH writes the
// percentiles since the previous signal to BENCH_STATS (Node keeps SIGUSR1 for its debugger, Colyseus SIGUSR2 for shutdown).
"use strict";

const fs = require("fs");
const { performance } = require("perf_hooks");
const { Server, Room } = require("@colyseus/core");
const { WebSocketTransport } = require("@colyseus/ws-transport");
const { Schema, defineTypes } = require("@colyseus/schema");

const PERIOD_MS = 100;
const port = Number(process.env.PORT || 2567);
const statsPath = process.env.BENCH_STATS || "";
let lateness = [];
let rooms = 0;

class BenchState extends Schema {
  constructor() {
    super();
    this.counter = 0;
    this.message = process.env.BENCH_MESSAGE || "hello";
    this.phase = "play";
    this.x = 0; this.y = 0; this.vx = 1.5; this.vy = -0.5;
    this.hp = 100; this.mana = 50; this.score = 0; this.level = 1;
    this.round = 1; this.timer = 600; this.seed = 12345;
    this.a = 0; this.b = 0; this.c = 0; this.d = 0; this.players = 0;
  }
}
defineTypes(BenchState, {
  counter: "uint32", message: "string", phase: "string",
  x: "number", y: "number", vx: "number", vy: "number",
  hp: "number", mana: "number", score: "number", level: "number",
  round: "number", timer: "number", seed: "number",
  a: "number", b: "number", c: "number", d: "number", players: "uint8",
});

class BenchRoom extends Room {
  onCreate() {
    this.maxClients = 4;
    this.autoDispose = true;
    this.setState(new BenchState());
    this.patchRate = PERIOD_MS;
    this.last = undefined;
    rooms += 1;
    this.setSimulationInterval(() => this.tick(), PERIOD_MS);
  }

  tick() {
    const now = performance.now();
    if (this.last !== undefined) lateness.push(Math.max(0, now - this.last - PERIOD_MS));
    this.last = now;
    const s = this.state;
    const c = s.counter + 1;
    s.counter = c;
    s.x += s.vx; s.y += s.vy;
    s.hp = 100 - (c % 100);
    s.mana = (s.mana + 3) % 200;
    s.score += 7;
    s.level = 1 + Math.floor(c / 100);
    s.timer -= 1;
    s.seed = (s.seed * 1103515245 + 12345) % 2147483648;
    s.a = c % 3; s.b = c % 5; s.c = c % 7; s.d = c % 11;
  }

  onJoin() { this.state.players = this.clients.length; }
  onLeave() { this.state.players = this.clients.length; }
  onDispose() { rooms -= 1; }
}

function pct(sorted, q) {
  return sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : 0;
}

process.on("SIGWINCH", () => {
  const values = lateness.sort((a, b) => a - b);
  lateness = [];
  const out = {
    time: performance.now() / 1000,
    samples: values.length,
    lateness_p50_ms: pct(values, 0.5),
    lateness_p99_ms: pct(values, 0.99),
    lateness_max_ms: values.length ? values[values.length - 1] : 0,
    matches: rooms,
  };
  if (statsPath) {
    fs.writeFileSync(statsPath + ".tmp", JSON.stringify(out));
    fs.renameSync(statsPath + ".tmp", statsPath);
  }
});
process.on("SIGTERM", () => process.exit(0));

const gameServer = new Server({ transport: new WebSocketTransport() });
gameServer.define("bench", BenchRoom);
gameServer.listen(port, "127.0.0.1").then(() => console.log(`LISTENING ${port}`));
