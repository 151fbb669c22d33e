// Test helpers: start the real relay binary as a child process.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { after } from "node:test";
import { mkdtempSync, writeFileSync, existsSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url)); // clients/js/test-support
export const clientDir = path.resolve(here, ".."); // clients/js

/** The relay binary: $DOCRELAY_BIN (relative to the current directory), else ../../target/debug/docrelay from clients/js. */
export const relayBin = process.env.DOCRELAY_BIN
  ? path.resolve(process.cwd(), process.env.DOCRELAY_BIN)
  : path.resolve(clientDir, "../../target/debug/docrelay");

export function tempDir(prefix = "docrelay-js-") {
  return mkdtempSync(path.join(tmpdir(), prefix));
}

/**
 * Starts a relay. `config` is TOML text (optional); `listen` defaults to 127.0.0.1:0.
 * Resolves with {url, addr, port, proc, stop(), kill()} once it logged `listening on ADDR`.
 */
export async function startRelay(opts = {}) {
  // After a kill -9 the old relay's sockets can outlive its process for a moment (its
  // io_uring rings are torn down asynchronously by the kernel): retry "address in use".
  const end = Date.now() + 10000;
  for (;;) {
    try {
      return await startRelayOnce(opts);
    } catch (e) {
      if (!/address already in use/.test(e.message) || Date.now() > end) throw e;
      await sleep(100);
    }
  }
}

async function startRelayOnce({ config = "", listen = "127.0.0.1:0", dir } = {}) {
  if (!existsSync(relayBin)) {
    throw new Error(`relay binary not found at ${relayBin}: build it (cargo build) or set DOCRELAY_BIN`);
  }
  const workDir = dir || tempDir();
  const cfg = path.join(workDir, `relay-${process.pid}-${Date.now()}.toml`);
  writeFileSync(cfg, config);
  const proc = spawn(relayBin, ["serve", "--config", cfg, "--listen", listen], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG || "info", NO_COLOR: "1" },
  });
  let log = "";
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`relay did not start within 15 s:\n${log}`)), 15000);
    proc.stderr.setEncoding("utf8");
    proc.stderr.on("data", (chunk) => {
      log += chunk;
      // Strip ANSI colour codes, then find the main listener (not "metrics listening on").
      const plain = log.replace(/\x1b\[[0-9;]*m/g, "");
      const m = /(?<!metrics )listening on (\d+\.\d+\.\d+\.\d+:\d+)/.exec(plain);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.on("exit", (code, sig) => {
      clearTimeout(timer);
      reject(new Error(`relay exited (${code ?? sig}) before listening:\n${log}`));
    });
  });
  const exited = new Promise((r) => proc.on("exit", r));
  const port = Number(addr.split(":").pop());
  const relay = {
    addr,
    port,
    url: `ws://${addr}`,
    http: `http://${addr}`,
    proc,
    get log() {
      return log;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGTERM");
      await exited;
    },
    async kill() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill("SIGKILL");
      await exited;
    },
  };
  return relay;
}

/**
 * Cleanups run after the file's tests, last first: `track(client)` closes a client,
 * `relayTracked(relay)` kills a relay, `onExit(f)` runs `f`.
 */
export function cleanups() {
  const toStop = [];
  after(async () => {
    for (const x of toStop.reverse()) await x();
  });
  return {
    track(c) {
      toStop.push(async () => c.close());
      return c;
    },
    relayTracked(r) {
      toStop.push(() => r.kill());
      return r;
    },
    onExit(f) {
      toStop.push(f);
    },
  };
}

/** Waits until `pred()` is true, polling; rejects after `ms`. */
export async function waitFor(pred, ms = 5000, what = "condition") {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Reads a counter from /metrics (sum over its samples). */
export async function metric(relay, name) {
  const text = await (await fetch(`${relay.http}/metrics`)).text();
  let sum = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(name + " ") || line.startsWith(name + "{")) sum += Number(line.split(" ").pop());
  }
  return sum;
}

export function cleanup(dir) {
  try {
    rmSync(dir, { recursive: true, force: true });
  } catch {
    /* ignore */
  }
}

// A watchdog per test file: a test that hangs (a reply that never comes) fails the file
// instead of blocking the run. Unref'd, so it never keeps a finished file alive.
// (node:test's per-test `timeout` option keeps Node 20 alive until it expires.)
const WATCHDOG_MS = Number(process.env.DOCRELAY_TEST_WATCHDOG_MS || 45000);
setTimeout(() => {
  process.stderr.write(`test file still running after ${WATCHDOG_MS} ms: failing it\n`);
  process.exit(1);
}, WATCHDOG_MS).unref();

/** An HS256 JWT of `claims`, signed with `secret` (for relays in `jwt` mode). */
export function jwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}
