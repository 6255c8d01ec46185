// The web client's end-to-end encryption costs, for docs/BENCHMARKS.md: the
// committed WebAssembly module (crates/skylark-gateway/web/e2ee/) driven
// through the same interface the page uses (ids as strings, base64, JSON),
// in Node's V8 — the engine of Chromium. The same measures as
// `cargo run --release -p skylark-e2ee --example figures` (native):
//
//   node bench/e2ee-wasm.mjs [SIZES...]     (default: 2 100)
//
// Only two devices do work — the committer and one member that applies
// everything — so the times are one device's CPU, single-threaded.

import { readFileSync } from "node:fs";
import { generateKeyPairSync, sign } from "node:crypto";
import { Device, initSync } from "../crates/skylark-gateway/web/e2ee/skylark_e2ee_web.js";

initSync({ module: readFileSync(new URL("../crates/skylark-gateway/web/e2ee/skylark_e2ee_web_bg.wasm", import.meta.url)) });

const ROUNDS = 200;
const CHANGES = 20;
const TEXT = new TextEncoder().encode("x".repeat(100));

/// A device of account `account`, its MLS key bound by an Ed25519 device key.
function device(account) {
  const d = new Device(String(account), "1");
  const { privateKey } = generateKeyPairSync("ed25519");
  d.bind(new Uint8Array(sign(null, Buffer.from(d.bindingRequest()), privateKey)));
  return d;
}

const packageOf = (account) => ({ account: String(account), device: "1", keyPackage: JSON.parse(device(account).keyPackages(1))[0] });
const per = (ms, n) => (ms / n >= 1 ? `${(ms / n).toFixed(2)} ms` : `${((ms / n) * 1000).toFixed(0)} µs`);

const sizes = process.argv.slice(2).map(Number);
console.log("| devices | message: encrypt | decrypt | add 1 device: commit | a member applies it | remove 1 device: commit | a member applies it | state per device |");
console.log("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
for (const size of sizes.length ? sizes : [2, 100]) {
  const G = "1";
  const admin = device(1);
  const observer = device(2);
  admin.create(G);
  const first = { account: "2", device: "1", keyPackage: JSON.parse(observer.keyPackages(1))[0] };
  let c = JSON.parse(admin.add(G, JSON.stringify([first])));
  admin.commitAccepted(G);
  let n = 0;
  observer.openOnce(`k${n++}`, c.payload);
  const others = Array.from({ length: size - 2 }, (_, i) => packageOf(i + 3));
  for (let i = 0; i < others.length; i += 32) {
    c = JSON.parse(admin.add(G, JSON.stringify(others.slice(i, i + 32))));
    admin.commitAccepted(G);
    observer.openOnce(`k${n++}`, c.payload);
  }
  let enc = 0;
  let dec = 0;
  for (let i = 0; i < ROUNDS; i++) {
    const t0 = performance.now();
    const p = admin.encryptAs(G, `m${i}`, TEXT);
    const t1 = performance.now();
    const opened = JSON.parse(observer.openOnce(`k${n++}`, p));
    const t2 = performance.now();
    if (opened.kind !== "message") throw new Error(`not opened: ${JSON.stringify(opened)}`);
    enc += t1 - t0;
    dec += t2 - t1;
  }
  let [add, addApply, remove, removeApply] = [0, 0, 0, 0];
  for (let i = 0; i < CHANGES; i++) {
    const p = packageOf(10000 + i);
    let t0 = performance.now();
    c = JSON.parse(admin.add(G, JSON.stringify([p])));
    admin.commitAccepted(G);
    let t1 = performance.now();
    observer.openOnce(`k${n++}`, c.payload);
    let t2 = performance.now();
    add += t1 - t0;
    addApply += t2 - t1;
    t0 = performance.now();
    c = JSON.parse(admin.removeDevices(G, JSON.stringify([{ account: p.account, device: "1" }])));
    admin.commitAccepted(G);
    t1 = performance.now();
    observer.openOnce(`k${n++}`, c.payload);
    t2 = performance.now();
    remove += t1 - t0;
    removeApply += t2 - t1;
  }
  const state = `${Math.round(observer.save().length / 1024)} KB`;
  console.log(`| ${size} | ${per(enc, ROUNDS)} | ${per(dec, ROUNDS)} | ${per(add, CHANGES)} | ${per(addApply, CHANGES)} | ${per(remove, CHANGES)} | ${per(removeApply, CHANGES)} | ${state} |`);
}
