import { test, after } from "node:test";
import assert from "node:assert/strict";
import { DocRelayClient } from "../docrelay.js";
import { launchBrowser, clientPage, startRelay, metric } from "./support.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

test("a page that stopped reading is told `lagged` and recovers every operation, in order", async () => {
  // A ring of 8 operations makes a page that stops reading lag at once; small sync pages
  // make its recovery take several sync_responses.
  const relay = await startRelay({ config: "[documents]\nring_capacity = 8\n[limits]\nmax_sync_bytes = 200000\n" });
  cleanups.push(() => relay.kill());
  const browser = await launchBrowser();
  cleanups.push(() => browser.close());
  const page = await clientPage(await browser.newContext(), relay, { document: "lag", token: "slow" });
  const writer = new DocRelayClient({ url: relay.url, document: "lag", token: "fast" });
  cleanups.push(async () => writer.close());
  await writer.connect();

  // The page's renderer processes are stopped (SIGSTOP), so nothing reads its WebSocket:
  // Chromium's network process stops reading the socket once its pipe to the renderer is
  // full, the kernel's buffers fill up, and the relay's broadcasts to the page fall more
  // than a ring behind. (A busy main thread is not enough: Chromium keeps reading and
  // queues the messages in memory.) The writer fills the document meanwhile.
  const cdp = await browser.newBrowserCDPSession();
  const { processInfo } = await cdp.send("SystemInfo.getProcessInfo");
  const renderers = processInfo.filter((p) => p.type === "renderer").map((p) => p.id);
  assert.ok(renderers.length >= 1, JSON.stringify(processInfo));
  const resume = () => renderers.forEach((pid) => process.kill(pid, "SIGCONT"));
  cleanups.push(resume);
  renderers.forEach((pid) => process.kill(pid, "SIGSTOP"));
  const N = 300;
  const big = "x".repeat(60000);
  const sent = [];
  for (let i = 1; i <= N; i++) sent.push(writer.send({ i, big }));
  await Promise.all(sent); // 18 MB: more than the socket buffers and the ring hold
  resume();

  // Then live operations keep coming while the page recovers.
  for (let i = N + 1; i <= N + 100; i++) await writer.send({ i, big: "" });
  await page.waitForFunction((n) => window.client.seq === n, N + 100, { timeout: 30000 });
  const { seqs, payloads, lagged, status, errors } = await page.evaluate(() => ({
    seqs: window.ops.map((o) => o.seq),
    payloads: window.ops.map((o) => o.payload.i),
    lagged: window.lagged,
    status: window.client.status,
    errors: window.errors,
  }));
  assert.ok(lagged >= 1, "the page was told `lagged`");
  assert.ok((await metric(relay, "docrelay_lagged_total")) >= 1, "the relay counted the lag");
  assert.deepEqual(seqs, Array.from({ length: N + 100 }, (_, i) => i + 1), "each seq once, in order");
  assert.deepEqual(payloads, seqs);
  assert.equal(status, "connected");
  assert.deepEqual(errors, []);
});
