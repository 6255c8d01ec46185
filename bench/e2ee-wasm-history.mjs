// What keeping the page's encryption state costs per write once its
// history is long, for docs/BENCHMARKS.md: a 1:1 conversation whose device
// has opened HISTORY messages (default 20,000), then 200 more, each
// followed by what the page does before acknowledging a batch of live
// events. Compared: the whole state (`save`, what the page wrote until
// 2026-12-06) and the state without its history plus the journal records
// that changed (`saveCore` + `journalChanges`, what it writes now). The
// IndexedDB write itself is not in these times (Node has none); its size
// is shown.
//
//   node bench/e2ee-wasm-history.mjs [HISTORY]

import { readFileSync } from "node:fs";
import { generateKeyPairSync, sign } from "node:crypto";
import { Device, initSync } from "../crates/skylark-gateway/web/e2ee/skylark_e2ee_web.js";

initSync({ module: readFileSync(new URL("../crates/skylark-gateway/web/e2ee/skylark_e2ee_web_bg.wasm", import.meta.url)) });

const TIMED = 200;
const TEXT = new TextEncoder().encode("x".repeat(100));
const G = "1";

function device(account) {
  const d = new Device(String(account), "1");
  const { privateKey } = generateKeyPairSync("ed25519");
  d.bind(new Uint8Array(sign(null, Buffer.from(d.bindingRequest()), privateKey)));
  return d;
}

const history = Number(process.argv[2] || 20000);
const writer = device(1);
const reader = device(2);
writer.create(G);
const added = JSON.parse(writer.add(G, JSON.stringify([{ account: "2", device: "1", keyPackage: JSON.parse(reader.keyPackages(1))[0] }])));
writer.commitAccepted(G);
reader.openOnce("post:1:0", added.payload, undefined);
for (let i = 1; i <= history; i++) reader.openOnce(`post:1:${i}`, writer.encryptAs(G, `c${i}`, TEXT), undefined);
reader.journalChanges();

let seq = history;
function run(write) {
  let bytes = 0;
  const started = performance.now();
  for (let i = 0; i < TIMED; i++) {
    seq += 1;
    reader.openOnce(`post:1:${seq}`, writer.encryptAs(G, `c${seq}`, TEXT), undefined);
    bytes += write();
  }
  return { ms: (performance.now() - started) / TIMED, bytes: bytes / TIMED };
}
const whole = run(() => reader.save().length);
const apart = run(() => reader.saveCore().length + reader.journalChanges().length);
const kb = (b) => `${(b / 1000).toFixed(b < 10000 ? 1 : 0)} KB`;
console.log(`history ${history}: open + save whole ${whole.ms.toFixed(2)} ms (${kb(whole.bytes)} written); `
  + `open + save apart ${apart.ms.toFixed(2)} ms (${kb(apart.bytes)} written)`);
