// The web client's key-package claims (`Crypto.claimAll` in e2ee.js), run
// in Node against a stand-in for the server's session: numbers claimed 50
// to a request; one number at a time when a server refuses a batch with
// ERROR_CODE_INVALID_ARGUMENT (a rate limit whose burst holds fewer claims
// than the batch, or a server older than batched claims); other refusals
// passed on; rate limits waited out. The packages are real ones, made and
// checked by the page's WebAssembly engine. Run by tests/it/web.rs.

import { readFileSync } from "node:fs";
import { generateKeyPairSync, sign } from "node:crypto";
import assert from "node:assert/strict";

const web = new URL("../../../skylark-gateway/web/", import.meta.url);
const { Device, initSync } = await import(new URL("e2ee/skylark_e2ee_web.js", web));
const { Crypto } = await import(new URL("e2ee.js", web));
const { Refused } = await import(new URL("proto.js", web));
initSync({ module: readFileSync(new URL("e2ee/skylark_e2ee_web_bg.wasm", web)) });

/// An account's one device: its key package, bound to its device key.
function account(id) {
  const d = new Device(String(id), "1");
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  d.bind(new Uint8Array(sign(null, Buffer.from(d.bindingRequest()), privateKey)));
  const deviceKey = publicKey.export({ format: "der", type: "spki" }).subarray(-32).toString("base64");
  return { accountId: String(id), devices: [{ deviceId: "1", keyPackage: JSON.parse(d.keyPackages(1))[0], deviceKey }] };
}

const phoneOf = (i) => `+1555${String(i).padStart(7, "0")}`;
const ACCOUNTS = new Map(Array.from({ length: 120 }, (_, i) => [phoneOf(i), account(1000 + i)]));
const PHONES = [...ACCOUNTS.keys()];

/// The server's side of claims. `refuseBatches`: the error a claim of
/// several numbers gets; `rateLimitFirst`: the first request is told to
/// wait that many milliseconds.
function server({ refuseBatches, rateLimitFirst } = {}) {
  const requests = [];
  const answer = (phone) => {
    const known = ACCOUNTS.get(phone);
    if (!known) throw new Refused({ code: "ERROR_CODE_UNKNOWN_RECIPIENT", message: `no account has the phone number ${phone}` });
    return { phone, ...known };
  };
  return {
    requests,
    async request(body) {
      const claim = body.claimKeyPackages;
      assert.ok(claim, `only claims are expected, not ${JSON.stringify(body)}`);
      requests.push(claim.phones ? claim.phones.length : "one");
      if (rateLimitFirst && requests.length === 1) {
        throw new Refused({ code: "ERROR_CODE_RATE_LIMITED", message: "too many claims", retryAfterMs: rateLimitFirst });
      }
      if (claim.phones) {
        if (refuseBatches) throw new Refused({ code: refuseBatches, message: "refused" });
        assert.ok(claim.phones.length <= 50, "a batch names at most 50 numbers");
        return { claimedKeyPackages: { accounts: claim.phones.map(answer) } };
      }
      return { claimedKeyPackages: answer(claim.phone) };
    },
  };
}

const me = { accountId: "1", deviceId: "1", phone: "+15550009999" };
const crypto = new Crypto(me, null, new Device("1", "1"));
const accounts = (result) => result.packages.map((p) => p.account);
const expected = (phones) => phones.map((p) => ACCOUNTS.get(p).accountId);

// 120 numbers: three requests (50, 50, 20), every package, in order.
let s = server();
let got = await crypto.claimAll(s, PHONES);
assert.deepEqual(s.requests, [50, 50, 20]);
assert.deepEqual(accounts(got), expected(PHONES));
assert.deepEqual(got.withoutKeys, []);

// A server that refuses batches as invalid: the same packages, one number at a time.
s = server({ refuseBatches: "ERROR_CODE_INVALID_ARGUMENT" });
got = await crypto.claimAll(s, PHONES.slice(0, 3));
assert.deepEqual(s.requests, [3, "one", "one", "one"]);
assert.deepEqual(accounts(got), expected(PHONES.slice(0, 3)));

// Falling back names the bad number itself.
s = server({ refuseBatches: "ERROR_CODE_INVALID_ARGUMENT" });
await assert.rejects(crypto.claimAll(s, [PHONES[0], "+15550000999"]), (err) => {
  assert.equal(err.code, "ERROR_CODE_UNKNOWN_RECIPIENT");
  assert.match(err.message, /\+15550000999/);
  return true;
});
assert.deepEqual(s.requests, [2, "one", "one"]);

// Any other refusal of a batch is the answer: no fallback.
s = server({ refuseBatches: "ERROR_CODE_UNKNOWN_RECIPIENT" });
await assert.rejects(crypto.claimAll(s, PHONES.slice(0, 2)), (err) => err.code === "ERROR_CODE_UNKNOWN_RECIPIENT");
assert.deepEqual(s.requests, [2]);

// Told to wait: it waits and asks again.
s = server({ rateLimitFirst: 20 });
got = await crypto.claimAll(s, PHONES.slice(0, 2));
assert.deepEqual(s.requests, [2, 2]);
assert.deepEqual(accounts(got), expected(PHONES.slice(0, 2)));

// A device without keys is named, not added.
const bare = "+15550000777";
ACCOUNTS.set(bare, { accountId: "77", devices: [{ deviceId: "1", keyPackage: "", deviceKey: "" }] });
s = server();
got = await crypto.claimAll(s, [PHONES[0], bare]);
assert.deepEqual(got.withoutKeys, [bare]);
assert.deepEqual(accounts(got), expected([PHONES[0]]));

console.log("web claims: ok");
