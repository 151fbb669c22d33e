import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffDelay, normalizeBackoff, DEFAULT_BACKOFF, DocRelayClient } from "../docrelay.js";

test("backoff delays grow exponentially and stay within bounds", () => {
  const opts = { initial: 100, max: 5000, factor: 2, jitter: 0 };
  assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 10, 100, 1e9].map((n) => backoffDelay(n, opts)), [100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000, 5000]);
  // With jitter, every delay lies in [base * (1 - jitter), base], never above max.
  const j = { initial: 100, max: 5000, factor: 2, jitter: 0.5 };
  for (let n = 0; n < 40; n++) {
    const base = Math.min(5000, 100 * 2 ** n);
    for (const r of [0, 0.25, 0.999999, 1]) {
      const d = backoffDelay(n, j, () => r);
      assert.ok(d >= base * 0.5 && d <= base && d <= 5000, `attempt ${n}, random ${r}: ${d}`);
    }
    for (let k = 0; k < 50; k++) {
      const d = backoffDelay(n, j);
      assert.ok(d >= base * 0.5 - 1e-9 && d <= base, `attempt ${n}: ${d}`);
    }
  }
  // A broken random source cannot push a delay out of bounds.
  for (const r of [-5, 7, NaN, Infinity]) {
    const d = backoffDelay(3, j, () => r);
    assert.ok(d >= 400 && d <= 800, `random ${r}: ${d}`);
  }
  // Defaults are bounded too.
  for (let n = 0; n < 100; n++) assert.ok(backoffDelay(n) <= DEFAULT_BACKOFF.max);
});

test("backoff options are validated", () => {
  assert.deepEqual(normalizeBackoff({ initial: 10 }), { ...DEFAULT_BACKOFF, initial: 10 });
  for (const bad of [{ initial: 0 }, { initial: 500, max: 100 }, { max: 1e9 }, { factor: 0.5 }, { factor: 100 }, { jitter: -0.1 }, { jitter: 2 }, { initial: NaN }, { max: "10" }]) {
    assert.throws(() => normalizeBackoff(bad), RangeError, JSON.stringify(bad));
    assert.throws(() => new DocRelayClient({ url: "ws://x", document: "d", token: "t", backoff: bad, WebSocket: function () {} }), RangeError);
  }
});

test("constructor checks its options", () => {
  const W = function () {};
  assert.throws(() => new DocRelayClient({ url: [], document: "d", token: "t", WebSocket: W }), TypeError);
  assert.throws(() => new DocRelayClient({ url: "ws://x", document: "a b", token: "t", WebSocket: W }), TypeError);
  assert.throws(() => new DocRelayClient({ url: "ws://x", document: "d", WebSocket: W }), TypeError);
  assert.throws(() => new DocRelayClient({ url: "ws://x", document: "d", token: "t", since: -1, WebSocket: W }), TypeError);
});
