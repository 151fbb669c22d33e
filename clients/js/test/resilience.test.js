import { test } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { DocRelayClient } from "../docrelay.js";
import { startRelay, waitFor, sleep, tempDir, cleanup, metric, cleanups, jwt } from "../test-support/helpers.js";

const { track, relayTracked, onExit } = cleanups();

test("send() is rejected with the relay's error, matched by client_op_id (RATE_LIMITED)", async () => {
  const relay = relayTracked(await startRelay({ config: "[limits]\nmax_ops_per_sec = 3\nrate_limit_grace_ms = 60000\n" }));
  const a = track(new DocRelayClient({ url: relay.url, document: "rl", token: "ada" }));
  await a.connect();
  const settled = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => a.send({ i })));
  const ok = settled.filter((s) => s.status === "fulfilled").map((s) => s.value.seq);
  const bad = settled.filter((s) => s.status === "rejected").map((s) => s.reason);
  assert.deepEqual(ok, [1, 2, 3]);
  assert.equal(bad.length, 5);
  for (const e of bad) {
    assert.equal(e.code, "RATE_LIMITED");
    assert.equal(typeof e.clientOpId, "string");
  }
  assert.equal(new Set(bad.map((e) => e.clientOpId)).size, 5, "each rejection names its own operation");
  assert.equal(a.status, "connected");
  assert.equal(a.seq, 3);
  a.close();
  await relay.stop();
});

test("a restarted memory-only relay is a new epoch: `reset`, then the new history once", async () => {
  let relay = relayTracked(await startRelay());
  const port = relay.port;
  const backoff = { initial: 300, max: 300, jitter: 0 };
  const a = track(new DocRelayClient({ url: relay.url, document: "ep", token: "ada", backoff }));
  const b = track(new DocRelayClient({ url: relay.url, document: "ep", token: "bob", backoff: { initial: 20, max: 100 } }));
  const ops = [], resets = [], statuses = [];
  a.on("operation", (op) => ops.push(op.seq));
  a.on("reset", (r) => resets.push(r));
  a.on("status", (s) => statuses.push(s));
  await a.connect();
  await b.connect();
  for (let i = 0; i < 3; i++) await b.send(i);
  await waitFor(() => ops.length === 3, 3000, "3 ops");
  const oldEpoch = a.epoch;
  await relay.kill();
  await waitFor(() => a.status === "reconnecting", 3000, "reconnecting");
  // Sends while disconnected are rejected at once, not queued.
  await assert.rejects(a.send("while away"), (e) => e.code === "NOT_CONNECTED");
  assert.equal(a.cursor({ at: 1 }), false);
  relay = relayTracked(await startRelay({ listen: `127.0.0.1:${port}` }));
  // A third client writes into the new history, possibly before `a` is back.
  const c = track(new DocRelayClient({ url: relay.url, document: "ep", token: "cy" }));
  await c.connect();
  await c.send("n1");
  await c.send("n2");
  await waitFor(() => a.status === "connected" && a.seq === 2, 5000, "a reloaded");
  assert.equal(resets.length, 1);
  assert.notEqual(resets[0].epoch, oldEpoch);
  assert.equal(a.epoch, resets[0].epoch);
  assert.deepEqual(ops, [1, 2, 3, 1, 2], "old history, then the new one from seq 1, each once");
  assert.deepEqual(statuses, ["connecting", "connected", "reconnecting", "connected"]);
  for (const x of [a, b, c]) x.close();
  await relay.stop();
});

test("an authentication failure closes the client without a reconnect loop", async () => {
  const secret = "s".repeat(40);
  const relay = relayTracked(await startRelay({ config: `[auth]\nmode = "jwt"\njwt_secret = "${secret}"\n` }));
  let constructed = 0;
  class CountingWS extends WebSocket {
    constructor(...args) {
      super(...args);
      constructed++;
    }
  }
  const backoff = { initial: 10, max: 20 };
  for (const [token, code] of [
    ["garbage", "AUTH_FAILED"],
    [jwt(secret, { sub: "ada", exp: Math.floor(Date.now() / 1000) + 600, docs: ["other"] }), "FORBIDDEN"],
  ]) {
    constructed = 0;
    const c = track(new DocRelayClient({ url: relay.url, document: "secret", token, backoff, WebSocket: CountingWS }));
    const errors = [], statuses = [];
    c.on("error", (e) => errors.push(e));
    c.on("status", (s) => statuses.push(s));
    await assert.rejects(c.connect(), (e) => e.code === code);
    await sleep(300); // a loop would have reconnected many times by now
    assert.equal(constructed, 1, "exactly one connection attempt");
    assert.equal(c.status, "closed");
    assert.deepEqual(statuses, ["connecting", "closed"]);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, code);
    await assert.rejects(c.send(1), (e) => e.code === "CLOSED");
  }
  assert.equal(await metric(relay, "docrelay_auth_failures_total"), 2);
  // A valid token works.
  const ok = track(new DocRelayClient({ url: relay.url, document: "secret", token: () => jwt(secret, { sub: "ada", exp: Math.floor(Date.now() / 1000) + 600 }) }));
  const j = await ok.connect();
  assert.equal(j.user_id, "ada");
  ok.close();
  await relay.stop();
});

test("kill -9 of a relay with storage and a restart: the client resumes with no gap and no duplicate", async () => {
  const dir = tempDir();
  onExit(async () => cleanup(dir));
  const config = `[storage]\ndir = "${path.join(dir, "data")}"\n`;
  let relay = relayTracked(await startRelay({ config, dir }));
  const port = relay.port;
  const reader = track(new DocRelayClient({ url: relay.url, document: "durable", token: "reader", backoff: { initial: 700, max: 700, jitter: 0 } }));
  const writer = track(new DocRelayClient({ url: relay.url, document: "durable", token: "writer" }));
  const seen = [], resets = [], snaps = [];
  reader.on("operation", (op) => seen.push(op.seq));
  reader.on("reset", (r) => resets.push(r));
  reader.on("snapshot", (s) => snaps.push(s));
  await reader.connect();
  await writer.connect();
  // The reader sends some of its own too: they must not come back to it after the resume.
  for (let i = 1; i <= 6; i++) await (i % 3 === 0 ? reader : writer).send(i);
  await waitFor(() => seen.length === 4, 3000, "4 ops before the crash");
  const epoch = reader.epoch;
  await relay.kill();
  writer.close();
  relay = relayTracked(await startRelay({ config, dir, listen: `127.0.0.1:${port}` }));
  // Written while the reader is still away (its backoff is 700 ms): it must catch up on them.
  const w2 = track(new DocRelayClient({ url: relay.url, document: "durable", token: "writer" }));
  await w2.connect();
  assert.equal(w2.epoch, epoch, "storage keeps the epoch");
  for (let i = 7; i <= 12; i++) await w2.send(i);
  await waitFor(() => reader.status === "connected" && reader.seq === 12, 8000, "reader resumed");
  for (let i = 13; i <= 15; i++) await w2.send(i);
  await waitFor(() => reader.seq === 15, 3000, "live after resume");
  await sleep(50);
  assert.deepEqual(seen, [1, 2, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]);
  assert.deepEqual(resets, []);
  assert.deepEqual(snaps, []);
  assert.equal(reader.epoch, epoch);
  reader.close();
  w2.close();
  await relay.stop();
});

test("urls are tried in turn: a dead first relay falls over to the second", async () => {
  const relay = relayTracked(await startRelay());
  const dead = "ws://127.0.0.1:1"; // nothing listens there
  const c = track(new DocRelayClient({ url: [dead, relay.url], document: "multi", token: "ada", backoff: { initial: 20, max: 50 } }));
  const statuses = [];
  c.on("status", (s) => statuses.push(s));
  const j = await c.connect();
  assert.equal(j.seq, 0);
  assert.deepEqual(statuses, ["connecting", "reconnecting", "connected"]);
  c.close();
  await relay.stop();
});
