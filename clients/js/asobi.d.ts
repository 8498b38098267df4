// Types for asobi.js (the asobi WebSocket protocol client).  Protocol: docs/protocol.md.

export interface Frame<P = any> {
  type: string;
  payload: P;
  cid?: string | number;
  /** State frames of a `match.patch` chain: the frame's number in the match (handlers see
   * `match.state` frames only: the client turns each patch into the state it rebuilds). */
  seq?: number;
}

export class AsobiError extends Error {
  /** The protocol's error code (`unknown_mode`...), or `timeout`, `disconnected`,
   * `connect_failed`, `redirected` (a `session.redirect` with `followRedirects: false`),
   * `redirect_loop`. */
  code: string;
  /** The `error` frame, when the server sent one. */
  frame: Frame | null;
}

export interface AsobiOptions {
  token?: string | null;
  resumeToken?: string | null;
  /** Reconnect and resume after a drop (default true). */
  reconnect?: boolean;
  /** Cluster: follow `matchmaker.matched`, `match.moved` and `match.redirect` frames that carry `node_url` +
   * `seat_token`, and `session.redirect` frames, by reconnecting to the named node (default
   * true), and `match.moving` (a draining node) by opening a second socket to the named node
   * ahead and switching to it when the match arrives there.  A node that cannot be reached
   * sends the client back to the URL `connect()` used. */
  followRedirects?: boolean;
  requestTimeoutMs?: number;
  maxBackoffMs?: number;
  /** Ask for `match.reloaded` frames (session.connect {notify_reload: true}). */
  notifyReload?: boolean;
  /** "patch": ask for `match.patch` frames; "full": full `match.state` frames only; unset: the
   * match script decides (`state_sync`).  Patches are applied either way: `match.state`
   * handlers always get the whole state. */
  stateSync?: "patch" | "full" | null;
  /** "compact": state frames as binary MessagePack with interned keys (fewer bytes; needs
   * msgpack.js beside asobi.js, imported on first use); "json" or unset: JSON text frames.
   * Handlers get the same `match.state` events either way. */
  stateEncoding?: "json" | "compact" | null;
  /** A WebSocket implementation (default: the global one). */
  WebSocket?: typeof WebSocket;
}

export interface SessionConnected {
  player_id: string;
  resume_token: string;
  resumed: boolean;
}

export interface Matched {
  match_id: string;
  mode: string;
  players: string[];
  /** Cluster: the node that runs the match, and the seat to present there. */
  node_url?: string;
  seat_token?: string;
}

export interface Joined {
  match_id: string;
  mode: string;
  players: string[];
}

/** Cluster: `match.join` of a match that runs on another node. */
export interface MatchRedirect {
  match_id: string;
  node_id: string;
  node_url: string;
  seat_token: string;
}

/** Cluster: `session.connect` whose resume token belongs to another node. */
export interface SessionRedirect {
  node_id: string;
  node_url: string;
}

export type Handler<P = any> = (payload: P, frame: Frame<P> | null) => void;

/** `target` with an RFC 7396 JSON merge patch applied, as a new value. */
export function applyMergePatch(target: any, patch: any): any;

/** ws(s)://<this page's host>/ws. */
export function defaultUrl(): string;

export class Asobi {
  constructor(url?: string, options?: AsobiOptions);
  url: string;
  token: string | null;
  resumeToken: string | null;
  playerId: string | null;
  matchId: string | null;
  connected: boolean;

  on(type: "match.state", fn: Handler<any>): () => void;
  on(type: "matchmaker.matched", fn: Handler<Matched>): () => void;
  on(type: "session", fn: Handler<SessionConnected>): () => void;
  on(type: "close", fn: Handler<{ code: number; reason: string }>): () => void;
  on(type: "reconnecting", fn: Handler<{ attempt: number; delayMs: number }>): () => void;
  on(type: "redirect", fn: Handler<{ url: string }>): () => void;
  on(type: string, fn: Handler): () => void;

  connect(): Promise<void>;
  drop(): void;
  close(): void;
  send(type: string, payload?: object, cid?: string | number): void;
  /** Ask for a full `match.state` (at most once a second). */
  resync(): void;
  request<P = any>(type: string, payload?: object, reply?: string): Promise<P>;

  guest(): Promise<{ player_id: string; token: string }>;
  login(username: string, password: string): Promise<SessionConnected>;
  register(username: string, password: string): Promise<SessionConnected>;
  session(token: string, resumeToken?: string | null): Promise<void>;

  queue(mode: string): Promise<{ ticket_id: string; mode: string; already_queued?: boolean }>;
  matched(): Promise<Matched>;
  unqueue(ticketId: string): Promise<{ ticket_id: string; removed: boolean }>;
  input(payload: object): void;
  leave(): Promise<{ match_id: string }>;
  listMatches(mode?: string): Promise<{ matches: { match_id: string; mode: string; players: string[]; max_players: number }[] }>;
  /** Joins on the match's node, following a `match.redirect` (unless `followRedirects` is
   * false: the redirect's payload is returned). */
  join(matchId: string): Promise<Joined | MatchRedirect>;
  /** Round trip in milliseconds (session.heartbeat). */
  ping(): Promise<number>;
  /** Authenticate this connection for admin.* frames. */
  admin(token: string): Promise<{ recent: object[] }>;
}
