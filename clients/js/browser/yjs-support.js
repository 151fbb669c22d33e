// Support for the Yjs page tests: `yjs` and `y-websocket` bundled for the browser with
// esbuild (once per test file), injected into pages on a relay's own origin (its
// /healthz, a plain page). Each page has a browser context of its own and its provider
// has `disableBc: true`, so pages cannot sync over a BroadcastChannel: everything a
// page gets came through the relay.
import { fileURLToPath } from "node:url";
import path from "node:path";
import { build } from "esbuild";
import { launchBrowser } from "./support.js";

const here = path.dirname(fileURLToPath(import.meta.url));

// Generous: the machine may be small and busy (a Rust build next door).
export const WAIT = { timeout: 20000 };

/** `Y` and `WebsocketProvider` on `window`, bundled once per file run (an IIFE). */
let bundled;
function bundle() {
  bundled ??= build({
    stdin: {
      contents: 'import * as Y from "yjs";\nimport { WebsocketProvider } from "y-websocket";\nObject.assign(window, { Y, WebsocketProvider });\n',
      resolveDir: here,
      sourcefile: "yjs-entry.js",
    },
    bundle: true,
    format: "iife",
    platform: "browser",
    target: "es2020",
    write: false,
    logLevel: "silent",
  }).then((r) => r.outputFiles[0].text);
  return bundled;
}

let sharedBrowser;
/** One Chromium for the file (its pages each get a context of their own), closed by `cleanups`. */
export async function browser(cleanups) {
  if (!sharedBrowser) {
    sharedBrowser = launchBrowser();
    cleanups.push(async () => (await sharedBrowser).close());
  }
  return sharedBrowser;
}

/**
 * A page in a fresh context of `b`, on the relay's origin, with a Y.Doc and a
 * WebsocketProvider for `room` (token as `?token=`). Records on window: statuses,
 * closes (close codes of the provider's connections), removals (awareness removals:
 * {id, fromRelay}, fromRelay when they came in through the provider). `errors` (on the
 * returned object) collects uncaught page errors.
 */
export async function yjsPage(b, relay, { room, token }) {
  const context = await b.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${relay.http}/healthz`);
  await page.addScriptTag({ content: await bundle() });
  await page.evaluate(
    ({ room, token }) => {
      const doc = new Y.Doc();
      const provider = new WebsocketProvider(`ws://${location.host}/yjs`, room, doc, { disableBc: true, params: { token } });
      Object.assign(window, { doc, provider, text: doc.getText("t"), statuses: [], closes: [], removals: [] });
      provider.on("status", ({ status }) => window.statuses.push(status));
      provider.on("connection-close", (ev) => window.closes.push(ev ? ev.code : null));
      provider.awareness.on("change", ({ removed }, origin) => {
        for (const id of removed) window.removals.push({ id, fromRelay: origin === provider, origin: typeof origin === "string" ? origin : null });
      });
    },
    { room, token },
  );
  return { page, context, errors };
}

export const synced = (p) => p.waitForFunction(() => window.provider.synced, null, WAIT);

export const content = (p) => p.evaluate(() => window.text.toString());
