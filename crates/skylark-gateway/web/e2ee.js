// End-to-end encryption in the browser: the same MLS code as the CLI
// (skylark-e2ee, built to WebAssembly in e2ee/), and around it what the
// CLI's skylark_client::e2ee does — publishing key packages, starting a
// 1:1 conversation's encryption, posting commits in the group's order
// (trying again when another member's commit came first), encrypting
// posts and opening the posts that arrive, in log order, each once.
//
// The device's MLS state lives in IndexedDB beside the events (LocalStore's
// "e2ee" entry), written before anything that depends on it leaves the
// page: key packages before they are uploaded, a commit before it is
// posted, and what the live log opened in the same transaction as those
// events, before they are acknowledged. Its history (what each entry
// opened to) is kept apart, as chunks of journal records ("e2ee-journal:N"
// entries): a write adds a chunk of what changed, and the journal is
// written afresh as one chunk when it has doubled or a text was forgotten.
// A browser that cannot keep it publishes no keys, and its conversations
// stay unencrypted.

import init, { Device, checkPackage, isEncrypted, outOfLine, safetyNumber, toUpload } from "./e2ee/skylark_e2ee_web.js";
import { Refused, fromBase64, toBase64 } from "./proto.js";

export { isEncrypted };

/// Key packages a device keeps published (the server says when to top up).
const TARGET_STOCK = 100;
/// Packages per upload (each frame stays well under the server's limit).
const UPLOAD_BATCH = 50;
/// Devices added by one commit: each post stays within the payload limit.
const ADD_BATCH = 32;
/// The most phone numbers one key-package claim may name (the server's limit).
const CLAIM_NUMBERS = 50;
/// Attempts at a commit that keeps losing to other members' commits.
const COMMIT_ATTEMPTS = 10;
/// How long to wait for the commit that won before trying again anyway.
const CATCH_UP_WAIT_MS = 5000;
/// A 1:1 conversation found plain is not checked again for this long (each
/// check claims a key package of every device of both accounts).
const PLAIN_RECHECK_MS = 10 * 60 * 1000;

/// The LocalStore entry of the device changes still to carry into the
/// encrypted conversations.
const TODO = "e2ee-todo";
/// The LocalStore entry of the engine's state (without its history), and
/// the prefix of the entries holding its history's journal records.
const CORE = "e2ee";
// What changed in the state since it was last written whole, in order.
const CHANGES = "e2ee-changes:";
const changesKey = (n) => `${CHANGES}${String(n).padStart(12, "0")}`;
const JOURNAL = "e2ee-journal:";
const chunkKey = (n) => `${JOURNAL}${String(n).padStart(12, "0")}`;
/// The journal is written afresh once its chunks hold more than this and
/// than twice what it was when last written whole.
const JOURNAL_REWRITE_BYTES = 1 << 20;
/// The state is written whole again once its changes would come to more
/// than this and than the state itself.
const STATE_REWRITE_BYTES = 1 << 20;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/// How a post naming a commit's parts begins in base64 ("\0SKMLSO": its
/// first 9 characters hold the first 6 bytes and 6 bits of the seventh).
const OUT_OF_LINE_PREFIX = "AFNLTUxTT";

/// The largest payload the session's server takes in one post (it says
/// so when the session starts; 64 KiB from a server older than that).
const maxPayload = (session) => Number((session.info && session.info.maxPayloadBytes) || 65536);

/// The length of what a base64 text holds.
const base64Length = (b64) => Math.floor((b64.length * 3) / 4) - (b64.endsWith("==") ? 2 : b64.endsWith("=") ? 1 : 0);

const TAKEN_OVER = "This browser's encryption is open in a newer tab, which keeps it now; use that tab.";

function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/// The journal key of a group post: its place in its group (what a
/// deletion for everyone names), the same key the CLI uses.
const postKey = (group, seq) => `post:${group}:${seq}`;

/// Refusals after which a commit may still be taken as it is later (the
/// server was busy); no answer at all (the connection went) is not a
/// refusal. Any other refusal would be repeated.
const BUSY = new Set(["ERROR_CODE_UNAVAILABLE", "ERROR_CODE_INTERNAL", "ERROR_CODE_RATE_LIMITED"]);

/// Whether the server refused a commit for good (not another commit
/// first; a closed connection is no answer).
function refusedForGood(err) {
  return err instanceof Refused && err.code !== "ERROR_CODE_STALE_EPOCH" && err.code !== "CLOSED" && !BUSY.has(err.code);
}

/// A commit refused for good, in words, as the CLI says it.
function commitRefusedWords(err) {
  if (err.code === "ERROR_CODE_MESSAGE_TOO_LARGE") {
    return `The change to this group's encryption is too large for this server, in a post and as a file (${err.message}); `
      + "the group's encryption was not changed.";
  }
  return `The server refused the change to this group's encryption (${err.message}); it was not changed.`;
}

export class Crypto {
  /// The device's encryption, read from `local` (a LocalStore) or made on
  /// first use, its MLS key signed by the device key with `sign(bytes)`.
  static async open(me, local, sign) {
    await init();
    return Crypto.restore(me, local, sign);
  }

  /// `open` once the engine's module is loaded.
  static async restore(me, local, sign) {
    // The LocalStore is this device's own database: what it keeps is this device's.
    const kept = await local.get(CORE);
    const device = kept ? Device.restore(kept) : new Device(me.accountId, me.deviceId);
    // Then what changed since the state was written whole (each entry was
    // written with the rest of its transaction, so whole).
    const state = { next: 0, keys: [], bytes: 0, core: kept ? kept.length : 0, rewrite: !kept };
    for (const [key, records] of await local.getPrefixed(CHANGES)) {
      if (device.applyStateChanges(records) < records.length) state.rewrite = true;
      state.keys.push(key);
      state.bytes += records.length;
      state.next = Number(key.slice(CHANGES.length)) + 1;
    }
    // A state an earlier page kept holds its history inline: moved to the
    // journal at the first write.
    const journal = { next: 0, keys: [], bytes: 0, whole: 0, rewrite: device.journalLength() > 0 };
    if (journal.rewrite) state.rewrite = true; // the state too, without it
    for (const [key, records] of await local.getPrefixed(JOURNAL)) {
      const whole = device.applyJournal(records);
      // A chunk is written whole or not at all; a damaged one is written over.
      if (whole < records.length) journal.rewrite = true;
      journal.keys.push(key);
      journal.bytes += records.length;
      journal.next = Number(key.slice(JOURNAL.length)) + 1;
    }
    journal.whole = journal.bytes;
    if (!device.isBound()) device.bind(new Uint8Array(await sign(device.bindingRequest())));
    const c = new Crypto(me, local, device, journal, state);
    await c.persist();
    return c;
  }

  constructor(me, local, device, journal = { next: 0, keys: [], bytes: 0, whole: 0, rewrite: false },
    state = { next: 0, keys: [], bytes: 0, core: 0, rewrite: true }) {
    this.me = me;
    this.local = local;
    this.device = device;
    this.journal = journal;
    this.state = state;
    this.dirty = false;
    this.plain = new Map(); // phone → when its 1:1 conversation was found plain
    this.waiters = [];
    this.changing = new Map(); // group → settles when this page's commits to it are through
    /// `{ upload(bytes) → id, download(id) → bytes }`: the server's blobs,
    /// for commits too large for one post (set by the page).
    this.blobs = null;
    this.retryMs = 250; // the first wait before downloading a part again
  }

  /// What to write to keep the state, for a write of the caller's (see
  /// keepLive): `{ meta, drop }`, the LocalStore entries to set and those
  /// to delete. The engine's state as what changed since it was written
  /// whole (after a message, the ratchets it moved, not a large group's
  /// whole tree), or whole once the changes would outgrow it; its history
  /// also as what changed, or afresh when it has doubled or a text was
  /// forgotten (so the text leaves the database). Call `unsaved` if the
  /// write fails.
  snapshot() {
    if (this.stopped) return { meta: {}, drop: [] };
    this.dirty = false;
    const meta = {};
    const drop = [];
    const s = this.state;
    const stateChanges = this.device.stateChanges();
    if (s.rewrite || s.bytes + stateChanges.length > Math.max(STATE_REWRITE_BYTES, s.core)) {
      meta[CORE] = this.device.saveCore();
      drop.push(...s.keys);
      this.state = { next: s.next, keys: [], bytes: 0, core: meta[CORE].length, rewrite: false };
    } else if (stateChanges.length) {
      const key = changesKey(s.next);
      meta[key] = stateChanges;
      this.state = { ...s, next: s.next + 1, keys: [...s.keys, key], bytes: s.bytes + stateChanges.length };
    }
    const j = this.journal;
    const forgot = this.device.journalForgot();
    const changes = this.device.journalChanges();
    if (j.rewrite || forgot || j.bytes + changes.length > Math.max(JOURNAL_REWRITE_BYTES, 2 * j.whole)) {
      const records = this.device.journalRecords();
      const key = chunkKey(j.next);
      meta[key] = records;
      drop.push(...j.keys.filter((k) => k !== key));
      this.journal = { next: j.next + 1, keys: [key], bytes: records.length, whole: records.length, rewrite: false };
      return { meta, drop };
    }
    if (changes.length) {
      const key = chunkKey(j.next);
      meta[key] = changes;
      this.journal = { ...j, next: j.next + 1, keys: [...j.keys, key], bytes: j.bytes + changes.length };
    }
    return { meta, drop };
  }

  /// A write of a snapshot failed: the next one writes the state and the
  /// history afresh.
  unsaved() {
    this.journal.rewrite = true;
    this.state.rewrite = true;
    this.dirty = true;
  }

  /// A newer tab of this browser took this device's encryption over (the
  /// server keeps one connection per device, and it has it): this tab
  /// writes nothing more of the state, which the newer one read and keeps
  /// now, and encrypts nothing (a key used here would be used there too).
  stop() {
    this.stopped = true;
  }

  /// Writes the state to IndexedDB now.
  async persist() {
    if (this.stopped) throw new Error(TAKEN_OVER);
    const { meta, drop } = this.snapshot();
    try {
      await this.local.putEvents([], meta, drop);
    } catch (err) {
      this.unsaved();
      throw err;
    }
  }

  /// Tops up the key packages this device has published.
  async replenish(session) {
    const stock = (await session.request({ getKeyPackageStock: {} })).keyPackageStock || {};
    const available = Number(stock.available || 0);
    const below = Number(stock.replenishBelow || 0);
    if (available >= below && stock.hasLastResort) return 0;
    const want = Math.max(0, Math.min(TARGET_STOCK, Number(stock.maxAvailable || TARGET_STOCK)) - available);
    const packages = JSON.parse(this.device.keyPackages(want));
    const lastResort = stock.hasLastResort ? undefined : this.device.lastResortPackage();
    // Their private keys are kept before anyone can claim them.
    await this.persist();
    for (let i = 0; i < packages.length || (i === 0 && lastResort); i += UPLOAD_BATCH) {
      const body = { keyPackages: packages.slice(i, i + UPLOAD_BATCH) };
      if (i === 0 && lastResort) body.lastResort = lastResort;
      await session.request({ uploadKeyPackages: body });
    }
    return want;
  }

  /// Finishes commits a previous page left unanswered (closed between
  /// making a commit and the server's answer): posts it again with the
  /// same client id (a duplicate if the server had it, refused if another
  /// commit came first).
  async resume(session) {
    for (const o of JSON.parse(this.device.outgoing())) {
      if (!this.device.hasPendingCommit(o.group)) {
        this.device.unstage(o.group); // its own copy came back: applied
        continue;
      }
      try {
        await this.post(session, o.group, o.clientId, o.commit);
        this.device.commitAccepted(o.group);
      } catch (err) {
        // Another commit came first, or the server will never take this
        // one (that was said when it was first refused): drop it.
        if (!refusedForGood(err) && !(err instanceof Refused && err.code === "ERROR_CODE_STALE_EPOCH")) throw err;
        this.device.commitRefused(o.group);
      }
    }
    await this.persist();
  }

  /// Posts a staged commit, with its Welcome. One too large for a post on
  /// this server (a Welcome carries the group's ratchet tree) travels as
  /// blobs, uploaded with `this.blobs`: the Welcome, and the commit when it
  /// alone does not fit; a short post names them and carries the rest.
  /// Each device downloads the part it needs (`fetchParts`).
  async post(session, group, clientId, commit) {
    group = String(group);
    const max = maxPayload(session);
    if (base64Length(commit.payload) <= max) {
      return session.request({ send: { clientId, group, payload: commit.payload, commitEpoch: commit.epoch } });
    }
    if (!this.blobs) throw new Error("This browser cannot upload files, which a change this large to the group's encryption needs.");
    const uploaded = [];
    for (const part of JSON.parse(toUpload(JSON.stringify(commit), max))) {
      try {
        uploaded.push({ kind: part.kind, id: await this.blobs.upload(fromBase64(part.bytes)) });
      } catch (err) {
        // Refused for good: the commit is dropped, said in words.
        if (err.status === 413) throw new Refused({ code: "ERROR_CODE_MESSAGE_TOO_LARGE", message: `even as a file: ${err.message}` });
        throw err;
      }
    }
    const payload = outOfLine(group, JSON.stringify(commit), JSON.stringify(uploaded));
    const attachments = uploaded.map((u) => u.id);
    return session.request({ send: { clientId, group, payload, commitEpoch: commit.epoch, attachments } });
  }

  /// `event` ready for `openEvent`: when it is a post naming the parts of
  /// a commit too large for one post (and was not opened here before), a
  /// copy with the parts this device needs downloaded in their place (the
  /// commit for a member, the Welcome for a device being added). A
  /// download the server refuses (the blob is gone, past the attachments'
  /// retention) leaves it as it is: `openEvent` then says it could not be
  /// read. Any other failure (the network, a busy server) is tried a few
  /// times, then thrown: the caller reads the log again from there later.
  async fetchParts(event) {
    const g = event.group;
    const m = g && g.message;
    if (!m || !m.payload || !this.blobs || this.recall(event)) return event;
    const mine = g.by === this.me.accountId && String(m.senderDevice || 0) === this.me.deviceId;
    const needed = this.device.partsNeeded(m.payload, mine);
    if (!needed) return event;
    const fetched = {};
    for (const id of JSON.parse(needed)) {
      for (let attempt = 1; ; attempt++) {
        try {
          fetched[id] = toBase64(await this.blobs.download(id));
          break;
        } catch (err) {
          if (err.status === 403 || err.status === 404) return event;
          if (attempt >= 5) throw err;
          await sleep(this.retryMs * 2 ** attempt);
        }
      }
    }
    const payload = this.device.inline(m.payload, mine, JSON.stringify(fetched));
    return { ...event, group: { ...g, message: { ...m, payload } } };
  }

  /// Whether `event` is a post naming the parts of a commit too large for
  /// one post (`fetchParts` downloads them).
  static keptOutOfLine(event) {
    const payload = event.group && event.group.message && event.group.message.payload;
    return Boolean(payload) && payload.startsWith(OUT_OF_LINE_PREFIX);
  }

  /// Whether this device encrypts for the group.
  encrypts(group) {
    return this.device.isMember(String(group));
  }

  /// A post's payload (base64), encrypted for every device in the group.
  encrypt(group, clientId, bytes) {
    if (this.stopped) throw new Error(TAKEN_OVER);
    const payload = this.device.encryptAs(String(group), clientId, bytes);
    this.dirty = true;
    return payload;
  }

  /// Posts `bytes` to the group, encrypted in the group's current epoch,
  /// which the post names (`messageEpoch`); `body` is the rest of the
  /// SendMessage. The ciphertext is kept in `item.sealed`, so a resend
  /// after a lost connection sends the same one. When another member's
  /// commit ended that epoch first, the group refuses the post: this waits
  /// for that commit on the live log and encrypts it again (same client
  /// id). No device keeps past epochs' keys, so a post is only ever opened
  /// in the epoch it was made in. Throws what the server refused, or, when
  /// a change to the group's keys is under way, the engine's error.
  async sendSealed(session, item, group, bytes, body) {
    group = String(group);
    if (!item.sealed) await this.refreshKeys(session, group);
    for (let attempt = 1; ; attempt++) {
      // A commit of this page's on its way holds up encrypting: wait for it.
      await this.settled(group);
      if (!item.sealed || item.sealed.group !== group || item.sealed.epoch === undefined) {
        const epoch = String(this.device.epoch(group));
        item.sealed = { group, epoch, payload: this.encrypt(group, item.clientId, bytes) };
        // The ratchet moved: kept before the post leaves, so a page closed
        // now does not make its next message with the same key.
        await this.persist();
      }
      const send = { ...body, group, payload: item.sealed.payload, messageEpoch: item.sealed.epoch };
      try {
        return await session.request({ send });
      } catch (err) {
        if (!(err instanceof Refused && err.code === "ERROR_CODE_STALE_EPOCH") || attempt >= COMMIT_ATTEMPTS) throw err;
        const from = Number(item.sealed.epoch);
        item.sealed = null;
        await this.epochMoves(group, from);
      }
    }
  }

  /// Opens a group post of the live log, in log order, once (asked again,
  /// the answer comes from the state): `{kind, plaintext?, reason?}`, or
  /// null when the post is not encrypted.
  openEvent(event) {
    const g = event.group;
    const m = g && g.message;
    if (!m || !isEncrypted(m.payload || "")) return null;
    const key = postKey(g.group, g.groupSeq);
    let opened = this.recallKey(key);
    if (!opened) {
      const mine = g.by === this.me.accountId && String(m.senderDevice || 0) === this.me.deviceId;
      opened = JSON.parse(this.device.openOnce(key, m.payload, mine ? m.clientId : undefined));
      this.dirty = true;
    }
    if (m.deletes) this.forget(postKey(g.group, m.deletes));
    if (m.expiresAtMs && Number(m.expiresAtMs) <= Date.now()) this.forget(key);
    for (const w of this.waiters.splice(0)) w();
    return opened;
  }

  /// What a group post was opened as, without opening anything (history,
  /// and events kept in IndexedDB): null when it was never opened here.
  recall(event) {
    const g = event.group;
    return this.recallKey(postKey(g.group, g.groupSeq));
  }

  recallKey(key) {
    const known = this.device.recall(key);
    return known ? JSON.parse(known) : null;
  }

  forget(key) {
    this.device.forget(key);
    this.dirty = true;
  }

  /// The group of the encrypted 1:1 conversation with `phone`, started
  /// here if need be (`info` its GroupInfo); null when it cannot be
  /// encrypted because a device of either account publishes no keys.
  async startDirect(session, phone) {
    const seen = this.plain.get(phone);
    if (seen && Date.now() - seen < PLAIN_RECHECK_MS) return null;
    const info = (await session.request({ openDirect: { phone } })).groupInfo;
    if (this.encrypts(info.id) || (await this.startGroup(session, info))) return info;
    this.plain.set(phone, Date.now());
    return null;
  }

  /// Starts a group's encryption: this device creates the MLS group and
  /// adds every device of every member; false (and nothing changed) when
  /// a device has no keys.
  async startGroup(session, info) {
    const { packages, withoutKeys } = await this.claimAll(session, (info.members || []).map((m) => m.phone));
    if (withoutKeys.length) return false;
    const group = String(info.id);
    if (!this.device.isMember(group)) this.device.create(group);
    await this.addDevices(session, group, packages);
    return true;
  }

  /// A key package of every device of each account in `phones`, each
  /// checked to stand for the device it was listed for (its MLS key signed
  /// by that device's key), and the phones with a device that has none.
  async claimAll(session, phones) {
    const packages = [];
    const withoutKeys = [];
    const answers = [];
    for (let i = 0; i < phones.length; i += CLAIM_NUMBERS) {
      const batch = phones.slice(i, i + CLAIM_NUMBERS);
      try {
        answers.push(...await this.claim(session, batch));
      } catch (err) {
        // A server whose rate limit holds fewer claims than the batch (or
        // one older than batched claims) refuses it as a whole: one number
        // at a time then, which also names a bad number.
        if (!(err instanceof Refused && err.code === "ERROR_CODE_INVALID_ARGUMENT") || batch.length < 2) throw err;
        for (const phone of batch) answers.push(...await this.claim(session, [phone]));
      }
    }
    for (const claimed of answers) {
      for (const d of claimed.devices || []) {
        if (!d.keyPackage) {
          withoutKeys.push(claimed.phone);
          continue;
        }
        const who = { account: String(claimed.accountId), device: String(d.deviceId), keyPackage: d.keyPackage };
        checkPackage(who.account, who.device, d.keyPackage, d.deviceKey || "");
        packages.push(who);
      }
    }
    return { packages, withoutKeys: [...new Set(withoutKeys)] };
  }

  /// Before adding accounts to an encrypted group: their devices' key
  /// packages. Throws, in words, when one cannot encrypt (it would be a
  /// member who cannot read the group).
  async prepareAdd(session, phones) {
    const { packages, withoutKeys } = await this.claimAll(session, phones);
    if (withoutKeys.length) {
      throw new Error(`${withoutKeys.join(", ")} cannot be added: a device of theirs cannot encrypt, and this group is `
        + "end-to-end encrypted. Nothing was changed.");
    }
    return packages;
  }

  /// Gives the devices of `packages` the group's keys, in commits of at
  /// most ADD_BATCH (each post stays within the server's payload limit).
  async addDevices(session, group, packages) {
    for (let i = 0; i < packages.length; i += ADD_BATCH) {
      const batch = JSON.stringify(packages.slice(i, i + ADD_BATCH));
      await this.commit(session, String(group), (d) => d.add(String(group), batch));
    }
  }

  /// After addDevices failed: the server has the new members, but their
  /// devices may not have the group's keys. When the commit giving them
  /// the keys is not staged (nothing will send it again), takes out of the
  /// group again each of `phones` none of whose devices holds the keys
  /// (they could not have read it), and returns them.
  async undoUnkeyedAdd(session, group, phones) {
    group = String(group);
    if (JSON.parse(this.device.outgoing()).some((o) => o.group === group)) return [];
    const keyed = new Set(JSON.parse(this.device.members(group)).map((m) => m.account));
    const info = (await session.request({ getGroup: { group } })).groupInfo;
    const out = [];
    for (const m of info.members || []) {
      if (!phones.includes(m.phone) || keyed.has(String(m.account))) continue;
      await session.request({ changeGroup: { group, remove: m.phone } });
      out.push(m.phone);
    }
    return out;
  }

  /// Takes every device of `accounts` out of the group's keys, in one
  /// commit: they read nothing sent after.
  async removeAccounts(session, group, accounts) {
    const list = JSON.stringify(accounts.map(String));
    return this.commit(session, String(group), (d) => d.removeAccounts(String(group), list));
  }

  /// Claims a key package of every device of each account in `phones` (at
  /// most CLAIM_NUMBERS, one request), waiting when the server says claims
  /// come too fast. One answer per number, in the order given.
  async claim(session, phones) {
    for (let waited = 0; ; ) {
      try {
        if (phones.length === 1) {
          return [(await session.request({ claimKeyPackages: { phone: phones[0] } })).claimedKeyPackages];
        }
        const answer = (await session.request({ claimKeyPackages: { phones } })).claimedKeyPackages;
        const accounts = answer.accounts || [];
        if (accounts.length !== phones.length) throw new Error("the server answered a claim of keys for other numbers");
        return accounts;
      } catch (err) {
        if (!(err instanceof Refused && err.code === "ERROR_CODE_RATE_LIMITED") || waited > 60000) throw err;
        const wait = Math.max(100, err.retryAfterMs);
        await sleep(wait);
        waited += wait;
      }
    }
  }

  /// Resolves once no commit of this page's to the group is on its way.
  async settled(group) {
    while (this.changing.has(group)) await this.changing.get(group);
  }

  /// Before this browser's first post to a group it joined from a key
  /// package: a commit giving its leaf fresh keys, which also fills the
  /// tree above it (so later commits to a large group stay small); and
  /// again before a post a week after its last commit there, by the
  /// page's clock (post-compromise security).
  /// Best effort, and one attempt: when another member's commit comes
  /// first, or the server refuses it, the post goes out anyway and the
  /// next one tries again (members posting for the first time at once do
  /// not hold up each other or a change of the group's members).
  async refreshKeys(session, group) {
    if (!this.device.wantsUpdate(group)) return;
    try {
      await this.commit(session, group, (d) => d.update(group), 1);
    } catch (err) {
      console.info(`could not refresh this browser's keys in group ${group}: ${err.message}`);
    }
  }

  /// Makes a commit with `make(device)` (JSON, or undefined for nothing to
  /// do) and posts it in the group's order; when another member's commit
  /// came first, waits for it on the live log and makes the commit again.
  /// This page's commits to one group go one at a time, and its posts to
  /// the group wait for them (`settled`).
  commit(session, group, make, attempts = COMMIT_ATTEMPTS) {
    const before = this.changing.get(group);
    const run = (async () => {
      if (before) await before;
      return this.commitInTurn(session, group, make, attempts);
    })();
    const through = run.then(() => {}, () => {});
    this.changing.set(group, through);
    through.then(() => {
      if (this.changing.get(group) === through) this.changing.delete(group);
    });
    return run;
  }

  async commitInTurn(session, group, make, attempts) {
    for (let attempt = 0; attempt < attempts; attempt++) {
      const made = make(this.device);
      if (!made) return false;
      const clientId = newClientId();
      this.device.stage(group, clientId, made);
      await this.persist();
      const commit = JSON.parse(made);
      try {
        await this.post(session, group, clientId, commit);
        // Applied when it comes back on the live log, after what was posted
        // before it (opened in the epoch it was made in); applied anyway
        // if it does not come back in time.
        await this.epochMoves(group, Number(commit.epoch));
      } catch (err) {
        if (refusedForGood(err)) {
          // A commit left staged would hold up every encrypted message of
          // this browser in the group.
          this.device.commitRefused(group);
          await this.persist();
          throw new Error(commitRefusedWords(err));
        }
        if (!(err instanceof Refused && err.code === "ERROR_CODE_STALE_EPOCH")) throw err; // stays staged: resume()
        this.device.commitRefused(group);
        await this.persist();
        await this.epochMoves(group, Number(commit.epoch));
        continue;
      }
      this.device.commitAccepted(group);
      await this.persist();
      return true;
    }
    throw new Error("The conversation's encryption kept changing while this browser tried to change it; try again.");
  }

  async epochMoves(group, from) {
    const deadline = Date.now() + CATCH_UP_WAIT_MS;
    while (Number(this.device.epoch(group)) <= from && Date.now() < deadline) {
      await Promise.race([new Promise((r) => this.waiters.push(r)), sleep(200)]);
    }
  }

  /// A device linked to or removed from this account (a DeviceChange
  /// from the live log), kept to carry into every encrypted conversation
  /// ([`maintain`]), across reloads.
  async noteDeviceChange(change) {
    const todo = (await this.local.get(TODO)) || { add: [], remove: [] };
    if (change.linked && String(change.linked.id) !== this.me.deviceId) {
      todo.add = [...new Set([...todo.add, String(change.linked.id)])];
    }
    if (change.removed) {
      const id = String(change.removed);
      todo.add = todo.add.filter((d) => d !== id);
      todo.remove = [...new Set([...todo.remove, id])];
      for (const [g, owed] of Object.entries(todo.history || {})) {
        todo.history[g] = owed.filter((d) => d !== id);
        if (!todo.history[g].length) delete todo.history[g];
      }
    }
    await this.local.put(TODO, todo);
  }

  /// Carries the account's device changes into its encrypted
  /// conversations: a removed device is taken out of each (it reads
  /// nothing sent after), a linked one added with one of its key packages
  /// per conversation (one that has published none yet is tried again
  /// next time). When several devices do it at once, the group's order
  /// makes one commit count and the others find nothing left to do.
  /// Returns whether a linked device is still to add (it has not published
  /// keys yet: a device publishes them right after it is linked), or a
  /// conversation's history still to give, or another call was running.
  /// First, it refreshes this page's keys in the groups where they are a
  /// month old, so that a device that only reads renews them too.
  async maintain(session) {
    // One at a time; a call while another runs says "try again" (that one
    // may have read the device changes before this caller noted its own).
    if (this.maintaining) return true;
    this.maintaining = true;
    try {
      // Keys a month old in a group this page may only read: refreshed too.
      for (const g of JSON.parse(this.device.staleGroups())) await this.refreshKeys(session, g);
      const todo = (await this.local.get(TODO)) || { add: [], remove: [] };
      if (!todo.add.length && !todo.remove.length && !Object.keys(todo.history || {}).length) return false;
      const groups = JSON.parse(this.device.groups());
      const removed = JSON.stringify(todo.remove.map((device) => ({ account: this.me.accountId, device })));
      // A group whose change fails (a lost connection, or a commit the
      // server refuses, too large for it say) does not hold up the others;
      // the change stays to do, and is said at the end.
      const failed = [];
      if (todo.remove.length) {
        for (const g of groups) {
          await this.commit(session, g, (d) => d.removeDevices(g, removed)).catch((err) => failed.push({ g, err }));
        }
      }
      const removalsFailed = failed.length;
      const joined = []; // { g, linked }: conversations this page added devices to
      if (todo.add.length) {
        for (const g of groups) {
          // One package per device per conversation: a Welcome uses it up.
          const { packages } = await this.claimAll(session, [this.me.phone]);
          const linked = packages.filter((p) => todo.add.includes(p.device));
          if (linked.length) {
            const committed = await this.commit(session, g, (d) => d.add(g, JSON.stringify(linked)))
              .catch((err) => failed.push({ g, err }) && false);
            if (committed === true) joined.push({ g, linked });
          }
        }
      }
      // A device is added once every conversation has it (another device
      // of the account may have added it to some); one whose keys ran
      // short, or were not published yet, is tried again for the rest.
      const mine = (g) => JSON.parse(this.device.members(g)).filter((m) => m.account === this.me.accountId).map((m) => m.device);
      const added = new Set(todo.add.filter((d) => groups.every((g) => !this.device.isMember(g) || mine(g).includes(d))));
      // Read again before writing: more may have been noted meanwhile.
      const now = (await this.local.get(TODO)) || { add: [], remove: [] };
      if (!removalsFailed) now.remove = now.remove.filter((d) => !todo.remove.includes(d));
      if (failed.length === removalsFailed) now.add = now.add.filter((d) => !added.has(d));
      now.history = now.history || {};
      for (const { g, linked } of joined) now.history[g] = [...new Set([...(now.history[g] || []), ...linked.map((p) => p.device)])];
      await this.local.put(TODO, now);
      // Once every conversation has the devices: their history, and any a
      // page closed earlier did not finish giving. Without it a new device
      // shows the older messages as ones it cannot read, so what could not
      // be posted stays to give; a refusal is for good.
      let owing = false;
      for (const [g, owed] of Object.entries(now.history)) {
        const linked = owed.map((device) => ({ account: this.me.accountId, device }));
        const given = await (groups.includes(g) ? this.giveHistory(session, g, linked) : Promise.resolve())
          .then(() => true, (err) => refusedForGood(err) && err.code !== "ERROR_CODE_BLOCKED");
        if (!given) {
          owing = true;
          continue;
        }
        const later = (await this.local.get(TODO)) || { add: [], remove: [] };
        if (later.history && later.history[g]) {
          later.history[g] = later.history[g].filter((d) => !owed.includes(d));
          if (!later.history[g].length) delete later.history[g];
        }
        await this.local.put(TODO, later);
      }
      const closed = failed.find(({ err }) => err instanceof Refused && err.code === "CLOSED");
      if (closed) throw closed.err;
      if (failed.length) {
        const each = [...new Set(failed.map(({ err }) => err.message.replace(/\.$/, "")))].join("; ");
        throw new Error(`Your linked or removed devices could not be carried into the encryption of ${failed.length} `
          + `conversation${failed.length > 1 ? "s" : ""} (${each}); the others have them, and this browser tries again `
          + "when it next connects.");
      }
      return now.add.length > 0 || owing;
    } finally {
      this.maintaining = false;
    }
  }

  /// Gives devices of this account just added to a 1:1 conversation what
  /// this browser has of its history, after the commit that added them:
  /// encrypted posts of the newest messages first (at most 48 KiB each, 32
  /// of them). They then show those messages instead of saying they cannot
  /// read them. Only for a 1:1 conversation, whose every member may read
  /// all of it: in a group, a member added later must not read what came
  /// before.
  async giveHistory(session, group, linked) {
    const info = (await session.request({ getGroup: { group } })).groupInfo;
    if (!info.direct) return;
    const devices = JSON.stringify(linked.map((p) => ({ account: p.account, device: p.device })));
    for (const chunk of JSON.parse(this.device.historyChunks(group, maxPayload(session)))) {
      const clientId = newClientId();
      for (let attempt = 1; ; attempt++) {
        await this.settled(group);
        const epoch = String(this.device.epoch(group));
        const payload = this.device.sealHistory(group, devices, chunk);
        // The ratchet moved: kept before the post leaves.
        this.dirty = true;
        await this.persist();
        try {
          await session.request({ send: { group, clientId, payload, messageEpoch: epoch } });
          break;
        } catch (err) {
          if (!(err instanceof Refused && err.code === "ERROR_CODE_STALE_EPOCH") || attempt >= COMMIT_ATTEMPTS) throw err;
          await this.epochMoves(group, Number(epoch));
        }
      }
    }
  }

  /// The safety number of this account and `peer` in a 1:1 conversation's
  /// group, from the keys of the devices in it, with each side's count.
  safetyNumber(group, peer) {
    const members = JSON.parse(this.device.members(String(group)));
    const keysOf = (account) => members.filter((m) => m.account === account).map((m) => m.key);
    const mine = keysOf(this.me.accountId);
    const theirs = keysOf(String(peer));
    const number = safetyNumber(this.me.accountId, JSON.stringify(mine), String(peer), JSON.stringify(theirs));
    return { number, mine: mine.length, theirs: theirs.length };
  }
}
