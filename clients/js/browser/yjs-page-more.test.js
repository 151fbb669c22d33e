// Yjs rooms in Chromium pages (yjs-support.js), continued: kill -9 and restart, a
// read-only token, a garbage update, two relays on one Redis.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { startRelay, jwt, tempDir, cleanup } from "./support.js";
import { startRedis } from "../test-support/redis.js";
import { WAIT, browser as sharedBrowser, yjsPage, synced, content } from "./yjs-support.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});
const browser = () => sharedBrowser(cleanups);

test("kill -9 and a restart keep the document; the page's provider reconnects and edits on", async () => {
  const dir = tempDir();
  cleanups.push(() => cleanup(dir));
  const config = `[storage]\ndir = "${dir}/wal"\n`;
  let relay = await startRelay({ config, dir });
  cleanups.push(() => relay.kill());
  const b = await browser();
  const a = await yjsPage(b, relay, { room: "durable", token: "ada" });
  const bob = await yjsPage(b, relay, { room: "durable", token: "bob" });
  await Promise.all([synced(a.page), synced(bob.page)]);
  await a.page.evaluate(() => {
    for (let i = 0; i < 50; i++) window.text.insert(window.text.length, `line ${i}\n`);
  });
  const written = await content(a.page);
  // Passed on once stored: Bob having it all means the log has it.
  await bob.page.waitForFunction((w) => window.text.toString() === w, written, WAIT);
  await relay.kill();
  relay = await startRelay({ config, dir, listen: `127.0.0.1:${relay.port}` });
  const cy = await yjsPage(b, relay, { room: "durable", token: "cy" });
  await synced(cy.page);
  await cy.page.waitForFunction((w) => window.text.toString() === w, written, WAIT);
  // Ada's provider reconnected by itself; her next edit reaches the new page.
  await a.page.waitForFunction(() => window.provider.wsconnected, null, WAIT);
  await a.page.evaluate(() => window.text.insert(0, "after\n"));
  await cy.page.waitForFunction((w) => window.text.toString() === "after\n" + w, written, WAIT);
  assert.deepEqual(a.errors, []);
});

test("a read-only page receives the document but cannot change it", async () => {
  const secret = "page-ro-secret";
  const relay = await startRelay({ config: `[auth]\nmode = "jwt"\njwt_secret = "${secret}"\n` });
  cleanups.push(() => relay.kill());
  const b = await browser();
  const exp = Math.floor(Date.now() / 1000) + 600;
  const writer = await yjsPage(b, relay, { room: "ro", token: jwt(secret, { sub: "ada", exp }) });
  await synced(writer.page);
  await writer.page.evaluate(() => window.text.insert(0, "by ada"));
  const reader = await yjsPage(b, relay, { room: "ro", token: jwt(secret, { sub: "rita", exp, mode: "read" }) });
  await synced(reader.page);
  await reader.page.waitForFunction(() => window.text.toString() === "by ada", null, WAIT);
  await reader.page.evaluate(() => window.text.insert(0, "rita was here "));
  await writer.page.evaluate(() => window.text.insert(6, "!"));
  await reader.page.waitForFunction(() => window.text.toString().endsWith("by ada!"), null, WAIT);
  // A page that joins now gets the relay's document: without the reader's insert.
  const late = await yjsPage(b, relay, { room: "ro", token: jwt(secret, { sub: "cy", exp }) });
  await synced(late.page);
  assert.equal(await content(late.page), "by ada!");
  assert.equal(await content(writer.page), "by ada!");
});

test("a garbage update from one client never reaches the pages, which go on", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  const b = await browser();
  const a = await yjsPage(b, relay, { room: "g", token: "ada" });
  const bob = await yjsPage(b, relay, { room: "g", token: "bob" });
  await Promise.all([synced(a.page), synced(bob.page)]);
  // From a page of its own: a sync update (0, 2) whose payload is not a Yjs update.
  const mallory = await (await b.newContext()).newPage();
  await mallory.goto(`${relay.http}/healthz`);
  const answer = await mallory.evaluate(
    () =>
      new Promise((resolve) => {
        const ws = new WebSocket(`ws://${location.host}/yjs/g?token=mallory`);
        ws.binaryType = "arraybuffer";
        const got = [];
        ws.onmessage = (m) => {
          got.push([...new Uint8Array(m.data)]);
          if (got.length === 1) ws.send(new Uint8Array([0, 2, 5, 0xff, 0xfe, 0xfd, 0xfc, 0xfb]));
          if (got.some((g) => g[0] === 2)) resolve(got.find((g) => g[0] === 2));
        };
      }),
  );
  assert.equal(answer[0], 2, "an auth message");
  assert.equal(answer[1], 0, "permission denied");
  await a.page.evaluate(() => window.text.insert(0, "still fine"));
  await bob.page.waitForFunction(() => window.text.toString() === "still fine", null, WAIT);
  assert.deepEqual([a.errors, bob.errors], [[], []]);
});

test("two relays on one Redis: pages on each edit one document", async () => {
  const redis = await startRedis();
  cleanups.push(() => redis.cleanup());
  const node = (name) => startRelay({ config: `[cluster]\nredis_url = "${redis.url}"\nnode_id = "${name}"\n` });
  const [r1, r2] = await Promise.all([node("p1"), node("p2")]);
  cleanups.push(() => r1.kill(), () => r2.kill());
  const b = await browser();
  const a = await yjsPage(b, r1, { room: "shared", token: "ada" });
  const bob = await yjsPage(b, r2, { room: "shared", token: "bob" });
  await Promise.all([synced(a.page), synced(bob.page)]);
  const type = (p, ch) => p.evaluate((ch) => { for (let i = 0; i < 20; i++) window.text.insert(0, ch); }, ch);
  await Promise.all([type(a.page, "a"), type(bob.page, "b")]);
  for (const p of [a.page, bob.page]) await p.waitForFunction(() => window.text.length === 40, null, WAIT);
  assert.equal(await content(a.page), await content(bob.page), "converged across relays");
  const cy = await yjsPage(b, r2, { room: "shared", token: "cy" });
  await synced(cy.page);
  await cy.page.waitForFunction(() => window.text.length === 40, null, WAIT);
  assert.equal(await content(cy.page), await content(a.page));
});
