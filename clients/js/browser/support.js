// Browser test support: Debian's Chromium driven by Playwright (playwright-core, no
// bundled browser), and pages that load the client the relay serves at /docrelay.js.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { clientDir, tempDir, cleanup, startRelay } from "../test-support/helpers.js";

export * from "../test-support/helpers.js";

/** The browser: $CHROMIUM, else the system Chromium. */
export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

/** Flags without which Chromium stalls or phones home on a build machine. */
export const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

export async function launchBrowser() {
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_FLAGS });
}

/** Where screenshots go: $DOCRELAY_SCREENSHOTS, else target/browser-tests/ of the repository. */
export function screenshotPath(name) {
  const dir = process.env.DOCRELAY_SCREENSHOTS || path.resolve(clientDir, "../../target/browser-tests");
  mkdirSync(dir, { recursive: true });
  return path.join(dir, name);
}

/**
 * Opens a page on the relay's origin (its /healthz, a plain page with no policy) that
 * imports the client from the relay's /docrelay.js and records what it emits:
 * window.ops, presence, statuses, resets, snapshots, errors, lagged (lagged notices seen
 * on the wire). Resolves with the page once `connect()` resolved; `joined` is on window.
 */
export async function clientPage(context, relay, { document, token, color, since, backoff } = {}) {
  const page = await context.newPage();
  page.on("pageerror", (e) => process.stderr.write(`page error (${token}): ${e.message}\n`));
  await page.goto(`${relay.http}/healthz`);
  await page.evaluate(
    async ({ document, token, color, since, backoff }) => {
      const { DocRelayClient } = await import("/docrelay.js");
      Object.assign(window, { ops: [], presence: [], statuses: [], resets: [], snapshots: [], errors: [], lagged: 0, acked: [] });
      class Peeking extends WebSocket {
        constructor(...a) {
          super(...a);
          this.addEventListener("message", (ev) => {
            if (typeof ev.data === "string" && ev.data.includes('"type":"lagged"')) window.lagged++;
          });
        }
      }
      const c = new DocRelayClient({ url: `ws://${location.host}`, document, token, color, since, backoff, WebSocket: Peeking });
      c.on("operation", (op) => window.ops.push(op));
      c.on("presence", (ev) => window.presence.push(ev));
      c.on("status", (s) => window.statuses.push(s));
      c.on("reset", (r) => window.resets.push(r));
      c.on("snapshot", (s) => window.snapshots.push(s));
      c.on("error", (e) => window.errors.push(e));
      window.client = c;
      // Sends `n` operations, one after another's ack; records their seqs in window.acked.
      window.sendMany = async (n, tag) => {
        for (let i = 0; i < n; i++) window.acked.push((await c.send({ tag, i })).seq);
      };
      window.joined = await c.connect();
    },
    { document, token, color, since, backoff },
  );
  return page;
}

/**
 * A relay on a storage directory of its own, which a test may kill and start again on
 * the same port (`restart()`, which resolves with the new relay), and a browser; what to
 * stop goes into `cleanups` (run last first). `relay` is always the current one.
 */
export async function durableRelayAndBrowser(cleanups) {
  const dir = tempDir();
  cleanups.push(() => cleanup(dir));
  const config = `[storage]\ndir = "${dir}/wal"\n`;
  const r = { relay: await startRelay({ config, dir }) };
  const port = r.relay.port;
  r.restart = async () => (r.relay = await startRelay({ config, dir, listen: `127.0.0.1:${port}` }));
  cleanups.push(() => r.relay.kill());
  r.browser = await launchBrowser();
  cleanups.push(() => r.browser.close());
  return r;
}
