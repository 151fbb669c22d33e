// Yjs rooms (/yjs/{document}) with the real libraries: yjs, y-websocket's
// WebsocketProvider (unchanged, pointed at ws://HOST:PORT/yjs) and ws.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import * as Y from "yjs";
import { WebsocketProvider } from "y-websocket";
import WebSocket from "ws";
import { startRelay, waitFor, sleep, tempDir, cleanup, jwt } from "./support.js";
import { startRedis } from "../test-support/redis.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

// disableBc: providers of one room in one process would otherwise also talk over a
// BroadcastChannel, and a test would pass without the relay.
function provider(relay, room, token, doc = new Y.Doc()) {
  const p = new WebsocketProvider(`${relay.url}/yjs`, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true, params: token === null ? {} : { token } });
  cleanups.push(async () => {
    p.destroy();
    p.awareness.destroy();
    doc.destroy();
  });
  return { p, doc, text: doc.getText("t") };
}

const synced = (p) => (p.synced ? Promise.resolve() : new Promise((r) => p.once("sync", (s) => s && r())));

test("two providers edit one Y.Text concurrently and converge; a late one receives everything", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  const a = provider(relay, "notes", "ada");
  const b = provider(relay, "notes", "bob");
  await Promise.all([synced(a.p), synced(b.p)]);
  // Concurrent edits: each types 50 inserts at the start without waiting.
  for (let i = 0; i < 50; i++) {
    a.text.insert(0, "a");
    b.text.insert(0, "b");
  }
  await waitFor(() => a.text.length === 100 && b.text.length === 100, 10000, "both have every insert");
  assert.equal(a.text.toString(), b.text.toString(), "converged");
  assert.equal([...a.text.toString()].filter((c) => c === "a").length, 50);
  const c = provider(relay, "notes", "cy");
  await synced(c.p);
  await waitFor(() => c.text.length === 100, 5000, "the late provider has the document");
  assert.equal(c.text.toString(), a.text.toString());
  // And goes on live.
  c.text.insert(0, "!");
  await waitFor(() => a.text.toString().startsWith("!") && b.text.toString().startsWith("!"), 5000, "c's edit everywhere");
  // Rooms are separate.
  const other = provider(relay, "elsewhere", "dee");
  await synced(other.p);
  assert.equal(other.text.length, 0);
});

test("awareness appears on the others and is removed when its provider disconnects", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  const a = provider(relay, "aw", "ada");
  a.p.awareness.setLocalStateField("user", { name: "Ada", color: "#d62728" });
  await synced(a.p);
  const b = provider(relay, "aw", "bob");
  await synced(b.p);
  const seenByB = () => [...b.p.awareness.getStates().values()].map((s) => s.user && s.user.name).filter(Boolean);
  await waitFor(() => seenByB().includes("Ada"), 5000, "b sees Ada's awareness (held by the relay for late joiners)");
  b.p.awareness.setLocalStateField("user", { name: "Bob" });
  await waitFor(() => [...a.p.awareness.getStates().values()].some((s) => s.user && s.user.name === "Bob"), 5000, "a sees Bob");
  // a's connection ends without its provider saying goodbye (the socket is cut):
  // the relay removes its awareness for the others.
  a.p.shouldConnect = false;
  a.p.ws.terminate();
  await waitFor(() => !seenByB().includes("Ada"), 5000, "Ada's cursor is gone on b");
});

test("a missing or bad token is refused while validating (4001), before any Yjs message", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  for (const path of ["/yjs/room", "/yjs/room?token="]) {
    const code = await new Promise((resolve) => {
      const ws = new WebSocket(`${relay.url}${path}`);
      ws.on("message", () => resolve("message"));
      ws.on("close", (c) => resolve(c));
      ws.on("error", () => {});
    });
    assert.equal(code, 4001, path);
  }
});

test("a garbage update is refused and never reaches the others; the room goes on", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  const a = provider(relay, "g", "ada");
  await synced(a.p);
  a.text.insert(0, "hello");
  const raw = new WebSocket(`${relay.url}/yjs/g?token=mallory`);
  const got = [];
  raw.on("message", (m) => got.push(Buffer.from(m)));
  await new Promise((r) => raw.on("open", r));
  await waitFor(() => got.length >= 1, 5000, "the relay's sync step 1");
  // A sync "update" (0, 2) whose payload is not a Yjs update.
  raw.send(Buffer.from([0, 2, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]));
  await waitFor(() => got.some((m) => m[0] === 2), 5000, "an auth (permission denied) message names the refusal");
  const denial = got.find((m) => m[0] === 2);
  assert.equal(denial[1], 0, "permission denied");
  // a still works and has only its own text.
  a.text.insert(5, " world");
  const b = provider(relay, "g", "bob");
  await synced(b.p);
  await waitFor(() => b.text.toString() === "hello world", 5000, "b has the document, without the garbage");
  assert.equal(a.text.toString(), "hello world");
  raw.close();
});

test("kill -9 and a restart keep the document; the providers reconnect and go on", async () => {
  const dir = tempDir();
  cleanups.push(() => cleanup(dir));
  const config = `[storage]\ndir = "${dir}/wal"\n`;
  let relay = await startRelay({ config, dir });
  cleanups.push(() => relay.kill());
  const a = provider(relay, "durable", "ada");
  const b = provider(relay, "durable", "bob");
  await Promise.all([synced(a.p), synced(b.p)]);
  for (let i = 0; i < 100; i++) a.text.insert(a.text.length, `line ${i}\n`);
  // The relay passes an update on once it is stored: b has them all, so has the log.
  await waitFor(() => b.text.toString() === a.text.toString(), 10000, "b has a's 100 inserts");
  const before = a.text.toString();
  await relay.kill();
  relay = await startRelay({ config, dir, listen: `127.0.0.1:${relay.port}` });
  // A provider with an empty document gets the whole of it.
  const c = provider(relay, "durable", "cy");
  await synced(c.p);
  await waitFor(() => c.text.toString() === before, 10000, "the new provider has the document after kill -9");
  // The old providers reconnected by themselves, and edit on.
  await waitFor(() => a.p.wsconnected && b.p.wsconnected, 15000, "a and b reconnected");
  a.text.insert(0, "after\n");
  await waitFor(() => c.text.toString().startsWith("after\n") && b.text.toString() === c.text.toString(), 10000, "a's edit after the restart");
});

test("a read-only token receives the document and awareness but cannot change the document", async () => {
  const secret = "node-yjs-secret";
  const relay = await startRelay({ config: `[auth]\nmode = "jwt"\njwt_secret = "${secret}"\n` });
  cleanups.push(() => relay.kill());
  const exp = Math.floor(Date.now() / 1000) + 600;
  const a = provider(relay, "ro", jwt(secret, { sub: "ada", exp }));
  await synced(a.p);
  a.text.insert(0, "by ada");
  const r = provider(relay, "ro", jwt(secret, { sub: "rita", exp, mode: "read" }));
  await synced(r.p);
  await waitFor(() => r.text.toString() === "by ada", 5000, "the reader has the document");
  r.text.insert(0, "rita was here ");
  a.text.insert(6, "!");
  await waitFor(() => r.text.toString().endsWith("by ada!"), 5000, "the reader goes on receiving");
  // A third provider: the relay's document has no trace of the reader's insert.
  const c = provider(relay, "ro", jwt(secret, { sub: "cy", exp }));
  await synced(c.p);
  await waitFor(() => c.text.toString() === "by ada!", 5000, "the relay's document is unchanged by the reader");
  await sleep(300);
  assert.equal(a.text.toString(), "by ada!", "the reader's insert never reached a");
});

test("two relays on one Redis serve one document", async () => {
  const redis = await startRedis();
  cleanups.push(() => redis.cleanup());
  const node = (name) => startRelay({ config: `[cluster]\nredis_url = "${redis.url}"\nnode_id = "${name}"\n` });
  const [r1, r2] = await Promise.all([node("n1"), node("n2")]);
  cleanups.push(() => r1.kill(), () => r2.kill());
  const a = provider(r1, "shared", "ada");
  const b = provider(r2, "shared", "bob");
  await Promise.all([synced(a.p), synced(b.p)]);
  for (let i = 0; i < 40; i++) {
    a.text.insert(0, "a");
    b.text.insert(0, "b");
  }
  await waitFor(() => a.text.length === 80 && b.text.length === 80, 10000, "each has both relays' inserts");
  assert.equal(a.text.toString(), b.text.toString(), "converged across relays");
  a.p.awareness.setLocalStateField("user", { name: "Ada" });
  await waitFor(() => [...b.p.awareness.getStates().values()].some((s) => s.user && s.user.name === "Ada"), 5000, "Ada's awareness on the other relay");
  // A late provider on either relay has everything.
  const c = provider(r2, "shared", "cy");
  const d = provider(r1, "shared", "dee");
  await Promise.all([synced(c.p), synced(d.p)]);
  await waitFor(() => c.text.toString() === a.text.toString() && d.text.toString() === a.text.toString(), 5000, "late providers");
  // a's connection is cut: its awareness disappears on the other relay too.
  a.p.shouldConnect = false;
  a.p.ws.terminate();
  await waitFor(() => ![...c.p.awareness.getStates().values()].some((s) => s.user && s.user.name === "Ada"), 5000, "Ada gone on relay 2");
});
