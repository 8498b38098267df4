// Bytes Colyseus puts on the wire for the bench games' states, without a server:
// `node bytes.js bench|field TICKS` runs the game's simulation for TICKS ticks through Colyseus'
// own SchemaSerializer (what a Room calls at each patch) with stand-in clients that count what
// they are sent, and prints JSON: bytes per player per second (WebSocket header included), the
// mean full-state and patch frame, as bench/patch_bytes.py reports them for asobi.
"use strict";

const { SchemaSerializer } = require("@colyseus/core");
const { StateView } = require("@colyseus/schema");
const S = require("./states");

const TICK_RATE = 10;

function wsBytes(n) {
  return n + (n < 126 ? 2 : n < 65536 ? 4 : 10);
}

function client(withView) {
  return {
    state: 1, // ClientState.JOINED
    view: withView ? new StateView() : undefined,
    seen: new Set(),
    bytes: 0,
    frames: 0,
    raw(buf) { this.bytes += wsBytes(buf.length); this.frames += 1; },
  };
}

function run(game, ticks) {
  const field = game === "field";
  const players = field ? 16 : 4;
  const state = field ? new S.FieldState() : new S.BenchState();
  const serializer = new SchemaSerializer();
  serializer.reset(state);
  const clients = [];
  for (let j = 1; j <= players; j++) {
    const c = client(field);
    c.id = "p" + j;
    if (field) S.fieldJoin(state, c.id);
    else state.players = j;
    clients.push(c);
  }
  // Join: every client gets the full state (its view's part of it with StateView).
  let full = 0;
  for (const c of clients) {
    if (field) S.fieldView(state, c.id, c.view, c.seen);
    full += wsBytes(serializer.getFullState(c).length);
  }
  serializer.applyPatches([]); // the join's changes are in the full state already
  let patchBytes = 0, patchFrames = 0;
  for (let t = 1; t <= ticks; t++) {
    if (field) {
      clients.forEach((c, i) => S.fieldInput(state, c.id, S.inputDir(i + 1, t)));
      S.fieldTick(state);
      for (const c of clients) S.fieldView(state, c.id, c.view, c.seen);
    } else {
      S.benchTick(state);
    }
    for (const c of clients) { c.bytes = 0; c.frames = 0; }
    serializer.applyPatches(clients);
    for (const c of clients) { patchBytes += c.bytes; patchFrames += c.frames; }
  }
  const seconds = ticks / TICK_RATE;
  return {
    state: state.toJSON(),
    game,
    players,
    ticks,
    full_frame_bytes: full / players,
    patch_frame_bytes: patchFrames ? patchBytes / patchFrames : 0,
    patch_bytes_per_player_s: patchBytes / players / seconds,
  };
}

// `node bytes.js field TICKS state` prints the field state after TICKS ticks instead (a test
// checks that the Lua script and this room simulate the same game).
const [game = "bench", ticks = "300", what = "bytes"] = process.argv.slice(2);
const result = run(game, Number(ticks));
process.stdout.write(JSON.stringify(what === "state" ? result.state : { ...result, state: undefined }) + "\n");
