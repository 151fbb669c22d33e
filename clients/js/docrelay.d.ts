// TypeScript declarations for docrelay-client (docrelay.js).

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };

export interface BackoffOptions {
  /** First retry delay in ms (default 250; at least 1). */
  initial?: number;
  /** Largest delay in ms (default 10000; at least `initial`, at most 300000). */
  max?: number;
  /** Growth per attempt (default 2; 1 to 10). */
  factor?: number;
  /** Fraction of the delay taken off at random (default 0.5; 0 to 1). */
  jitter?: number;
}

export interface WebSocketLike {
  binaryType?: string;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface DocRelayClientOptions {
  /** Relay base URL (ws:// or wss://), or several, tried in turn; the client adds /ws/documents/{document}. */
  url: string | string[];
  /** Document id: 1 to 128 characters of A-Z a-z 0-9 . _ ~ : - */
  document: string;
  /** The token for `authenticate`, or a function returning it (called on every connection attempt). */
  token: string | (() => string | Promise<string>);
  /** Cursor colour, "#rrggbb" (the relay's `color` query parameter). */
  color?: string;
  /** WebSocket constructor; defaults to globalThis.WebSocket. */
  WebSocket?: WebSocketConstructor;
  /** Replay the operations after this seq on the first connect (default: no replay). */
  since?: number;
  /** Reconnection backoff. */
  backoff?: BackoffOptions;
  /** Random source for the jitter (tests), default Math.random. */
  random?: () => number;
}

export interface Participant {
  connection_id: number;
  user_id: string;
  user_name: string;
  color: string;
}

export interface Operation {
  seq: number;
  connection_id: number;
  user_id: string;
  payload: JsonValue;
}

export type PresenceEvent =
  | { type: "cursor"; connection_id: number; user_id: string; color: string; payload: JsonValue }
  | { type: "user_joined"; connection_id: number; user_id: string; user_name: string; color: string }
  | { type: "user_left"; connection_id: number; user_id: string };

export type Status = "connecting" | "connected" | "reconnecting" | "closed";

export interface ClientErrorEvent {
  code: string;
  message: string;
}

export interface SnapshotEvent {
  seq: number;
  state: JsonValue;
}

export interface ResetEvent {
  epoch: string;
}

/** A catch-up began (`active`) or ended: a resume, a `lagged` recovery, a reload after `reset`. */
export interface SyncEvent {
  active: boolean;
  /** `client.seq` when it began or ended. */
  seq: number;
}

export interface Joined {
  document_id: string;
  seq: number;
  epoch: string;
  participants: Participant[];
  participant_count: number;
  connection_id: number | null;
  user_id: string | null;
}

/** Rejection of send()/snapshot()/connect(): `code` is the relay's error code or one of the client's own. */
export interface DocRelayError extends Error {
  /** e.g. RATE_LIMITED, UNAVAILABLE, BAD_SNAPSHOT, AUTH_FAILED, FORBIDDEN, NOT_CONNECTED, CONNECTION_CLOSED, CLOSED */
  code: string;
  /** For an operation's error: the client_op_id the relay echoed. */
  clientOpId?: string | number;
}

export interface EventMap {
  operation: Operation;
  presence: PresenceEvent;
  status: Status;
  error: ClientErrorEvent;
  snapshot: SnapshotEvent;
  reset: ResetEvent;
  sync: SyncEvent;
}

export declare const DEFAULT_BACKOFF: Readonly<Required<BackoffOptions>>;
export declare function normalizeBackoff(options?: BackoffOptions): Required<BackoffOptions>;
/** Delay before retry `attempt` (0-based): min(max, initial*factor^attempt) * (1 - jitter*random()). */
export declare function backoffDelay(attempt: number, options?: BackoffOptions, random?: () => number): number;

export declare class DocRelayClient {
  constructor(options: DocRelayClientOptions);
  on<K extends keyof EventMap>(event: K, listener: (value: EventMap[K]) => void): () => void;
  off<K extends keyof EventMap>(event: K, listener: (value: EventMap[K]) => void): void;
  connect(): Promise<Joined>;
  send(payload: JsonValue): Promise<{ seq: number }>;
  cursor(payload: JsonValue): boolean;
  snapshot(seq: number, state: JsonValue): Promise<{ seq: number }>;
  close(): void;
  readonly participants: Participant[];
  readonly seq: number;
  readonly epoch: string | null;
  readonly status: Status | "idle";
  readonly connectionId: number | null;
  /** True while catching up (see the "sync" event). */
  readonly syncing: boolean;
}

export default DocRelayClient;
