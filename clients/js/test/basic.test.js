import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { DocRelayClient } from "../docrelay.js";
import { startRelay, waitFor, sleep } from "../test-support/helpers.js";

let relay;
const clients = [];
function client(opts) {
  const c = new DocRelayClient({ url: relay.url, backoff: { initial: 50, max: 200 }, ...opts });
  clients.push(c);
  return c;
}

before(async () => {
  relay = await startRelay();
});
after(async () => {
  for (const c of clients) c.close();
  await relay.kill();
});

test("two clients exchange operations and cursors", async () => {
  const ada = client({ document: "exchange", token: "ada", color: "#1f77b4" });
  // A token function returning a Promise.
  const bob = client({ document: "exchange", token: async () => "bob" });
  const adaOps = [], bobOps = [], adaPresence = [], bobPresence = [];
  ada.on("operation", (op) => adaOps.push(op));
  bob.on("operation", (op) => bobOps.push(op));
  ada.on("presence", (p) => adaPresence.push(p));
  bob.on("presence", (p) => bobPresence.push(p));
  const statuses = [];
  ada.on("status", (s) => statuses.push(s));

  const joinedA = await ada.connect();
  assert.equal(joinedA.seq, 0);
  assert.equal(joinedA.document_id, "exchange");
  assert.match(ada.epoch, /^[0-9a-f]{16}$/);
  assert.deepEqual(statuses, ["connecting", "connected"]);
  await bob.connect();
  assert.equal(bob.participants.length, 2);
  await waitFor(() => adaPresence.some((p) => p.type === "user_joined" && p.user_id === "bob"), 3000, "user_joined");
  assert.equal(ada.participants.length, 2);
  assert.equal(ada.participants.find((p) => p.user_id === "ada").color, "#1f77b4");

  const r1 = await ada.send({ insert: "x", at: 0 });
  const r2 = await bob.send({ insert: "y", at: 1 });
  const r3 = await ada.send({ insert: "z", at: 2 });
  assert.deepEqual([r1.seq, r2.seq, r3.seq], [1, 2, 3]);
  await waitFor(() => bobOps.length === 2 && adaOps.length === 1, 3000, "operations");
  assert.deepEqual(bobOps.map((o) => [o.seq, o.user_id, o.payload]), [
    [1, "ada", { insert: "x", at: 0 }],
    [3, "ada", { insert: "z", at: 2 }],
  ]);
  assert.deepEqual(adaOps.map((o) => [o.seq, o.user_id, o.payload]), [[2, "bob", { insert: "y", at: 1 }]]);
  assert.equal(typeof bobOps[0].connection_id, "number");
  await waitFor(() => ada.seq === 3 && bob.seq === 3, 3000, "seq 3 on both");

  assert.equal(ada.cursor({ at: 4 }), true);
  await waitFor(() => bobPresence.some((p) => p.type === "cursor"), 3000, "cursor");
  const cur = bobPresence.find((p) => p.type === "cursor");
  assert.equal(cur.user_id, "ada");
  assert.equal(cur.color, "#1f77b4");
  assert.deepEqual(cur.payload, { at: 4 });

  bob.close();
  await waitFor(() => adaPresence.some((p) => p.type === "user_left" && p.user_id === "bob"), 3000, "user_left");
  assert.equal(ada.participants.length, 1);
  ada.close();
});

test("acks resolve send() with increasing seqs, own operations are never emitted", async () => {
  const a = client({ document: "acks", token: "ada" });
  const b = client({ document: "acks", token: "bob" });
  const own = [], seen = [];
  a.on("operation", (op) => own.push(op));
  b.on("operation", (op) => seen.push(op.seq));
  await a.connect();
  await b.connect();
  const results = await Promise.all(Array.from({ length: 30 }, (_, i) => a.send({ i })));
  assert.deepEqual(results.map((r) => r.seq), Array.from({ length: 30 }, (_, i) => i + 1));
  assert.equal(a.seq, 30);
  await waitFor(() => seen.length === 30, 3000, "30 operations at bob");
  assert.deepEqual(seen, Array.from({ length: 30 }, (_, i) => i + 1));
  await sleep(50);
  assert.deepEqual(own, [], "own operations must not be emitted");
  // A snapshot is acknowledged with its seq.
  assert.deepEqual(await a.snapshot(30, { text: "..." }), { seq: 30 });
  await assert.rejects(a.snapshot(31, {}), (e) => e.code === "BAD_SNAPSHOT");
  a.close();
  b.close();
});

test("the same user's operations from an earlier connection are others' operations", async () => {
  const first = client({ document: "sameuser", token: "ada" });
  await first.connect();
  const second = client({ document: "sameuser", token: "ada" });
  const got = [];
  second.on("operation", (op) => got.push(op.seq));
  await second.connect();
  await first.send("one");
  await waitFor(() => got.length === 1, 3000, "op from the other connection");
  assert.deepEqual(got, [1]);
  first.close();
  second.close();
});

test("first connect replays history only with `since`", async () => {
  const w = client({ document: "since", token: "w" });
  await w.connect();
  for (let i = 0; i < 5; i++) await w.send(i);
  const plain = client({ document: "since", token: "p" });
  const plainOps = [];
  const plainSyncs = [];
  plain.on("operation", (op) => plainOps.push(op.seq));
  plain.on("sync", (s) => plainSyncs.push(s));
  const j = await plain.connect();
  assert.equal(j.seq, 5);
  assert.equal(plain.seq, 5);
  const replay = client({ document: "since", token: "r", since: 2 });
  const replayOps = [];
  const syncs = [];
  replay.on("operation", (op) => replayOps.push(op.seq));
  replay.on("sync", (s) => syncs.push({ ...s, ops: replayOps.length, syncing: replay.syncing }));
  await replay.connect();
  assert.deepEqual(replayOps, [3, 4, 5], "connect() resolves after the catch-up");
  // The catch-up is announced: it begins before the replayed operations, ends after them.
  assert.deepEqual(syncs, [
    { active: true, seq: 2, ops: 0, syncing: true },
    { active: false, seq: 5, ops: 3, syncing: false },
  ]);

  await sleep(50);
  assert.deepEqual(plainOps, []);
  assert.deepEqual(plainSyncs, [], "no replay, no catch-up");
  w.close();
  plain.close();
  replay.close();
});

test("send() is rejected on close and while disconnected", async () => {
  const a = client({ document: "closing", token: "ada" });
  await assert.rejects(a.send(1), (e) => e.code === "NOT_CONNECTED", "before connect()");
  await a.connect();
  const p = a.send({ x: 1 });
  a.close();
  await assert.rejects(p, (e) => e.code === "CONNECTION_CLOSED");
  await assert.rejects(a.send(2), (e) => e.code === "CLOSED");
  assert.equal(a.status, "closed");
});
