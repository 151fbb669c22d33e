// Yjs rooms (/yjs/{document}) with the real `yjs` and `y-websocket` running inside
// Chromium pages, as an editor would (yjs-support.js): convergence, a late page,
// awareness, JWT failures.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { launchBrowser, startRelay, jwt } from "./support.js";
import { WAIT, browser as sharedBrowser, yjsPage, synced } from "./yjs-support.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});
const browser = () => sharedBrowser(cleanups);

test("pages type concurrently into one Y.Text and converge; a late page gets everything and edits live", async (t) => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  const b = await browser();
  const a = await yjsPage(b, relay, { room: "notes", token: "ada" });
  const bob = await yjsPage(b, relay, { room: "notes", token: "bob" });
  await Promise.all([synced(a.page), synced(bob.page)]);

  // Both pages start at the same instant and insert 30 characters at position 0, each
  // in its own task: updates cross on the way, and each page inserts in front of
  // whatever of the other's it has received by then.
  const startAt = Date.now() + 300;
  const type = (p, ch) =>
    p.evaluate(
      async ({ ch, startAt }) => {
        await new Promise((r) => setTimeout(r, Math.max(0, startAt - Date.now())));
        let remoteSeen = 0;
        for (let i = 0; i < 30; i++) {
          window.text.insert(0, ch);
          remoteSeen = window.text.length - (i + 1);
          await new Promise((r) => setTimeout(r, 0));
        }
        return remoteSeen; // the other's characters present at this page's last insert
      },
      { ch, startAt },
    );
  const [aSaw, bSaw] = await Promise.all([type(a.page, "a"), type(bob.page, "b")]);
  t.diagnostic(`remote characters seen at the last insert: a ${aSaw}, b ${bSaw}`);

  const content = (p) => p.evaluate(() => window.text.toString());
  for (const p of [a.page, bob.page]) await p.waitForFunction(() => window.text.length === 60, null, WAIT);
  const [ta, tb] = [await content(a.page), await content(bob.page)];
  assert.equal(ta, tb, "converged");
  const count = (s, ch) => [...s].filter((c) => c === ch).length;
  assert.equal(count(ta, "a"), 30);
  assert.equal(count(ta, "b"), 30);

  // A third page joins late: it receives the whole document from the relay.
  const cy = await yjsPage(b, relay, { room: "notes", token: "cy" });
  await synced(cy.page);
  await cy.page.waitForFunction(() => window.text.length === 60, null, WAIT);
  assert.equal(await content(cy.page), ta);
  // And its edit reaches the first two.
  await cy.page.evaluate(() => window.text.insert(0, "!"));
  for (const p of [a.page, bob.page]) await p.waitForFunction(() => window.text.length === 61, null, WAIT);
  assert.equal(await content(a.page), "!" + ta);
  assert.equal(await content(bob.page), "!" + ta);
  assert.equal(await content(cy.page), "!" + ta);
  // A page of another room saw none of it.
  const other = await yjsPage(b, relay, { room: "elsewhere", token: "dee" });
  await synced(other.page);
  assert.equal(await content(other.page), "");
  for (const x of [a, bob, cy, other]) assert.deepEqual(x.errors, []);
});

test("awareness reaches the other page, and the relay removes it when the page's renderer dies", async () => {
  const relay = await startRelay();
  cleanups.push(() => relay.kill());
  // Ada's page lives in a Chromium of its own, so that its renderer processes are
  // known and can be killed without touching Bob's.
  const adaBrowser = await launchBrowser();
  cleanups.push(() => adaBrowser.close());
  const ada = await yjsPage(adaBrowser, relay, { room: "aw", token: "ada" });
  const bob = await yjsPage(await browser(), relay, { room: "aw", token: "bob" });
  await ada.page.evaluate(() => window.provider.awareness.setLocalStateField("user", { name: "Ada", color: "#d62728" }));
  await Promise.all([synced(ada.page), synced(bob.page)]);
  await bob.page.evaluate(() => window.provider.awareness.setLocalStateField("user", { name: "Bob" }));

  // Each page sees both names: Bob got Ada's state (held by the relay), Ada got Bob's.
  const bothNames = () =>
    [...window.provider.awareness.getStates().values()]
      .map((s) => s.user && s.user.name)
      .filter(Boolean)
      .sort()
      .join() === "Ada,Bob";
  await bob.page.waitForFunction(bothNames, null, WAIT);
  await ada.page.waitForFunction(bothNames, null, WAIT);
  const adaId = await ada.page.evaluate(() => window.doc.clientID);
  const seen = await bob.page.evaluate((id) => window.provider.awareness.getStates().get(id), adaId);
  assert.deepEqual(seen, { user: { name: "Ada", color: "#d62728" } });

  // Ada's renderer is killed (SIGKILL): no script runs, no goodbye is sent; only the
  // relay, seeing the connection end, can tell Bob. (The provider's own timeout for a
  // silent peer is 30 s, longer than we wait.)
  const cdp = await adaBrowser.newBrowserCDPSession();
  const { processInfo } = await cdp.send("SystemInfo.getProcessInfo");
  const renderers = processInfo.filter((p) => p.type === "renderer").map((p) => p.id);
  assert.ok(renderers.length >= 1, JSON.stringify(processInfo));
  const crashed = new Promise((r) => ada.page.once("crash", r));
  renderers.forEach((pid) => process.kill(pid, "SIGKILL"));
  await crashed;

  // 15 s: well inside the provider's 30 s timeout, so only the relay can have removed it.
  await bob.page.waitForFunction((id) => !window.provider.awareness.getStates().has(id), adaId, { timeout: 15000 });
  const { removals, statuses, states } = await bob.page.evaluate(() => ({
    removals: window.removals,
    statuses: window.statuses,
    states: [...window.provider.awareness.getStates().values()],
  }));
  assert.deepEqual(
    removals.filter((r) => r.id === adaId),
    [{ id: adaId, fromRelay: true, origin: null }],
    "Ada's state was removed once, by a message from the relay",
  );
  assert.deepEqual(statuses, ["connected"], "Bob's own connection never dropped");
  assert.deepEqual(states, [{ user: { name: "Bob" } }]);
  assert.deepEqual(bob.errors, []);
});

test("jwt mode: a page's provider is closed with 4001 for a bad token and 4003 for other documents", async () => {
  const secret = "page-secret";
  const relay = await startRelay({ config: `[auth]\nmode = "jwt"\njwt_secret = "${secret}"\n` });
  cleanups.push(() => relay.kill());
  const b = await browser();
  const exp = Math.floor(Date.now() / 1000) + 600;
  const cases = [
    ["not-a-jwt", 4001],
    [jwt("another-secret", { sub: "mallory", exp }), 4001],
    [jwt(secret, { sub: "ada", exp, docs: ["other", "team-*"] }), 4003],
  ];
  for (const [token, code] of cases) {
    const p = await yjsPage(b, relay, { room: "secret", token });
    await p.page.waitForFunction(() => window.closes.length >= 1, null, WAIT);
    const { closes, synced: wasSynced, text } = await p.page.evaluate(() => {
      window.provider.destroy();
      return { closes: window.closes, synced: window.provider.synced, text: window.text.toString() };
    });
    assert.equal(closes[0], code, token);
    assert.equal(wasSynced, false);
    assert.equal(text, "");
    await p.context.close();
  }
  // A token that opens the document syncs, and its edit reaches a second page.
  const good = await yjsPage(b, relay, { room: "secret", token: jwt(secret, { sub: "ada", exp, docs: ["secret"] }) });
  const other = await yjsPage(b, relay, { room: "secret", token: jwt(secret, { sub: "bob", exp }) });
  await Promise.all([synced(good.page), synced(other.page)]);
  await good.page.evaluate(() => window.text.insert(0, "hello"));
  await other.page.waitForFunction(() => window.text.toString() === "hello", null, WAIT);
  assert.deepEqual(await good.page.evaluate(() => window.closes), []);
});
