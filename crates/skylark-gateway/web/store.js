// The browser's own copy of the account, in IndexedDB, one database per
// device: every log event the page has read (live, or paged from the
// server's history), the part of the log it holds, receipt marks, the
// group list, and the outbox (messages typed but not yet acknowledged),
// so that a reload shows everything at once and a closed tab loses
// nothing typed.
//
// Events are kept as the server sent them (proto3 JSON), keyed by their
// sequence number in the account's log; putting one twice is harmless.

const EVENTS = "events";
const META = "meta";
const OUTBOX = "outbox";

const nameOf = (deviceId) => `skylark-device-${deviceId}`;

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

export class LocalStore {
  /// Opens (creating on first use) the store of this device.
  static async open(deviceId) {
    const req = indexedDB.open(nameOf(deviceId), 1);
    req.onupgradeneeded = () => {
      const db = req.result;
      db.createObjectStore(EVENTS, { keyPath: "n" });
      db.createObjectStore(META);
      db.createObjectStore(OUTBOX, { keyPath: "clientId" });
    };
    return new LocalStore(await request(req));
  }

  /// Deletes the store of a device that was signed out.
  static async destroy(deviceId) {
    const req = indexedDB.deleteDatabase(nameOf(deviceId));
    await new Promise((resolve) => {
      req.onsuccess = resolve;
      req.onerror = resolve; // nothing to delete is fine too
      req.onblocked = resolve;
    });
  }

  constructor(db) {
    this.db = db;
  }

  close() {
    this.db.close();
  }

  /// Runs `fn(stores)` in one transaction; resolves once it is committed.
  transaction(names, mode, fn) {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(names, mode, { durability: "strict" });
      const stores = Object.fromEntries(names.map((n) => [n, tx.objectStore(n)]));
      let result;
      try {
        result = fn(stores);
      } catch (err) {
        tx.abort();
        reject(err);
        return;
      }
      tx.oncomplete = () => resolve(result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error("the local store refused the write"));
    });
  }

  /// Everything kept: `{ events, meta, outbox }`, events and outbox in order.
  async load() {
    const out = { events: [], meta: {}, outbox: [] };
    await this.transaction([EVENTS, META, OUTBOX], "readonly", (s) => {
      s[EVENTS].getAll().onsuccess = (e) => (out.events = e.target.result.map((r) => r.event));
      const keys = s[META].getAllKeys();
      const values = s[META].getAll();
      values.onsuccess = () => keys.result.forEach((k, i) => (out.meta[k] = values.result[i]));
      s[OUTBOX].getAll().onsuccess = (e) => (out.outbox = e.target.result.sort((a, b) => a.queuedAt - b.queuedAt));
    });
    return out;
  }

  /// Keeps `events`, sets the `meta` entries given and deletes those named
  /// in `drop`, in one transaction.
  putEvents(events, meta = {}, drop = []) {
    return this.transaction([EVENTS, META], "readwrite", (s) => {
      for (const event of events) s[EVENTS].put({ n: Number(event.seq), event });
      for (const k of drop) s[META].delete(k);
      for (const [k, v] of Object.entries(meta)) s[META].put(v, k);
    });
  }

  /// The meta entries whose keys start with `prefix`, as [key, value], in
  /// key order.
  async getPrefixed(prefix) {
    let out = [];
    await this.transaction([META], "readonly", (s) => {
      const range = IDBKeyRange.bound(prefix, `${prefix}\uffff`);
      const keys = s[META].getAllKeys(range);
      const values = s[META].getAll(range);
      values.onsuccess = () => (out = keys.result.map((k, i) => [k, values.result[i]]));
    });
    return out;
  }

  /// One entry of the meta store (undefined when absent).
  get(key) {
    let value;
    return this.transaction([META], "readonly", (s) => {
      s[META].get(key).onsuccess = (e) => (value = e.target.result);
    }).then(() => value);
  }

  /// Sets one entry of the meta store; resolves once it is committed.
  put(key, value) {
    return this.transaction([META], "readwrite", (s) => s[META].put(value, key));
  }

  /// Forgets the content of the message or post kept at log sequence `n`
  /// (deleted for everyone), keeping the entry as a tombstone.
  scrub(n) {
    return this.transaction([EVENTS], "readwrite", (s) => {
      const req = s[EVENTS].get(n);
      req.onsuccess = () => {
        const row = req.result;
        const body = row && (row.event.message || (row.event.group && row.event.group.message));
        if (!body) return;
        body.payload = "";
        body.purged = true;
        s[EVENTS].put(row);
      };
    });
  }

  /// A message typed and not yet acknowledged by the server.
  queue(item) {
    return this.transaction([OUTBOX], "readwrite", (s) => s[OUTBOX].put(item));
  }

  /// The server acknowledged (or refused for good) the message `clientId`.
  unqueue(clientId) {
    return this.transaction([OUTBOX], "readwrite", (s) => s[OUTBOX].delete(clientId));
  }
}
