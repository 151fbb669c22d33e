import { test, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import path from "node:path";
import { DocRelayClient } from "../docrelay.js";
import { startRelay, clientDir } from "../test-support/helpers.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups) await f();
});

test("a lagged reader recovers: every seq exactly once, in order (paged sync_response)", async () => {
  // A ring of 8 operations forces `lagged`; small sync pages force paging ("more").
  const relay = await startRelay({ config: "[documents]\nring_capacity = 8\n[limits]\nmax_sync_bytes = 200000\n" });
  const N = 400; // written while the reader is stopped
  const M = 200; // written while it recovers: live operations overlap its sync_responses
  const child = spawn(process.execPath, ["--experimental-websocket", path.join(clientDir, "test-support/lag-reader.js"), relay.url, "lag", String(N + M)], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  cleanups.push(async () => child.kill("SIGKILL"), () => relay.kill());
  let out = "", err = "";
  child.stdout.setEncoding("utf8").on("data", (d) => (out += d));
  child.stderr.setEncoding("utf8").on("data", (d) => (err += d));
  try {
    const until = async (pred, ms, what) => {
      const end = Date.now() + ms;
      while (!pred()) {
        if (Date.now() > end) throw new Error(`timed out: ${what}\nstdout: ${out}\nstderr: ${err}`);
        await new Promise((r) => setTimeout(r, 20));
      }
    };
    await until(() => out.includes("ready\n"), 10000, "reader ready");
    const writer = new DocRelayClient({ url: relay.url, document: "lag", token: "fast" });
    await writer.connect();
    child.kill("SIGSTOP"); // the reader stops reading; its socket buffers fill up
    const big = "x".repeat(60000);
    const acks = [];
    for (let i = 1; i <= N; i++) {
      acks.push(writer.send({ i, big }));
      if (i % 50 === 0) await Promise.all(acks.splice(0));
    }
    await Promise.all(acks);
    child.kill("SIGCONT");
    for (let i = N + 1; i <= N + M; i++) {
      acks.push(writer.send({ i, big: big.slice(0, 2000) }));
      if (i % 10 === 0) {
        await Promise.all(acks.splice(0));
        await new Promise((r) => setTimeout(r, 2));
      }
    }
    await Promise.all(acks);
    await until(() => out.split("\n").length >= 3, 15000, "reader reached the last seq");
    const report = JSON.parse(out.split("\n")[1]);
    assert.ok(report.lagged >= 1, `the reader must have lagged (got ${report.lagged} lagged notices)`);
    assert.ok(report.morePages >= 1, `the recovery must have been paged (got ${report.morePages} pages with more)`);
    assert.deepEqual(report.seqs, Array.from({ length: N + M }, (_, i) => i + 1));
    writer.close();
  } finally {
    child.kill("SIGKILL");
    await relay.stop();
  }
});
