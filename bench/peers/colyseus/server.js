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
const { StateView } = require("@colyseus/schema");
const S = require("./states");
const { BenchState, benchTick } = S;

const PERIOD_MS = 100;
const port = Number(process.env.PORT || 2567);
const statsPath = process.env.BENCH_STATS || "";
let lateness = [];
let rooms = 0;

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
    benchTick(this.state);
  }

  onJoin() { this.state.players = this.clients.length; }
  onLeave() { this.state.players = this.clients.length; }
  onDispose() { rooms -= 1; }
}

// bench/field_game.py as a Colyseus room: 16 clients, each with a StateView of what is within
// reach (updated every tick), inputs as "input" messages ({dir}).
class FieldRoom extends Room {
  onCreate() {
    this.maxClients = 16;
    this.autoDispose = true;
    this.setState(new S.FieldState());
    this.patchRate = PERIOD_MS;
    this.last = undefined;
    this.seen = new Map();
    rooms += 1;
    this.onMessage("input", (client, msg) => S.fieldInput(this.state, client.sessionId, msg && msg.dir));
    this.setSimulationInterval(() => this.tick(), PERIOD_MS);
  }

  tick() {
    const now = performance.now();
    if (this.last !== undefined) lateness.push(Math.max(0, now - this.last - PERIOD_MS));
    this.last = now;
    S.fieldTick(this.state);
    for (const client of this.clients) {
      const seen = this.seen.get(client.sessionId);
      if (seen && client.view) S.fieldView(this.state, client.sessionId, client.view, seen);
    }
  }

  onJoin(client) {
    S.fieldJoin(this.state, client.sessionId);
    client.view = new StateView();
    const seen = new Set();
    this.seen.set(client.sessionId, seen);
    S.fieldView(this.state, client.sessionId, client.view, seen);
  }

  onLeave(client) {
    S.fieldLeave(this.state, client.sessionId);
    this.seen.delete(client.sessionId);
  }

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
gameServer.define("field", FieldRoom);
gameServer.listen(port, "127.0.0.1").then(() => console.log(`LISTENING ${port}`));
