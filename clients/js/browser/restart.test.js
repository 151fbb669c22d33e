import { test, after } from "node:test";
import assert from "node:assert/strict";
import { DocRelayClient } from "../docrelay.js";
import { durableRelayAndBrowser, clientPage } from "./support.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

test("the relay is killed and restarted on its storage: both pages resume with no gap and no duplicate", async () => {
  const setup = await durableRelayAndBrowser(cleanups);
  let relay = setup.relay;
  const browser = setup.browser;
  const context = await browser.newContext();
  const backoff = { initial: 100, max: 400 };
  const ada = await clientPage(context, relay, { document: "crash", token: "ada", backoff });
  const bob = await clientPage(context, relay, { document: "crash", token: "bob", backoff });
  await Promise.all([ada.evaluate(() => window.sendMany(15, "a")), bob.evaluate(() => window.sendMany(15, "b"))]);
  const epoch = await ada.evaluate(() => window.client.epoch);

  await relay.kill(); // SIGKILL: no goodbye to anyone
  for (const p of [ada, bob]) await p.waitForFunction(() => window.client.status === "reconnecting");
  relay = await setup.restart();

  // A third client writes as soon as the relay is back, racing the pages' resume.
  const cy = new DocRelayClient({ url: relay.url, document: "crash", token: "cy" });
  cleanups.push(async () => cy.close());
  const joined = await cy.connect();
  assert.equal(joined.seq, 30, "every acknowledged operation survived the kill");
  assert.equal(joined.epoch, epoch);
  for (let i = 0; i < 20; i++) await cy.send({ tag: "c", i });
  for (const p of [ada, bob]) await p.waitForFunction(() => window.client.status === "connected" && window.client.seq >= 50);
  await Promise.all([ada.evaluate(() => window.sendMany(5, "a2")), bob.evaluate(() => window.sendMany(5, "b2"))]);
  for (const p of [ada, bob]) await p.waitForFunction(() => window.client.seq === 60);

  for (const [name, p] of [["ada", ada], ["bob", bob]]) {
    const { seqs, acked, resets, statuses, errors } = await p.evaluate(() => ({
      seqs: window.ops.map((o) => o.seq),
      acked: window.acked,
      resets: window.resets,
      statuses: window.statuses,
      errors: window.errors,
    }));
    // Others' operations in strictly increasing seq order, each once; with the page's
    // own acked ones they are exactly 1..60.
    for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `${name}: seq ${seqs[i]} after ${seqs[i - 1]}`);
    const all = [...seqs, ...acked].sort((x, y) => x - y);
    assert.deepEqual(all, Array.from({ length: 60 }, (_, i) => i + 1), `${name}: no gap, no duplicate`);
    assert.deepEqual(resets, [], `${name}: the same epoch: no reset`);
    assert.deepEqual(statuses, ["connecting", "connected", "reconnecting", "connected"], name);
    assert.deepEqual(errors, [], name);
  }
  // The third client's operations reached both pages, in its order.
  for (const p of [ada, bob]) {
    const fromCy = await p.evaluate(() => window.ops.filter((o) => o.user_id === "cy").map((o) => o.payload.i));
    assert.deepEqual(fromCy, Array.from({ length: 20 }, (_, i) => i));
  }
});
