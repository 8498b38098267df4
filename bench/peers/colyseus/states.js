// The bench games' states as @colyseus/schema classes, with the same simulation as the Lua
// scripts: `BenchState` is bench/game.py (20 fields), `FieldState` bench/field_game.py (16
// players, 50 wandering NPCs, per-player views through a StateView per client).  Kept apart from
// server.js so that bytes.js can run them without a server.
"use strict";

const { Schema, MapSchema, defineTypes, view } = require("@colyseus/schema");

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

function benchTick(s) {
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

// -- field ----------------------------------------------------------------------------------------
const W = 100;
const RADIUS2 = 25 * 25;
const NPCS = 50;
const DX = [1, 0.7, 0, -0.7, -1, -0.7, 0, 0.7];
const DY = [0, 0.7, 1, 0.7, 0, -0.7, -1, -0.7];
const KINDS = ["orc", "wolf", "slime", "bat"];

// One decimal, wrapped onto the field (Lua's % is a floored modulo).
function step(v, d) {
  v = Math.floor((v + d) * 10 + 0.5) / 10;
  const m = v - Math.floor(v / W) * W;
  return Math.floor(m * 10 + 0.5) / 10;
}

class Npc extends Schema {}
defineTypes(Npc, { x: "number", y: "number", hp: "number", kind: "string", name: "string" });

class Player extends Schema {}
defineTypes(Player, { x: "number", y: "number", hp: "number", score: "number", name: "string" });

class FieldState extends Schema {
  constructor() {
    super();
    this.tick = 0;
    this.players = new MapSchema();
    this.npcs = new MapSchema();
    this.dirs = {};
    this.inputs = {};
    this.joined = 0;
    for (let i = 1; i <= NPCS; i++) {
      const n = new Npc();
      n.x = (i * 37) % W; n.y = (i * 61) % W; n.hp = 100;
      n.kind = KINDS[i % 4]; n.name = "npc " + i;
      this.npcs.set("n" + i, n);
      this.dirs["n" + i] = i % 8;
    }
  }
}
defineTypes(FieldState, {
  tick: "number", players: { map: Player }, npcs: { map: Npc },
});
view()(FieldState.prototype, "players");
view()(FieldState.prototype, "npcs");

function fieldJoin(s, id) {
  const j = ++s.joined;
  const p = new Player();
  p.x = (j * 13) % W; p.y = (j * 29) % W; p.hp = 100; p.score = 0; p.name = "player " + j;
  s.players.set(id, p);
  s.inputs[id] = 8;
}

function fieldLeave(s, id) {
  s.players.delete(id);
  delete s.inputs[id];
}

function fieldInput(s, id, dir) {
  if (Number.isInteger(dir) && dir >= 0 && dir <= 8 && id in s.inputs) s.inputs[id] = dir;
}

function fieldTick(s) {
  const t = s.tick + 1;
  s.tick = t;
  s.players.forEach((p, id) => {
    const d = s.inputs[id];
    if (d < 8) {
      p.x = step(p.x, DX[d]); p.y = step(p.y, DY[d]);
      if (t % 10 === 0) p.score += 1;
    }
  });
  for (let i = 1; i <= NPCS; i++) {
    const id = "n" + i;
    const phase = t + 7 * i;
    if (phase % 40 === 0) s.dirs[id] = (s.dirs[id] + 3) % 8;
    if (Math.floor(phase / 20) % 2 === 0) {
      const n = s.npcs.get(id), d = s.dirs[id];
      n.x = step(n.x, DX[d] * 0.5); n.y = step(n.y, DY[d] * 0.5);
    }
  }
  const hit = s.npcs.get("n" + (((t * 7) % NPCS) + 1));
  hit.hp = hit.hp > 1 ? hit.hp - 1 : 100;
}

function near(a, b) {
  const dx = a.x - b.x, dy = a.y - b.y;
  return dx * dx + dy * dy <= RADIUS2;
}

// Bring one client's StateView up to date: what is within reach is in it, the rest is not.
// `seen` is the client's own record (a Set of the objects in its view).
function fieldView(s, id, stateView, seen) {
  const me = s.players.get(id);
  if (!me) return;
  const visit = (obj) => {
    const inside = near(me, obj);
    if (inside && !seen.has(obj)) { stateView.add(obj); seen.add(obj); }
    else if (!inside && seen.has(obj)) { stateView.remove(obj); seen.delete(obj); }
  };
  s.players.forEach(visit);
  s.npcs.forEach(visit);
}

// The direction player j (1-based) steers at tick t: bench/field_game.py `input_dir`.
function inputDir(j, t) {
  return (j * 5 + Math.floor(t / 15)) % 9;
}

module.exports = {
  BenchState, benchTick,
  FieldState, fieldJoin, fieldLeave, fieldInput, fieldTick, fieldView, inputDir,
};
