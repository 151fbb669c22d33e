// Test helpers: a real redis-server for the cluster tests (one per test), on a free
// port of 127.0.0.1, in a temporary directory, durable (appendonly, appendfsync always,
// no RDB snapshots), so that stop() and startAgain() on the same port and directory keep
// every acknowledged write. Raw RESP over node:net for commands: no Redis package.
// The server comes from Debian's redis-server package (.ci/run installs it);
// $REDIS_SERVER names another binary.
import { spawn } from "node:child_process";
import { createServer, connect } from "node:net";
import { readFileSync, rmSync } from "node:fs";
import path from "node:path";
import { tempDir, sleep } from "./helpers.js";

const serverBin = process.env.REDIS_SERVER || "redis-server";

/** A port of 127.0.0.1 that was free a moment ago. */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Encodes one command as a RESP array of bulk strings. */
function encode(args) {
  let out = `*${args.length}\r\n`;
  for (const a of args) out += `$${Buffer.byteLength(String(a))}\r\n${a}\r\n`;
  return out;
}

/**
 * Parses one RESP reply from `buf` at `at`: returns {value, end} or null when
 * incomplete. Simple strings are strings, errors {error}, integers numbers,
 * bulk strings strings (null for nil), arrays arrays (null for nil).
 */
function parse(buf, at = 0) {
  const eol = buf.indexOf("\r\n", at);
  if (eol < 0) return null;
  const type = String.fromCharCode(buf[at]);
  const line = buf.toString("utf8", at + 1, eol);
  const next = eol + 2;
  switch (type) {
    case "+":
      return { value: line, end: next };
    case "-":
      return { value: { error: line }, end: next };
    case ":":
      return { value: Number(line), end: next };
    case "$": {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      if (buf.length < next + n + 2) return null;
      return { value: buf.toString("utf8", next, next + n), end: next + n + 2 };
    }
    case "*": {
      const n = Number(line);
      if (n < 0) return { value: null, end: next };
      const items = [];
      let pos = next;
      for (let i = 0; i < n; i++) {
        const r = parse(buf, pos);
        if (!r) return null;
        items.push(r.value);
        pos = r.end;
      }
      return { value: items, end: pos };
    }
    default:
      throw new Error(`unknown RESP type byte ${JSON.stringify(type)}`);
  }
}

/** Sends one command to the Redis on `port` (new connection) and resolves with its reply. */
export function redisCommand(port, args, timeoutMs = 5000) {
  return new Promise((resolve, reject) => {
    const sock = connect({ host: "127.0.0.1", port });
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => {
      sock.destroy();
      reject(new Error(`redis command ${args.join(" ")}: no reply within ${timeoutMs} ms`));
    }, timeoutMs);
    sock.on("connect", () => sock.write(encode(args)));
    sock.on("data", (chunk) => {
      buf = Buffer.concat([buf, chunk]);
      let r;
      try {
        r = parse(buf);
      } catch (e) {
        clearTimeout(timer);
        sock.destroy();
        reject(e);
        return;
      }
      if (r) {
        clearTimeout(timer);
        sock.end();
        resolve(r.value);
      }
    });
    sock.on("error", (e) => {
      clearTimeout(timer);
      reject(e);
    });
    sock.on("close", () => {
      clearTimeout(timer);
      reject(new Error("redis closed the connection before replying"));
    });
  });
}

/** Whether the Redis on `port` answers PING with PONG (not -LOADING) right now. */
async function pings(port) {
  try {
    return (await redisCommand(port, ["PING"], 500)) === "PONG";
  } catch {
    return false;
  }
}

/**
 * One start of the server on `port` with its data in `dir`. Resolves with the child once
 * it answers PING; rejects with {portInUse: true} when the port was taken.
 */
async function spawnServer(dir, port) {
  const logFile = path.join(dir, "redis.log");
  const args = ["--port", String(port), "--bind", "127.0.0.1", "--dir", dir];
  args.push("--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no", "--logfile", logFile);
  const proc = spawn(serverBin, args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  proc.stderr.setEncoding("utf8");
  proc.stderr.on("data", (c) => (stderr += c));
  let exited = null;
  const exitedP = new Promise((resolve) => {
    proc.on("exit", (code, sig) => {
      exited = { code, sig };
      resolve(exited);
    });
  });
  let spawnError = null;
  proc.on("error", (e) => (spawnError = e));
  const log = () => {
    try {
      return readFileSync(logFile, "utf8");
    } catch {
      return "";
    }
  };
  const end = Date.now() + 15000;
  for (;;) {
    if (spawnError) {
      if (spawnError.code === "ENOENT") {
        throw new Error(
          `${serverBin} not found: the cluster tests need a real Redis server. ` +
            "Install it (apt-get install redis-server, which .ci/run does) or set $REDIS_SERVER",
        );
      }
      throw spawnError;
    }
    if (exited) {
      const text = `${stderr}\n${log()}`;
      const err = new Error(`redis-server exited at start (${exited.code ?? exited.sig}):\n${text}`);
      err.portInUse = /Address already in use/.test(text);
      throw err;
    }
    if (await pings(port)) return { proc, exitedP };
    if (Date.now() > end) {
      proc.kill("SIGKILL");
      throw new Error(`redis-server did not answer PING within 15 s:\n${log()}`);
    }
    await sleep(20);
  }
}

/**
 * Starts a redis-server. Resolves with {port, url, dir, stop(), kill(), startAgain(),
 * command(args), cleanup()} once it answers PING. Track it: kill() in an `after` hook.
 */
export async function startRedis() {
  const dir = tempDir("docrelay-redis-");
  let port;
  let current;
  for (let attempt = 0; ; attempt++) {
    port = await freePort();
    try {
      current = await spawnServer(dir, port);
      break;
    } catch (e) {
      if (!e.portInUse || attempt > 20) throw e;
    }
  }
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}/`,
    dir,
    get running() {
      return current !== null;
    },
    /** SIGTERM (it writes its append-only file) and waits for the exit. */
    async stop() {
      if (!current) return;
      const c = current;
      current = null;
      c.proc.kill("SIGTERM");
      await c.exitedP;
    },
    /** SIGKILL and waits for the exit. */
    async kill() {
      if (!current) return;
      const c = current;
      current = null;
      c.proc.kill("SIGKILL");
      await c.exitedP;
    },
    /** Starts it again on the same port and directory; retries a port still taken for a moment. */
    async startAgain() {
      if (current) throw new Error("startAgain: redis-server is still running");
      const end = Date.now() + 10000;
      for (;;) {
        try {
          current = await spawnServer(dir, port);
          return;
        } catch (e) {
          if (!e.portInUse || Date.now() > end) throw e;
          await sleep(100);
        }
      }
    },
    command(args) {
      return redisCommand(port, args);
    },
    /** Kills it and removes its directory. */
    async cleanup() {
      await redis.kill();
      try {
        rmSync(dir, { recursive: true, force: true });
      } catch {
        /* ignore */
      }
    },
  };
  return redis;
}
