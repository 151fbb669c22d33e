// A reader in its own process, so that the test can stop it (SIGSTOP) and make it lag.
// argv: url document target. Prints "ready" when joined, then one JSON line when its
// seq reaches `target`: {seqs, lagged, snapshots, status}.
import { DocRelayClient } from "../docrelay.js";

const [url, document, target] = process.argv.slice(2);
let lagged = 0;
let morePages = 0;
class PeekingWS extends WebSocket {
  constructor(...a) {
    super(...a);
    this.addEventListener("message", (ev) => {
      if (typeof ev.data !== "string") return;
      if (ev.data.includes('"type":"lagged"')) lagged++;
      if (ev.data.startsWith('{"type":"sync_response"') && ev.data.includes('"more":true')) morePages++;
    });
  }
}
const c = new DocRelayClient({ url, document, token: "slow", WebSocket: PeekingWS });
const seqs = [];
let snapshots = 0;
c.on("operation", (op) => {
  seqs.push(op.seq);
  if (op.seq === Number(target)) {
    process.stdout.write(JSON.stringify({ seqs, lagged, morePages, snapshots, status: c.status }) + "\n");
    c.close();
  }
});
c.on("snapshot", () => snapshots++);
c.on("error", (e) => process.stderr.write(`error ${e.code} ${e.message}\n`));
await c.connect();
process.stdout.write("ready\n");
