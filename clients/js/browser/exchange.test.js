import { test, after } from "node:test";
import assert from "node:assert/strict";
import { launchBrowser, clientPage, startRelay } from "./support.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

test("two browser pages exchange operations and cursors through the relay", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  const browser = await launchBrowser();
  cleanups.push(() => browser.close());
  const context = await browser.newContext();
  const ada = await clientPage(context, relay, { document: "pair", token: "ada", color: "#d62728" });
  const bob = await clientPage(context, relay, { document: "pair", token: "bob" });

  // Each sees both participants (bob's join reached ada as user_joined).
  await ada.waitForFunction(() => window.client.participants.length === 2);
  const names = async (p) => (await p.evaluate(() => window.client.participants.map((x) => x.user_name))).sort();
  assert.deepEqual(await names(ada), ["ada", "bob"]);
  assert.deepEqual(await names(bob), ["ada", "bob"]);

  await ada.evaluate(() => window.sendMany(20, "a"));
  await bob.waitForFunction(() => window.ops.length === 20);
  const seen = await bob.evaluate(() => window.ops.map((o) => [o.seq, o.user_id, o.payload.tag, o.payload.i]));
  assert.deepEqual(seen, Array.from({ length: 20 }, (_, i) => [i + 1, "ada", "a", i]));

  await bob.evaluate(() => window.sendMany(5, "b"));
  await ada.waitForFunction(() => window.ops.length === 5);
  assert.deepEqual(await ada.evaluate(() => window.ops.map((o) => o.seq)), [21, 22, 23, 24, 25]);
  assert.deepEqual(await bob.evaluate(() => window.acked), [21, 22, 23, 24, 25]);
  for (const p of [ada, bob]) assert.equal(await p.evaluate(() => window.client.seq), 25);

  // Cursors go on the presence channel with the sender's identity and colour.
  assert.equal(await ada.evaluate(() => window.client.cursor({ x: 10, y: 20 })), true);
  await bob.waitForFunction(() => window.presence.some((e) => e.type === "cursor"));
  const cursor = await bob.evaluate(() => window.presence.find((e) => e.type === "cursor"));
  assert.equal(cursor.user_id, "ada");
  assert.equal(cursor.color, "#d62728");
  assert.deepEqual(cursor.payload, { x: 10, y: 20 });
  assert.equal(await ada.evaluate(() => window.presence.filter((e) => e.type === "cursor").length), 0, "no echo of one's own cursor");

  // Leaving is seen too.
  await bob.evaluate(() => window.client.close());
  await ada.waitForFunction(() => window.presence.some((e) => e.type === "user_left" && e.user_id === "bob"));
  assert.deepEqual(await names(ada), ["ada"]);
  for (const p of [ada, bob]) assert.deepEqual(await p.evaluate(() => window.errors), []);
});
