// Cluster mode on Redis (docs/cluster.md) with the JavaScript client: several relays
// (nodes) on one redis-server serve the same document, and a client given all of their
// URLs moves to another node when its own dies, resuming from Redis's history.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DocRelayClient } from "../docrelay.js";
import { startRelay, waitFor, sleep, cleanups } from "../test-support/helpers.js";
import { startRedis } from "../test-support/redis.js";

const { track, relayTracked, onExit } = cleanups();
async function redisTracked() {
  const r = await startRedis();
  onExit(() => r.cleanup());
  return r;
}

/** The configuration of node `name` on `redis` (node_timeout_ms 2000, the least allowed is 1000). */
function nodeConfig(redis, name) {
  return `[cluster]\nredis_url = "${redis.url}"\nnode_id = "${name}"\nnode_timeout_ms = 2000\n`;
}

const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test("the Redis helper: start, SET, stop, start again on the same port keeps the data", async () => {
  const redis = await redisTracked();
  const port = redis.port;
  assert.equal(await redis.command(["PING"]), "PONG");
  assert.equal(await redis.command(["SET", "k", "v1"]), "OK");
  assert.deepEqual(await redis.command(["RPUSH", "l", "a", "b"]), 2);
  assert.deepEqual(await redis.command(["LRANGE", "l", "0", "-1"]), ["a", "b"]);
  assert.equal(await redis.command(["GET", "missing"]), null);
  await redis.stop();
  await assert.rejects(redis.command(["PING"]));
  await redis.startAgain();
  assert.equal(redis.port, port);
  assert.equal(await redis.command(["GET", "k"]), "v1", "kept across a SIGTERM restart");
  assert.equal(await redis.command(["SET", "k", "v2"]), "OK");
  await redis.kill();
  await redis.startAgain();
  assert.equal(await redis.command(["GET", "k"]), "v2", "kept across a SIGKILL restart (appendfsync always)");
  assert.equal(await redis.command(["FLUSHALL"]), "OK");
  assert.equal(await redis.command(["GET", "k"]), null);
});

test("kill -9 of the client's node: it resumes on the other node with no gap and no duplicate", async () => {
  const redis = await redisTracked();
  const a = relayTracked(await startRelay({ config: nodeConfig(redis, "a") }));
  const b = relayTracked(await startRelay({ config: nodeConfig(redis, "b") }));
  const doc = "failover";

  // The client is given both nodes and connects to the first, node a.
  const c = track(new DocRelayClient({ url: [a.url, b.url], document: doc, token: "reader", backoff: { initial: 50, max: 200, jitter: 0 } }));
  const seen = [], own = [], resets = [], statuses = [], snaps = [];
  c.on("operation", (op) => seen.push(op.seq));
  c.on("reset", (r) => resets.push(r));
  c.on("snapshot", (s) => snaps.push(s));
  c.on("status", (s) => statuses.push(s));
  const joined = await c.connect();
  const epoch = c.epoch;
  assert.equal(joined.seq, 0);

  // A writer on node b sends operations continuously.
  const w = track(new DocRelayClient({ url: b.url, document: doc, token: "writer" }));
  await w.connect();
  assert.equal(w.epoch, epoch, "both nodes name the same epoch");
  const writerAcks = [], writerErrors = [];
  let writing = true;
  const writer = (async () => {
    for (let i = 0; writing; i++) {
      try {
        writerAcks.push((await w.send({ from: "writer", i })).seq);
      } catch (e) {
        writerErrors.push(e);
      }
      await sleep(15);
    }
  })();
  try {
    // The client sends some of its own through node a: they are acked, and must not come
    // back to it as operations after the resume.
    for (let i = 0; i < 3; i++) {
      own.push((await c.send({ from: "reader", i })).seq);
      await sleep(20);
    }
    await waitFor(() => seen.length >= 10, 5000, "10 of the writer's operations through node a");

    await a.kill();
    await waitFor(() => c.status === "reconnecting", 3000, "the client notices node a is gone");
    await waitFor(() => c.status === "connected", 8000, "the client resumed on node b");
    const atResume = writerAcks.length;
    await waitFor(() => writerAcks.length >= atResume + 10, 5000, "10 more operations from the writer after the resume");
  } finally {
    writing = false;
    await writer;
  }
  const n = Math.max(...writerAcks, ...own);
  await waitFor(() => c.seq === n, 5000, `the client caught up to seq ${n}`);
  await sleep(200); // a duplicate would have come by now

  assert.deepEqual(writerErrors, [], "the writer on node b is not disturbed");
  assert.deepEqual([...writerAcks, ...own].sort((x, y) => x - y), range(1, n), "acks 1..n once each across the nodes");
  assert.deepEqual(
    [...seen, ...own].sort((x, y) => x - y),
    range(1, n),
    `operation events plus the client's own acks cover 1..${n} exactly once (events ${JSON.stringify(seen)}, own ${JSON.stringify(own)})`,
  );
  assert.deepEqual(seen, [...seen].sort((x, y) => x - y), "operation events in increasing seq");
  assert.deepEqual(resets, [], "no reset: the epoch is the cluster's");
  assert.deepEqual(snaps, []);
  assert.equal(c.epoch, epoch);
  assert.deepEqual(statuses, ["connecting", "connected", "reconnecting", "connected"]);
  c.close();
  w.close();
  await b.stop();
});
