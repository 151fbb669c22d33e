// Compiled (not run) by `tsc -p tsconfig.json` in CI: the README's API, written against
// docrelay.d.ts in strict mode, so that a declaration that drifts from the documented API
// fails the build. The `@ts-expect-error` lines must stay errors.
import { DocRelayClient, backoffDelay, normalizeBackoff, DEFAULT_BACKOFF } from "../docrelay.js";
import type { Joined, Operation, PresenceEvent, Status, DocRelayError, Participant, SyncEvent } from "../docrelay.js";

async function main(): Promise<void> {
  const client = new DocRelayClient({
    url: ["ws://127.0.0.1:9001", "ws://127.0.0.1:9002"],
    document: "d1",
    token: async () => "ada",
    color: "#1f77b4",
    backoff: { initial: 100, max: 5000, factor: 2, jitter: 0.5 },
  });
  const stop: () => void = client.on("operation", (op: Operation) => {
    const seq: number = op.seq;
    const who: string = op.user_id;
    void [seq, who, op.connection_id, op.payload];
  });
  stop();
  client.on("presence", (ev: PresenceEvent) => {
    if (ev.type === "cursor") void ev.payload;
    if (ev.type === "user_joined") void ev.user_name;
  });
  client.on("status", (s: Status) => void (s === "reconnecting"));
  client.on("error", (e) => void [e.code, e.message]);
  client.on("snapshot", ({ seq, state }) => void [seq, state]);
  client.on("reset", ({ epoch }) => void epoch.length);
  client.on("sync", (s: SyncEvent) => void [s.active, s.seq]);
  const joined: Joined = await client.connect();
  void [joined.seq, joined.epoch, joined.participant_count, joined.connection_id];
  try {
    const { seq } = await client.send({ insert: "x", at: 3, nested: [1, null, true] });
    await client.snapshot(seq, { text: "x" });
  } catch (err) {
    const e = err as DocRelayError;
    void [e.code, e.clientOpId];
  }
  const sent: boolean = client.cursor({ at: 4 });
  const people: Participant[] = client.participants;
  const now: [number, string | null, boolean] = [client.seq, client.epoch, client.syncing];
  void [sent, people, now, backoffDelay(3, normalizeBackoff({ max: 1000 })), DEFAULT_BACKOFF.initial];
  client.close();

  // @ts-expect-error a payload must be a JSON value
  void client.send(() => 1);
  // @ts-expect-error there is no such event
  client.on("message", () => {});
  // @ts-expect-error document is required
  void new DocRelayClient({ url: "ws://x", token: "t" });
}
void main;
