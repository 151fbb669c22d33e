// docrelay-client: a dependency-free client for the docrelay WebSocket relay.
// Works in browsers and in Node.js 20+ (pass a WebSocket constructor, or run
// Node with a global WebSocket: Node 22+, or Node 20 with --experimental-websocket).
// The wire contract is docs/protocol.md of the docrelay repository.

/** Defaults of the reconnection backoff, in milliseconds. */
export const DEFAULT_BACKOFF = Object.freeze({ initial: 250, max: 10000, factor: 2, jitter: 0.5 });

/** Bounds every backoff option must respect (checked by normalizeBackoff). */
const BACKOFF_LIMITS = Object.freeze({ maxDelay: 300000, maxFactor: 10 });

/**
 * Validates and completes backoff options. Throws a RangeError on a value out of bounds:
 * 1 <= initial <= max <= 300000, 1 <= factor <= 10, 0 <= jitter <= 1.
 */
export function normalizeBackoff(options = {}) {
  const b = { ...DEFAULT_BACKOFF, ...(options || {}) };
  const num = (k) => {
    if (typeof b[k] !== "number" || !Number.isFinite(b[k])) throw new RangeError(`backoff.${k} must be a finite number`);
  };
  ["initial", "max", "factor", "jitter"].forEach(num);
  if (b.initial < 1) throw new RangeError("backoff.initial must be at least 1 ms");
  if (b.max < b.initial) throw new RangeError("backoff.max must be at least backoff.initial");
  if (b.max > BACKOFF_LIMITS.maxDelay) throw new RangeError(`backoff.max must be at most ${BACKOFF_LIMITS.maxDelay} ms`);
  if (b.factor < 1 || b.factor > BACKOFF_LIMITS.maxFactor) throw new RangeError(`backoff.factor must be between 1 and ${BACKOFF_LIMITS.maxFactor}`);
  if (b.jitter < 0 || b.jitter > 1) throw new RangeError("backoff.jitter must be between 0 and 1");
  return { initial: b.initial, max: b.max, factor: b.factor, jitter: b.jitter };
}

/**
 * The delay before reconnection attempt `attempt` (0 for the first retry):
 * base = min(max, initial * factor^attempt), then "equal jitter" downwards:
 * delay = base * (1 - jitter * random()), so that base * (1 - jitter) <= delay <= base <= max.
 */
export function backoffDelay(attempt, options = DEFAULT_BACKOFF, random = Math.random) {
  const b = normalizeBackoff(options);
  const n = Math.max(0, Math.floor(Number(attempt) || 0));
  const base = Math.min(b.max, b.initial * Math.pow(b.factor, Math.min(n, 1000)));
  let r = Number(random());
  if (!(r >= 0)) r = 0;
  if (r > 1) r = 1;
  return Math.max(0, Math.min(b.max, base * (1 - b.jitter * r)));
}

/** Close codes after which the client does not reconnect (section 9 of the protocol). */
const RETRYABLE_4XXX = new Set([4008, 4029]);

function isFatalClose(code) {
  return code >= 4000 && code <= 4999 && !RETRYABLE_4XXX.has(code);
}

function errorOf(code, message, extra) {
  const e = new Error(message);
  e.code = code;
  if (extra) Object.assign(e, extra);
  return e;
}

function randomId() {
  try {
    const a = new Uint32Array(2);
    globalThis.crypto.getRandomValues(a);
    return a[0].toString(36) + a[1].toString(36);
  } catch {
    return Math.random().toString(36).slice(2) + Date.now().toString(36);
  }
}

const decoder = typeof TextDecoder !== "undefined" ? new TextDecoder() : null;

function documentUrl(base, documentId, color) {
  let u = String(base).replace(/\/+$/, "");
  u += "/ws/documents/" + documentId;
  if (color) u += "?color=" + encodeURIComponent(String(color));
  return u;
}

export class DocRelayClient {
  constructor(options = {}) {
    const { url, document: documentId, token, color, since, backoff } = options;
    const urls = Array.isArray(url) ? url.slice() : [url];
    if (urls.length === 0 || urls.some((u) => typeof u !== "string" || u === "")) {
      throw new TypeError("url must be a non-empty string or a non-empty array of strings");
    }
    if (typeof documentId !== "string" || !/^[A-Za-z0-9._~:-]{1,128}$/.test(documentId)) {
      throw new TypeError("document must be 1 to 128 characters of A-Z a-z 0-9 . _ ~ : -");
    }
    if (typeof token !== "string" && typeof token !== "function") {
      throw new TypeError("token must be a string or a function returning one");
    }
    if (since !== undefined && since !== null && !(Number.isSafeInteger(since) && since >= 0)) {
      throw new TypeError("since must be a non-negative integer");
    }
    const WS = options.WebSocket || globalThis.WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError("no WebSocket constructor: pass options.WebSocket (Node 20: run with --experimental-websocket)");
    }
    this._urls = urls;
    this._document = documentId;
    this._token = token;
    this._color = color || null;
    this._since = since ?? null;
    this._WS = WS;
    this._backoff = normalizeBackoff(backoff);
    this._random = typeof options.random === "function" ? options.random : Math.random;

    this._listeners = new Map();
    this._status = "idle";
    this._closed = false;
    this._ws = null;
    this._attempt = 0; // failed attempts since the last successful join
    this._urlIndex = 0;
    this._timer = null;
    this._idPrefix = randomId();
    this._idCounter = 0;

    // Document state.
    this._seq = 0; // last seq applied (own acked operations included)
    this._epoch = null;
    this._participants = new Map();
    this._held = new Map(); // others' operations received ahead of _seq + 1
    this._ownAcked = new Set(); // own acked seqs not yet reached by _seq
    this._syncing = false; // a sync (join with since, or sync_request) is outstanding
    this._resyncWanted = false;
    this._skipGap = false; // a gap the relay cannot fill (HISTORY_UNAVAILABLE): skip it
    this._expectEpochChanged = false;

    // Per-connection state.
    this._joined = false;
    this._catchingUp = false;
    this._authenticated = false;
    this._fatal = null;
    this._joinedInfo = null;
    this._pendingOps = new Map(); // client_op_id -> {resolve, reject}
    this._pendingSnapshots = []; // FIFO of {resolve, reject, seq}

    this._connectPromise = null;
    this._connectResolve = null;
    this._connectReject = null;
  }

  // ---- events ----

  /** Adds a listener; returns a function that removes it. */
  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const s = this._listeners.get(event);
    if (s) s.delete(fn);
  }

  _emit(event, value) {
    const s = this._listeners.get(event);
    if (!s) return;
    for (const fn of [...s]) {
      try {
        fn(value);
      } catch (e) {
        // A listener's exception must not break the client's state machine.
        if (typeof console !== "undefined") console.error(`docrelay-client: "${event}" listener threw`, e);
      }
    }
  }

  _setSyncing(active) {
    if (this._syncing === active) return;
    this._syncing = active;
    this._emit("sync", { active, seq: this._seq });
  }

  _setStatus(s) {
    if (this._status === s) return;
    this._status = s;
    this._emit("status", s);
  }

  // ---- public state ----

  get seq() {
    return this._seq;
  }
  get epoch() {
    return this._epoch;
  }
  get participants() {
    return [...this._participants.values()].map((p) => ({ ...p }));
  }
  get status() {
    return this._status;
  }
  /** True while the client is catching up (a resume, a `lagged` recovery, a reload). */
  get syncing() {
    return this._syncing;
  }
  get connectionId() {
    return this._joinedInfo ? this._joinedInfo.connection_id : null;
  }

  // ---- public API ----

  /**
   * Connects, authenticates and joins. Resolves with the joined_document fields
   * ({document_id, seq, epoch, participants, participant_count, connection_id, user_id})
   * once joined and caught up. A relay that cannot be reached is retried with backoff;
   * rejects on an authentication failure or close().
   */
  connect() {
    if (this._closed) return Promise.reject(errorOf("CLOSED", "the client is closed"));
    if (this._connectPromise) return this._connectPromise;
    this._connectPromise = new Promise((resolve, reject) => {
      this._connectResolve = resolve;
      this._connectReject = reject;
    });
    this._setStatus("connecting");
    this._open();
    return this._connectPromise;
  }

  /**
   * Sends an operation. Resolves with {seq} on its ack; rejects with an Error whose
   * `code` is the relay's error code (RATE_LIMITED, UNAVAILABLE, ...), or
   * NOT_CONNECTED (not joined right now: nothing was sent), or CONNECTION_CLOSED
   * (the connection ended before the ack: the operation may or may not have been applied).
   */
  send(payload) {
    if (this._closed) return Promise.reject(errorOf("CLOSED", "the client is closed"));
    if (!this._joined || !this._ws) {
      return Promise.reject(errorOf("NOT_CONNECTED", "not connected to the relay: the operation was not sent"));
    }
    if (payload === undefined) return Promise.reject(new TypeError("payload must be a JSON value"));
    const id = `${this._idPrefix}-${++this._idCounter}`;
    let text;
    try {
      text = JSON.stringify({ type: "operation", client_op_id: id, payload });
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise((resolve, reject) => {
      this._pendingOps.set(id, { resolve, reject });
      this._rawSend(text);
    });
  }

  /** Sends a cursor update (no reply). Returns false when not connected (nothing sent). */
  cursor(payload) {
    if (this._closed || !this._joined || !this._ws) return false;
    this._rawSend(JSON.stringify({ type: "cursor", payload }));
    return true;
  }

  /** Stores a snapshot of the document's state after `seq`. Resolves with {seq} on its ack. */
  snapshot(seq, state) {
    if (this._closed) return Promise.reject(errorOf("CLOSED", "the client is closed"));
    if (!this._joined || !this._ws) {
      return Promise.reject(errorOf("NOT_CONNECTED", "not connected to the relay: the snapshot was not sent"));
    }
    if (!(Number.isSafeInteger(seq) && seq >= 0)) return Promise.reject(new TypeError("seq must be a non-negative integer"));
    const text = JSON.stringify({ type: "snapshot", seq, state });
    return new Promise((resolve, reject) => {
      this._pendingSnapshots.push({ resolve, reject, seq });
      this._rawSend(text);
    });
  }

  /** Closes the client for good: no reconnection; pending sends are rejected. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    this._timer = null;
    const ws = this._ws;
    this._ws = null;
    this._joined = false;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* ignore */
      }
    }
    this._failPending(errorOf("CONNECTION_CLOSED", "the client was closed before the reply arrived"));
    this._rejectConnect(errorOf("CLOSED", "the client was closed"));
    this._setStatus("closed");
  }

  // ---- connection ----

  async _open() {
    if (this._closed) return;
    const url = this._urls[this._urlIndex % this._urls.length];
    this._urlIndex = (this._urlIndex + 1) % this._urls.length;
    let token;
    try {
      token = typeof this._token === "function" ? await this._token() : this._token;
    } catch (e) {
      this._emit("error", { code: "TOKEN_ERROR", message: `the token function failed: ${e && e.message ? e.message : e}` });
      this._scheduleReconnect();
      return;
    }
    if (this._closed) return;
    if (typeof token !== "string") {
      this._fail({ code: "TOKEN_ERROR", message: "the token function did not return a string" });
      return;
    }
    let ws;
    try {
      ws = new this._WS(documentUrl(url, this._document, this._color));
    } catch (e) {
      this._emit("error", { code: "CONNECT_FAILED", message: String(e && e.message ? e.message : e) });
      this._scheduleReconnect();
      return;
    }
    try {
      ws.binaryType = "arraybuffer";
    } catch {
      /* not supported: fine for libraries that hand out strings or Buffers */
    }
    this._ws = ws;
    this._joined = false;
    this._authenticated = false;
    this._catchingUp = false;
    this._fatal = null;
    ws.onopen = () => {
      if (ws !== this._ws) return;
      this._rawSend(JSON.stringify({ type: "authenticate", token }));
    };
    ws.onmessage = (ev) => {
      if (ws !== this._ws) return;
      let text = ev.data;
      if (typeof text !== "string") {
        if (text instanceof ArrayBuffer) text = decoder.decode(new Uint8Array(text));
        else if (ArrayBuffer.isView(text)) text = decoder.decode(text);
        else text = String(text);
      }
      let msg;
      try {
        msg = JSON.parse(text);
      } catch {
        this._emit("error", { code: "BAD_RELAY_MESSAGE", message: "the relay sent a message that is not JSON" });
        return;
      }
      this._handle(msg);
    };
    ws.onerror = () => {
      // A failed connection. Some implementations (Node 20's experimental WebSocket) fire
      // no close event after a refused connection, so the error ends the attempt here.
      if (ws !== this._ws) return;
      this._onClose(1006, "connection failed"); // forgets ws first: its later events are ignored
      try {
        ws.close(); // may fire another error synchronously (Node 20): ignored, ws is not current
      } catch {
        /* ignore */
      }
    };
    ws.onclose = (ev) => {
      if (ws !== this._ws) return;
      this._onClose(ev && typeof ev.code === "number" ? ev.code : 1006, ev && ev.reason ? String(ev.reason) : "");
    };
  }

  _rawSend(text) {
    try {
      this._ws.send(text);
    } catch {
      /* the close event follows */
    }
  }

  _onClose(code, reason) {
    const wasAuthenticated = this._authenticated;
    this._ws = null;
    this._joined = false;
    this._catchingUp = false;
    this._setSyncing(false);
    this._resyncWanted = false;
    this._expectEpochChanged = false;
    this._participants.clear();
    this._failPending(errorOf("CONNECTION_CLOSED", `the connection closed (${code}) before the reply arrived: the request may or may not have been applied`));
    if (this._closed) return;
    if (this._fatal) {
      this._fail(this._fatal);
      return;
    }
    // A session whose JWT expired (4001 after a successful authenticate) may come back
    // with a fresh token when the token is a function; anything else 4xxx is final.
    const expired = code === 4001 && wasAuthenticated && typeof this._token === "function";
    if (isFatalClose(code) && !expired) {
      this._fail({ code: code === 4003 ? "FORBIDDEN" : code === 4001 ? "AUTH_FAILED" : "CLOSED_BY_RELAY", message: `the relay closed the connection with ${code}${reason ? ` (${reason})` : ""}`, closeCode: code });
      return;
    }
    this._scheduleReconnect();
  }

  _scheduleReconnect() {
    if (this._closed) return;
    this._setStatus("reconnecting");
    const delay = backoffDelay(this._attempt++, this._backoff, this._random);
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      this._timer = null;
      this._open();
    }, delay);
  }

  _fail(err) {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* ignore */
      }
    }
    this._joined = false;
    this._emit("error", { code: err.code, message: err.message });
    this._failPending(errorOf("CONNECTION_CLOSED", "the client closed: " + err.message));
    this._rejectConnect(errorOf(err.code, err.message));
    this._setStatus("closed");
  }

  _failPending(err) {
    const ops = [...this._pendingOps.values()];
    this._pendingOps.clear();
    const snaps = this._pendingSnapshots;
    this._pendingSnapshots = [];
    for (const p of ops) p.reject(errorOf(err.code, err.message));
    for (const p of snaps) p.reject(errorOf(err.code, err.message));
  }

  _rejectConnect(err) {
    if (this._connectReject) {
      const rej = this._connectReject;
      this._connectResolve = this._connectReject = null;
      this._connectPromise.catch(() => {});
      rej(err);
    }
  }

  // ---- messages ----

  _handle(msg) {
    switch (msg.type) {
      case "auth_result":
        return this._onAuthResult(msg);
      case "joined_document":
        return this._onJoined(msg);
      case "participants":
        for (const p of msg.participants || []) this._participants.set(p.connection_id, { ...p });
        if (msg.next_after !== null && msg.next_after !== undefined) {
          this._rawSend(JSON.stringify({ type: "list_participants", after: msg.next_after }));
        }
        return;
      case "ack":
        return this._onAck(msg);
      case "operation":
        this._offer(msg);
        return this._drain();
      case "sync_response":
        return this._onSyncResponse(msg);
      case "lagged":
        if (this._syncing) this._resyncWanted = true;
        else this._startSync(this._seq);
        return;
      case "cursor":
        return this._emit("presence", msg);
      case "user_joined":
        this._participants.set(msg.connection_id, {
          connection_id: msg.connection_id,
          user_id: msg.user_id,
          user_name: msg.user_name,
          color: msg.color,
        });
        return this._emit("presence", msg);
      case "user_left":
        this._participants.delete(msg.connection_id);
        return this._emit("presence", msg);
      case "error":
        return this._onError(msg);
      default:
        return; // pong, left_document, unknown future messages
    }
  }

  _onAuthResult(msg) {
    if (!msg.success) {
      const e = msg.error || {};
      // The relay closes with 4001/4003 next; the close handler reports this.
      this._fatal = { code: e.code || "AUTH_FAILED", message: e.message || "authentication failed" };
      return;
    }
    this._authenticated = true;
    this._authInfo = msg;
    const join = { type: "join_document" };
    if (this._epoch !== null) {
      // A reconnect: resume after the last applied seq of our epoch.
      join.since = this._seq;
      join.epoch = this._epoch;
      this._setSyncing(true);
    } else if (this._since !== null) {
      join.since = this._since;
      this._seq = this._since;
      this._setSyncing(true);
    }
    this._rawSend(JSON.stringify(join));
  }

  _onJoined(msg) {
    this._joined = true;
    this._participants.clear();
    for (const p of msg.participants || []) this._participants.set(p.connection_id, { ...p });
    const listed = (msg.participants || []).length;
    if (msg.participant_count > listed && listed > 0) {
      const last = msg.participants[listed - 1].connection_id;
      this._rawSend(JSON.stringify({ type: "list_participants", after: last }));
    }
    this._joinedInfo = {
      document_id: msg.document_id,
      seq: msg.seq,
      epoch: msg.epoch,
      participants: this.participants,
      participant_count: msg.participant_count,
      connection_id: this._authInfo ? this._authInfo.connection_id : null,
      user_id: this._authInfo ? this._authInfo.user_id : null,
    };
    if (this._epoch === null) {
      this._epoch = msg.epoch;
      if (!this._syncing) this._seq = msg.seq; // first connect: no replay
    } else if (msg.epoch !== this._epoch) {
      // A new history: EPOCH_CHANGED follows in place of the sync_response.
      this._reset(msg.epoch);
      this._expectEpochChanged = true;
      this._setSyncing(true);
    }
    if (this._syncing) this._catchingUp = true;
    else this._caughtUp();
  }

  _caughtUp() {
    this._catchingUp = false;
    this._attempt = 0;
    this._setStatus("connected");
    if (this._connectResolve) {
      const res = this._connectResolve;
      this._connectResolve = this._connectReject = null;
      res(this._joinedInfo);
    }
  }

  _onAck(msg) {
    if (msg.client_op_id !== undefined && msg.client_op_id !== null) {
      const p = this._pendingOps.get(String(msg.client_op_id));
      if (!p) return;
      this._pendingOps.delete(String(msg.client_op_id));
      if (msg.seq > this._seq) this._ownAcked.add(msg.seq);
      this._drain();
      p.resolve({ seq: msg.seq });
      return;
    }
    // Every operation carries a client_op_id, so an ack without one is a snapshot's.
    const s = this._pendingSnapshots.shift();
    if (s) s.resolve({ seq: msg.seq });
  }

  _onError(msg) {
    const code = msg.code;
    if (msg.client_op_id !== undefined && msg.client_op_id !== null) {
      const p = this._pendingOps.get(String(msg.client_op_id));
      if (p) {
        this._pendingOps.delete(String(msg.client_op_id));
        p.reject(errorOf(code, msg.message, { clientOpId: msg.client_op_id }));
        return;
      }
    }
    if (code === "EPOCH_CHANGED") {
      if (!(this._expectEpochChanged && msg.epoch === this._epoch)) this._reset(msg.epoch);
      this._expectEpochChanged = false;
      this._resyncWanted = false;
      this._startSync(0);
      return;
    }
    if (code === "HISTORY_UNAVAILABLE" && this._syncing) {
      // The missed operations are gone from the relay: report it, and go on from the
      // next operation that arrives.
      this._setSyncing(false);
      this._resyncWanted = false;
      this._skipGap = true;
      this._emit("error", { code, message: msg.message });
      this._drain();
      if (this._catchingUp) this._caughtUp();
      return;
    }
    if (this._pendingSnapshots.length > 0 && ["BAD_SNAPSHOT", "UNAVAILABLE", "BAD_MESSAGE", "NOT_JOINED"].includes(code)) {
      const s = this._pendingSnapshots.shift();
      s.reject(errorOf(code, msg.message));
      return;
    }
    this._emit("error", { code, message: msg.message });
  }

  _reset(epoch) {
    this._epoch = epoch;
    this._seq = 0;
    this._held.clear();
    this._ownAcked.clear();
    this._skipGap = false;
    this._emit("reset", { epoch });
  }

  _startSync(since) {
    this._setSyncing(true);
    this._resyncWanted = false;
    const m = { type: "sync_request", since };
    if (this._epoch !== null) m.epoch = this._epoch;
    this._rawSend(JSON.stringify(m));
  }

  _onSyncResponse(msg) {
    if (msg.epoch && this._epoch === null) this._epoch = msg.epoch;
    if (msg.snapshot && msg.snapshot.seq > this._seq) {
      const s = msg.snapshot.seq;
      this._seq = s;
      for (const k of this._held.keys()) if (k <= s) this._held.delete(k);
      for (const k of this._ownAcked) if (k <= s) this._ownAcked.delete(k);
      this._emit("snapshot", { seq: s, state: msg.snapshot.state });
    }
    const ops = msg.ops || [];
    for (const op of ops) this._offer(op);
    this._drain();
    if (msg.more && ops.length > 0) {
      const m = { type: "sync_request", since: ops[ops.length - 1].seq };
      if (this._epoch !== null) m.epoch = this._epoch;
      this._rawSend(JSON.stringify(m));
      return;
    }
    if (this._resyncWanted) {
      this._startSync(this._seq); // still syncing: no "sync" event
      return;
    }
    this._setSyncing(false);
    if (this._catchingUp) this._caughtUp();
  }

  // ---- ordering: each seq once, in order ----

  _offer(op) {
    if (typeof op.seq !== "number" || op.seq <= this._seq) return; // applied already
    if (!this._held.has(op.seq)) this._held.set(op.seq, op);
  }

  _drain() {
    for (;;) {
      const next = this._seq + 1;
      if (this._ownAcked.has(next)) {
        this._ownAcked.delete(next);
        this._held.delete(next); // our own operation, seen again in a sync_response
        this._seq = next;
        continue;
      }
      const op = this._held.get(next);
      if (op) {
        this._held.delete(next);
        this._seq = next;
        this._emit("operation", { seq: op.seq, connection_id: op.connection_id, user_id: op.user_id, payload: op.payload });
        continue;
      }
      if (this._skipGap && !this._syncing && (this._held.size > 0 || this._ownAcked.size > 0)) {
        const lowest = Math.min(...this._held.keys(), ...this._ownAcked);
        this._seq = lowest - 1;
        this._skipGap = false;
        continue;
      }
      return;
    }
  }
}

export default DocRelayClient;
