// The web client's encryption logic (e2ee.js), run in Node against a
// stand-in for the server's session, where a real server cannot easily be
// made to answer what a test needs. The MLS work is real: the page's
// WebAssembly engine. Run by tests/it/web.rs.
//
// Key-package claims (`Crypto.claimAll`): numbers claimed 50 to a request;
// one number at a time when a server refuses a batch with
// ERROR_CODE_INVALID_ARGUMENT (a rate limit whose burst holds fewer claims
// than the batch, or a server older than batched claims); other refusals
// passed on; rate limits waited out.
//
// Commits (`Crypto.commit`, `Crypto.resume`): one the server refuses for
// good (too large, say) is dropped and said in words, so the group's
// encryption goes on; one refused while the server is busy stays staged
// for the next connect, which drops it if it is then refused for good.
// Members added for a commit refused for good are taken out again
// (`Crypto.undoUnkeyedAdd`); not while the commit is staged.
//
// Posts and commits that cross (`Crypto.sendSealed`, `Crypto.commit`): no
// device keeps past epochs' keys, so a post names the epoch it was made in
// and is made again when the group refuses it as stale, and a committer
// applies its commit only when it comes back on the live log, after the
// posts ordered before it.
//
// Device changes (`Crypto.maintain`): a conversation that refuses one does
// not keep it from the others; the refusal is said, and stays to do. A
// linked device gets the history of the account's 1:1 conversations, and
// history a lost connection kept from it is given by the next run. A
// commit whose connection closed before an answer stays staged.

import { readFileSync } from "node:fs";
import { generateKeyPairSync, sign } from "node:crypto";
import assert from "node:assert/strict";

const web = new URL("../../../skylark-gateway/web/", import.meta.url);
const { Device, initSync } = await import(new URL("e2ee/skylark_e2ee_web.js", web));
const { Crypto } = await import(new URL("e2ee.js", web));
const { Refused } = await import(new URL("proto.js", web));
initSync({ module: readFileSync(new URL("e2ee/skylark_e2ee_web_bg.wasm", web)) });

/// Device `device` of account `id`, its MLS key bound to a fresh device key.
function bound(id, device = "1") {
  const d = new Device(String(id), device);
  const { privateKey, publicKey } = generateKeyPairSync("ed25519");
  d.bind(new Uint8Array(sign(null, Buffer.from(d.bindingRequest()), privateKey)));
  return { device: d, deviceKey: publicKey.export({ format: "der", type: "spki" }).subarray(-32).toString("base64") };
}

/// An account's one device, as a claim answers it.
function account(id) {
  const { device: d, deviceKey } = bound(id);
  return { accountId: String(id), devices: [{ deviceId: "1", keyPackage: JSON.parse(d.keyPackages(1))[0], deviceKey }] };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
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

// ---- Commits the server refuses.

const G = "7";
/// A LocalStore kept in a Map (`kept`), as IndexedDB would keep it.
function mapStore(kept = new Map()) {
  return {
    kept,
    writes: [],
    get: async (k) => kept.get(k),
    put: async (k, v) => void kept.set(k, v),
    putEvents: async function (events, meta = {}, drop = []) {
      this.writes.push({ meta: Object.keys(meta), drop: [...drop], bytes: Object.values(meta).reduce((n, v) => n + (v.length || 0), 0) });
      for (const k of drop) kept.delete(k);
      for (const [k, v] of Object.entries(meta)) kept.set(k, v);
    },
    getPrefixed: async (prefix) => [...kept.entries()].filter(([k]) => k.startsWith(prefix)).sort(([a], [b]) => (a < b ? -1 : 1)),
  };
}
const local = mapStore();
const TEXT = new TextEncoder().encode("after the refusal");

/// A group of one browser, and a commit adding one device posted to a
/// server that refuses every post with `code`.
async function refusedCommit(code) {
  const admin = bound(1).device;
  admin.create(G);
  const page = new Crypto(me, local, admin);
  const joining = ACCOUNTS.get(PHONES[1]);
  const packages = JSON.stringify([{ account: joining.accountId, device: "1", keyPackage: joining.devices[0].keyPackage }]);
  const session = refusing(code);
  const outcome = await page.commit(session, G, (d) => d.add(G, packages)).then(() => null, (err) => err);
  return { admin, page, outcome, session };
}

function refusing(code) {
  return {
    posts: 0,
    async request(body) {
      assert.ok(body.send && body.send.commitEpoch !== undefined, `only commits are expected, not ${JSON.stringify(body)}`);
      this.posts += 1;
      throw new Refused({ code, message: "payload of 4678 bytes exceeds the limit of 3000" });
    },
  };
}

// Refused for good: dropped, said in words, and the group still encrypts.
let r = await refusedCommit("ERROR_CODE_MESSAGE_TOO_LARGE");
assert.ok(r.outcome instanceof Error && !(r.outcome instanceof Refused), `${r.outcome}`);
assert.match(r.outcome.message, /too large for this server, in a post and as a file \(payload of 4678 bytes/);
assert.match(r.outcome.message, /was not changed/);
assert.equal(r.session.posts, 1, "posted once, not tried again");
assert.equal(r.admin.hasPendingCommit(G), false, "the commit was dropped");
assert.deepEqual(JSON.parse(r.admin.outgoing()), [], "nothing is left to send again");
assert.ok(r.admin.encryptAs(G, "m1", TEXT), "the group still encrypts");

/// A server that answers the group's info (the admin and `added`) and
/// records the members taken out.
function groupInfoServer(added) {
  const removed = [];
  return {
    removed,
    async request(body) {
      if (body.getGroup) {
        const members = [{ phone: me.phone, account: "1" }, ...added.map((p) => ({ phone: p, account: ACCOUNTS.get(p).accountId }))];
        return { groupInfo: { id: G, members } };
      }
      assert.ok(body.changeGroup && body.changeGroup.remove, `only removals are expected, not ${JSON.stringify(body)}`);
      removed.push(body.changeGroup.remove);
      return { groupInfo: { id: G } };
    },
  };
}
// The member the server took could not get the keys: taken out again.
let info = groupInfoServer([PHONES[1]]);
assert.deepEqual(await r.page.undoUnkeyedAdd(info, G, [PHONES[1]]), [PHONES[1]]);
assert.deepEqual(info.removed, [PHONES[1]]);

// Refused while the server is busy: it stays staged for the next connect…
r = await refusedCommit("ERROR_CODE_UNAVAILABLE");
assert.ok(r.outcome instanceof Refused && r.outcome.code === "ERROR_CODE_UNAVAILABLE", `${r.outcome}`);
assert.equal(r.admin.hasPendingCommit(G), true);
assert.equal(JSON.parse(r.admin.outgoing()).length, 1);
// So is one whose connection closed before an answer (the server may
// have taken it).
const closed = await refusedCommit("CLOSED");
assert.ok(closed.outcome instanceof Refused && closed.outcome.code === "CLOSED", `${closed.outcome}`);
assert.equal(closed.admin.hasPendingCommit(G), true, "a closed connection is no refusal");
// The commit is staged, to be sent again: nobody is taken out.
info = groupInfoServer([PHONES[1]]);
assert.deepEqual(await r.page.undoUnkeyedAdd(info, G, [PHONES[1]]), []);
assert.deepEqual(info.removed, []);
// …which drops it when the server then refuses it for good.
const later = refusing("ERROR_CODE_MESSAGE_TOO_LARGE");
await r.page.resume(later);
assert.equal(later.posts, 1);
assert.equal(r.admin.hasPendingCommit(G), false);
assert.deepEqual(JSON.parse(r.admin.outgoing()), []);
assert.ok(r.admin.encryptAs(G, "m2", TEXT));

// ---- Posts and commits that cross.

const G2 = "8";

/// A group's log as the server keeps it: a commit only for the current
/// epoch, a post only in it; every post is then handed to each page's
/// openEvent in order, on the next turn of the event loop, as the live
/// log would (not to a page that is `away`, until it is back).
function groupLog() {
  const log = { epoch: 0, entries: [], sends: [], pages: [] };
  const stale = () => new Refused({ code: "ERROR_CODE_STALE_EPOCH", message: `the group's encryption moved on (to epoch ${log.epoch})` });
  log.deliver = () => {
    for (const p of log.pages) {
      while (!p.away && p.read < log.entries.length) {
        const opened = p.crypto.openEvent(log.entries[p.read++]);
        if (opened) p.opened.push(opened);
      }
    }
  };
  log.join = (account) => {
    const { device } = bound(account);
    const page = { crypto: new Crypto({ accountId: String(account), deviceId: "1" }, local, device), read: 0, opened: [], away: false };
    page.session = {
      async request(body) {
        const s = body.send;
        assert.ok(s && s.group === G2, `only posts to the group are expected, not ${JSON.stringify(body)}`);
        log.sends.push({ by: account, clientId: s.clientId, commitEpoch: s.commitEpoch, messageEpoch: s.messageEpoch });
        if (s.commitEpoch !== undefined) {
          if (Number(s.commitEpoch) !== log.epoch) throw stale();
          log.epoch += 1;
        } else if (s.messageEpoch === undefined || Number(s.messageEpoch) !== log.epoch) {
          throw stale();
        }
        const seq = String(log.entries.length + 1);
        const message = { senderDevice: "1", clientId: s.clientId, payload: s.payload };
        log.entries.push({ seq, group: { group: G2, groupSeq: seq, by: String(account), message } });
        setTimeout(log.deliver, 0);
        return { sendAck: { id: { sender: G2, seq }, sentAtMs: "1" } };
      },
    };
    log.pages.push(page);
    return page;
  };
  return log;
}

const texts = (page) => page.opened.filter((o) => o.kind === "message").map((o) => Buffer.from(o.plaintext, "base64").toString());
const packageOf = (account) => ({ account: String(account), device: "1", keyPackage: JSON.parse(bound(account).device.keyPackages(1))[0] });

const log = groupLog();
const admin = log.join(21);
const member = log.join(22);
admin.crypto.device.create(G2);
// The member's device takes the Welcome: its package is its own device's.
const joining = JSON.parse(member.crypto.device.keyPackages(1))[0];
await admin.crypto.commit(admin.session, G2, (d) => d.add(G2, JSON.stringify([{ account: "22", device: "1", keyPackage: joining }])));
assert.equal(admin.crypto.device.hasPendingCommit(G2), false, "applied from the live log");
assert.equal(admin.crypto.device.epoch(G2), "1");
assert.ok(member.crypto.encrypts(G2), "the member joined from the Welcome");

// The member posts, its first post: a commit of fresh keys for its leaf
// goes first (epoch 2), then the post. The admin commits before its page
// has opened either: its commit for epoch 1 is refused, it reads the
// member's, and commits again. The log has the post first: the admin opens
// it (in epoch 2) and then applies its own commit. Applying the commit as
// soon as the server took it would leave the post unreadable.
const m1 = { clientId: "m1" };
await member.crypto.sendSealed(member.session, m1, G2, new TextEncoder().encode("before the commit"), { clientId: "m1" });
assert.equal(member.crypto.device.epoch(G2), "2", "the member's first post came after a commit of its fresh keys");
assert.equal(member.crypto.device.wantsUpdate(G2), false, "once");
member.away = true;
const third = packageOf(23);
await admin.crypto.commit(admin.session, G2, (d) => d.add(G2, JSON.stringify([third])));
assert.deepEqual(texts(admin), ["before the commit"]);
assert.equal(admin.crypto.device.epoch(G2), "3");

// The member has not seen the commit: its post, made in epoch 2, is
// refused; it waits for the commit on the live log and makes it again
// (no second refresh).
const m2 = { clientId: "m2" };
setTimeout(() => {
  member.away = false;
  log.deliver();
}, 50);
await member.crypto.sendSealed(member.session, m2, G2, new TextEncoder().encode("after the commit"), { clientId: "m2" });
const tries = log.sends.filter((s) => s.clientId === "m2").map((s) => s.messageEpoch);
assert.deepEqual(tries, ["2", "3"], "refused in the ended epoch, taken in the new one");
assert.equal(member.crypto.device.epoch(G2), "3");
await sleep(10);
assert.deepEqual(texts(admin), ["before the commit", "after the commit"]);
assert.ok(!admin.opened.some((o) => o.kind === "failed"), JSON.stringify(admin.opened));

// A post made while the page's own commit is on its way (taken, not yet
// back on the live log) waits for it, and goes out once, in the new epoch.
const committing = admin.crypto.commit(admin.session, G2, (d) => d.add(G2, JSON.stringify([packageOf(24)])));
assert.equal(admin.crypto.device.hasPendingCommit(G2), true);
const m3 = { clientId: "m3" };
await admin.crypto.sendSealed(admin.session, m3, G2, new TextEncoder().encode("while the commit comes back"), { clientId: "m3" });
await committing;
assert.deepEqual(log.sends.filter((s) => s.clientId === "m3").map((s) => s.messageEpoch), ["4"]);
await sleep(10);
// (A page shows its own posts from its journal: the member's list has its own two.)
assert.deepEqual(texts(member), ["before the commit", "after the commit", "while the commit comes back"]);
assert.ok(!member.opened.some((o) => o.kind === "failed"), JSON.stringify(member.opened));

// A week after its last commit, on the page's clock, the member's keys are
// due again: its next post commits a refresh first (post-compromise
// security).
assert.equal(member.crypto.device.wantsUpdate(G2), false);
const realNow = Date.now;
Date.now = () => realNow() + 7 * 24 * 3600 * 1000;
try {
  assert.equal(member.crypto.device.wantsUpdate(G2), true, "a week after its last commit");
  const epoch = Number(member.crypto.device.epoch(G2));
  const m4 = { clientId: "m4" };
  await member.crypto.sendSealed(member.session, m4, G2, new TextEncoder().encode("a week later"), { clientId: "m4" });
  assert.equal(member.crypto.device.epoch(G2), String(epoch + 1), "a refresh before the post");
  assert.equal(member.crypto.device.wantsUpdate(G2), false);
} finally {
  Date.now = realNow;
}
await sleep(10);
assert.deepEqual(texts(admin).slice(-1), ["a week later"]);
assert.equal(admin.crypto.device.epoch(G2), member.crypto.device.epoch(G2));

// A month on, the keys of a page that posts nothing are due too: it
// refreshes them as it carries device changes on connecting (maintain).
assert.deepEqual(JSON.parse(admin.crypto.device.staleGroups()), []);
Date.now = () => realNow() + 31 * 24 * 3600 * 1000;
try {
  assert.deepEqual(JSON.parse(admin.crypto.device.staleGroups()), [G2]);
  const epoch = Number(admin.crypto.device.epoch(G2));
  await admin.crypto.maintain(admin.session);
  assert.equal(admin.crypto.device.epoch(G2), String(epoch + 1), "a refresh without a post");
  assert.deepEqual(JSON.parse(admin.crypto.device.staleGroups()), []);
} finally {
  Date.now = realNow;
}
await sleep(10);
assert.equal(member.crypto.device.epoch(G2), admin.crypto.device.epoch(G2), "the member applied it");

// ---- A device change one conversation refuses.

{
  const owner = bound(31);
  const page = new Crypto({ accountId: "31", deviceId: "1", phone: "+15550003100" }, null, owner.device);
  const kept = new Map([["e2ee-todo", { add: ["2"], remove: [] }]]);
  page.local = mapStore(kept);
  const [REFUSING, TAKING] = ["10", "9"]; // the refusing group comes first in the page's list
  page.device.create(REFUSING);
  page.device.create(TAKING);
  const laptop = bound(31, "2");
  let seq = 0;
  const session = {
    async request(body) {
      if (body.claimKeyPackages) {
        const keyPackage = JSON.parse(laptop.device.keyPackages(1))[0];
        return { claimedKeyPackages: { phone: "+15550003100", accountId: "31", devices: [{ deviceId: "2", keyPackage, deviceKey: laptop.deviceKey }] } };
      }
      const s = body.send;
      assert.ok(s && s.commitEpoch !== undefined, `only commits are expected, not ${JSON.stringify(body)}`);
      if (s.group === REFUSING) throw new Refused({ code: "ERROR_CODE_NOT_A_MEMBER", message: "you are not a member of this group" });
      seq += 1;
      const message = { senderDevice: "1", clientId: s.clientId, payload: s.payload };
      const event = { seq: String(seq), group: { group: s.group, groupSeq: String(seq), by: "31", message } };
      setTimeout(() => page.openEvent(event), 0);
      return { sendAck: { id: { sender: s.group, seq: String(seq) }, sentAtMs: "1" } };
    },
  };
  const failed = await page.maintain(session).then(() => null, (err) => err);
  assert.ok(failed instanceof Error, "the refusal is said");
  assert.match(failed.message, /could not be carried into the encryption of 1 conversation \(.*not a member/);
  const devices = (g) => JSON.parse(page.device.members(g)).map((m) => m.device);
  assert.deepEqual(devices(TAKING).sort(), ["1", "2"], "the other conversation has the laptop");
  assert.deepEqual(devices(REFUSING), ["1"]);
  assert.deepEqual(kept.get("e2ee-todo").add, ["2"], "still to do for the refusing one");
}

// ---- A linked device gets the history of the account's 1:1 conversations.

{
  const owner = bound(51);
  const page = new Crypto({ accountId: "51", deviceId: "1", phone: "+15550005100" }, null, owner.device);
  page.local = mapStore(new Map([["e2ee-todo", { add: ["2"], remove: [] }]]));
  const peer = bound(52).device;
  const laptop = bound(51, "2");
  const laptopPage = new Crypto({ accountId: "51", deviceId: "2", phone: "+15550005100" }, null, laptop.device);
  const [DIRECT, GROUP] = ["12", "13"];
  const entries = [];
  const post = (group, payload, by, clientId) => {
    const seq = String(entries.length + 1);
    const event = { seq, group: { group, groupSeq: seq, by, message: { senderDevice: "1", clientId, payload } } };
    entries.push(event);
    return event;
  };
  for (const g of [DIRECT, GROUP]) {
    page.device.create(g);
    const start = JSON.parse(page.device.add(g, JSON.stringify([{ account: "52", device: "1", keyPackage: JSON.parse(peer.keyPackages(1))[0] }])));
    page.device.commitAccepted(g);
    peer.openOnce(`post:${g}:0`, start.payload, undefined);
    // Each conversation has a message from the peer, which the page read.
    const text = new TextEncoder().encode(`said in ${g}, before the laptop`);
    assert.equal(page.openEvent(post(g, peer.encryptAs(g, `p${g}`, text), "52", `p${g}`)).kind, "message");
  }
  let closeOnHistory = true; // the connection goes as the history is posted
  let keysLeft = 1; // the laptop has published one key package so far
  const session = {
    async request(body) {
      if (body.claimKeyPackages) {
        const keyPackage = keysLeft-- > 0 ? JSON.parse(laptop.device.keyPackages(1))[0] : "";
        return { claimedKeyPackages: { phone: "+15550005100", accountId: "51", devices: [{ deviceId: "2", keyPackage, deviceKey: laptop.deviceKey }] } };
      }
      if (body.getGroup) return { groupInfo: { id: body.getGroup.group, direct: body.getGroup.group === DIRECT } };
      const s = body.send;
      assert.equal(String(s.messageEpoch ?? s.commitEpoch), page.device.epoch(s.group), "made in the group's epoch");
      if (s.messageEpoch !== undefined && closeOnHistory) throw new Refused({ code: "CLOSED", message: "connection closed" });
      const event = post(s.group, s.payload, "51", s.clientId);
      if (s.commitEpoch !== undefined) setTimeout(() => page.openEvent(event), 0);
      return { sendAck: { id: { sender: s.group, seq: event.seq }, sentAtMs: "1" } };
    },
  };
  // The first run finds keys of the laptop's for one conversation only:
  // it is added there, and stays to add to the other.
  assert.equal(await page.maintain(session), true, "something left to do");
  assert.equal(entries.filter((e) => e.group.by === "51").length, 1, "one commit");
  assert.deepEqual(page.local.kept.get("e2ee-todo").add, ["2"], "still to add where its keys ran short");
  // The next run adds it to the other, and loses its connection as it
  // posts the history: the history stays to give, and the run after gives it.
  keysLeft = Infinity;
  assert.equal(await page.maintain(session), true, "something left to do");
  assert.deepEqual(page.local.kept.get("e2ee-todo").add, []);
  assert.deepEqual(page.local.kept.get("e2ee-todo").history, { [DIRECT]: ["2"] });
  assert.equal(entries.filter((e) => e.group.by === "51").length, 2, "two commits, no history post");
  closeOnHistory = false;
  // A call while another runs says "try again": that one may have read
  // the device changes before its caller noted a new one.
  const [first, second] = await Promise.all([page.maintain(session), page.maintain(session)]);
  assert.deepEqual([first, second], [false, true], "nothing left to do, and a call made while it ran");
  assert.deepEqual(page.local.kept.get("e2ee-todo").history, {});
  // The laptop reads the log: both Welcomes, and one history post, in the
  // 1:1 conversation only.
  const opened = entries.map((e) => [e.group.group, laptopPage.openEvent(e)]);
  const history = opened.filter(([, o]) => o && o.kind === "history");
  assert.deepEqual(history.map(([g, o]) => [g, o.entries]), [[DIRECT, "1"]], JSON.stringify(opened));
  const text = (g) => {
    const o = laptopPage.recallKey(`post:${g}:${entries.find((e) => e.group.group === g && e.group.by === "52").seq}`);
    return o && o.kind === "message" ? Buffer.from(o.plaintext, "base64").toString() : o;
  };
  assert.equal(text(DIRECT), `said in ${DIRECT}, before the laptop`);
  assert.notEqual(text(GROUP), `said in ${GROUP}, before the laptop`, "a group's history is not given");
  assert.ok(laptopPage.encrypts(GROUP) && laptopPage.encrypts(DIRECT));
}

// ---- The history kept apart, in chunks of journal records.

{
  const store = mapStore();
  const reader = bound(41);
  const page = new Crypto({ accountId: "41", deviceId: "1", phone: "+15550004100" }, store, reader.device);
  const writer = bound(42).device;
  const H = "11";
  writer.create(H);
  const added = JSON.parse(writer.add(H, JSON.stringify([{ account: "41", device: "1", keyPackage: JSON.parse(reader.device.keyPackages(1))[0] }])));
  writer.commitAccepted(H);
  const post = (seq, payload, by = "42") => ({ seq: String(seq), group: { group: H, groupSeq: String(seq), by, message: { senderDevice: "1", clientId: `c${seq}`, payload } } });
  page.openEvent(post(1, added.payload));
  assert.ok(page.encrypts(H));
  await page.persist();
  const texts = [];
  for (let i = 2; i < 8; i++) {
    const text = `journal-marker-${i}`;
    texts.push(text);
    assert.equal(page.openEvent(post(i, writer.encryptAs(H, `w${i}`, new TextEncoder().encode(text)))).kind, "message");
    await page.persist();
  }
  // Each write after the first adds a chunk of what changed: a few hundred
  // bytes; and the state's changes, not the state whole.
  const chunks = store.writes.slice(-6).map((w) => w.meta.filter((k) => k.startsWith("e2ee-journal:")));
  assert.ok(chunks.every((c) => c.length === 1), JSON.stringify(store.writes));
  const states = store.writes.slice(-6).map((w) => w.meta.filter((k) => k === "e2ee" || k.startsWith("e2ee-changes:")));
  assert.ok(states.every((c) => c.length === 1 && c[0] !== "e2ee"), JSON.stringify(store.writes));
  const has = (text) => [...store.kept.entries()].filter(([k]) => k.startsWith("e2ee-journal:"))
    .some(([, v]) => Buffer.from(v).includes(text));
  assert.ok(has("journal-marker-7"));
  assert.ok(!Buffer.from(store.kept.get("e2ee")).includes("journal-marker-"), "the engine's state holds no history");

  // A new page reads it all back: the state, its changes applied, is the page's.
  const check = await Crypto.restore({ accountId: "41", deviceId: "1" }, store, async () => { throw new Error("bound already"); });
  assert.deepEqual(check.device.saveCore(), page.device.saveCore());
  const again = await Crypto.restore({ accountId: "41", deviceId: "1" }, store, async () => { throw new Error("bound already"); });
  for (let i = 2; i < 8; i++) {
    const opened = again.recallKey(`post:${H}:${i}`);
    assert.equal(Buffer.from(opened.plaintext, "base64").toString(), `journal-marker-${i}`);
  }
  // A text forgotten (a deletion for everyone) leaves the database: the
  // journal is written afresh as one chunk, the old ones dropped.
  again.forget(`post:${H}:3`);
  const before = [...store.kept.keys()].filter((k) => k.startsWith("e2ee-journal:")).length;
  await again.persist();
  const after = [...store.kept.keys()].filter((k) => k.startsWith("e2ee-journal:"));
  assert.ok(before > 1 && after.length === 1, `${before} chunks, then ${after}`);
  assert.ok(!has("journal-marker-3") && has("journal-marker-4"));

  // A state an earlier page kept (history inline) is carried over.
  const old = mapStore(new Map([["e2ee", again.device.save()]]));
  const carried = await Crypto.restore({ accountId: "41", deviceId: "1" }, old, async () => { throw new Error("bound already"); });
  assert.equal(Buffer.from(carried.recallKey(`post:${H}:5`).plaintext, "base64").toString(), "journal-marker-5");
  assert.ok(!Buffer.from(old.kept.get("e2ee")).includes("journal-marker-"), "moved out of the state");
  const moved = [...old.kept.entries()].filter(([k]) => k.startsWith("e2ee-journal:"));
  assert.equal(moved.length, 1);
  assert.ok(Buffer.from(moved[0][1]).includes("journal-marker-5"));
}

// ---- A message's ratchet step is kept before the message leaves.

{
  const store = mapStore();
  const page = new Crypto({ accountId: "71", deviceId: "1", phone: "+15550007100" }, store, bound(71).device);
  page.device.create("41");
  await page.persist();
  const kept = store.writes.length;
  const session = {
    async request(body) {
      assert.ok(body.send && body.send.messageEpoch !== undefined, JSON.stringify(body));
      assert.ok(store.writes.length > kept, "the state was written before the post left");
      return { sendAck: { id: { sender: "41", seq: "1" }, sentAtMs: "1" } };
    },
  };
  const item = { clientId: "s1" };
  await page.sendSealed(session, item, "41", new TextEncoder().encode("kept first"), { clientId: "s1" });
  assert.ok(item.sealed && item.sealed.epoch === "0");
}

// ---- A tab whose encryption a newer tab took over writes and encrypts nothing.

{
  const store = mapStore();
  const page = new Crypto({ accountId: "61", deviceId: "1", phone: "+15550006100" }, store, bound(61).device);
  page.device.create("21");
  await page.persist();
  const writes = store.writes.length;
  page.stop();
  assert.deepEqual(page.snapshot(), { meta: {}, drop: [] }, "nothing of the state in the tab's writes");
  await assert.rejects(page.persist(), /open in a newer tab/);
  assert.throws(() => page.encrypt("21", "c1", new TextEncoder().encode("x")), /open in a newer tab/);
  assert.equal(store.writes.length, writes);
}

// ---- A commit too large for one post travels as blobs: the post names
// them, and each page downloads the part it needs before opening it.

{
  const G3 = "77";
  const MAX = 2000; // the server's limit, as it says when a page connects (a commit adding four devices is 2.0 KB, one 1.3 KB)
  const blobs = new Map();
  const downloads = []; // [account, part]
  const entries = [];
  const pages = [];
  let delivered = Promise.resolve();
  // The live log: each page gets every entry in order, after its parts
  // are fetched (as the page's frame queue does).
  const deliver = () => {
    delivered = delivered.then(async () => {
      for (const p of pages) {
        while (p.read < entries.length) {
          const entry = entries[p.read++];
          const ready = Crypto.keptOutOfLine(entry) ? await p.crypto.fetchParts(entry) : entry;
          const opened = p.crypto.openEvent(ready);
          if (opened) p.opened.push(opened);
        }
      }
    });
    return delivered;
  };
  const join = (account) => {
    const { device } = bound(account);
    const page = { account: String(account), read: 0, opened: [] };
    page.crypto = new Crypto({ accountId: String(account), deviceId: "1" }, mapStore(), device);
    page.crypto.blobs = {
      async upload(bytes) {
        const id = `blob${blobs.size}`;
        blobs.set(id, Uint8Array.from(bytes));
        return id;
      },
      async download(id) {
        downloads.push([page.account, id]);
        return blobs.get(id);
      },
    };
    page.session = {
      info: { maxPayloadBytes: String(MAX) },
      async request(body) {
        const s = body.send;
        assert.ok(Buffer.from(s.payload, "base64").length <= MAX, "every post fits the server's limit");
        const seq = String(entries.length + 1);
        const message = { senderDevice: "1", clientId: s.clientId, payload: s.payload };
        entries.push({ seq, group: { group: G3, groupSeq: seq, by: page.account, message }, attachments: s.attachments || [] });
        setTimeout(deliver, 0);
        return { sendAck: { id: { sender: G3, seq }, sentAtMs: "1" } };
      },
    };
    pages.push(page);
    return page;
  };
  const admin = join(81);
  const members = [82, 83, 84, 85].map(join);
  admin.crypto.device.create(G3);
  const packages = members.map((m) => ({ account: m.account, device: "1", keyPackage: JSON.parse(m.crypto.device.keyPackages(1))[0] }));
  await admin.crypto.commit(admin.session, G3, (d) => d.add(G3, JSON.stringify(packages)));
  await deliver();
  const start = entries[0];
  assert.ok(Crypto.keptOutOfLine(start), "the start went as a post naming its parts");
  assert.deepEqual(start.attachments, ["blob0", "blob1"], "the commit and the Welcome, as the post's attachments");
  for (const m of members) assert.ok(m.crypto.encrypts(G3), `${m.account} joined from the downloaded Welcome`);
  // The committer fetched its commit back; each new member only the Welcome.
  assert.deepEqual(downloads, [["81", "blob0"], ...members.map((m) => [m.account, "blob1"])]);

  const text = new TextEncoder().encode("all five, out of line");
  await members[0].crypto.sendSealed(members[0].session, { clientId: "big1" }, G3, text, { clientId: "big1" });
  await deliver();
  for (const p of [admin, ...members.slice(1)]) assert.deepEqual(texts(p), ["all five, out of line"], p.account);
  assert.ok(!pages.some((p) => p.opened.some((o) => o.kind === "failed")), "nothing unreadable");
  // Opened once: read again, the post answers from the journal, with no download.
  const before = downloads.length;
  assert.equal(await admin.crypto.fetchParts(start), start);
  assert.equal(downloads.length, before);

  // One device more: its commit fits in the post, and only the Welcome
  // goes as a file: the members download nothing, the new device only
  // its Welcome.
  const sixth = join(86);
  sixth.read = entries.length;
  // Its first two downloads fail on the way (the network): tried again.
  sixth.crypto.retryMs = 1;
  const download = sixth.crypto.blobs.download;
  let failures = 2;
  sixth.crypto.blobs.download = (id) => (failures-- > 0 ? Promise.reject(new TypeError("Failed to fetch")) : download(id));
  const one = [{ account: "86", device: "1", keyPackage: JSON.parse(sixth.crypto.device.keyPackages(1))[0] }];
  await admin.crypto.commit(admin.session, G3, (d) => d.add(G3, JSON.stringify(one)));
  await deliver();
  const added = entries[entries.length - 1];
  assert.ok(Crypto.keptOutOfLine(added), "still too large for a post with its Welcome");
  assert.equal(added.attachments.length, 1, "only the Welcome as a file");
  assert.deepEqual(downloads.slice(before), [["86", added.attachments[0]]]);
  assert.ok(sixth.crypto.encrypts(G3), "the sixth joined");
  const last = new TextEncoder().encode("six of us");
  await sixth.crypto.sendSealed(sixth.session, { clientId: "big2" }, G3, last, { clientId: "big2" });
  await deliver();
  for (const p of [admin, ...members]) assert.equal(texts(p).at(-1), "six of us", p.account);
  assert.equal(failures, -1, "the failed downloads were tried again");

  // A device that cannot download a part: for now (the network), the
  // error goes to the caller, which reads the log again from there later;
  // refused by the server (the blob gone), the post is unreadable, and
  // not remembered as such.
  const late = join(87);
  late.crypto.retryMs = 1;
  late.crypto.blobs.download = () => Promise.reject(new TypeError("Failed to fetch"));
  await assert.rejects(late.crypto.fetchParts(start), /Failed to fetch/);
  late.crypto.blobs.download = () => Promise.reject(Object.assign(new Error("That file is gone."), { status: 404 }));
  const unread = await late.crypto.fetchParts(start);
  assert.equal(unread, start, "left as it is");
  const opened = late.crypto.openEvent(unread);
  assert.equal(opened.kind, "failed");
  assert.match(opened.reason, /could not download/);
  assert.equal(late.crypto.recall(start), null, "not remembered: a later read may download it");
}

console.log("web crypto: ok");
