// Skylark protocol v1 for the browser: the proto3 JSON mapping over
// WebSocket (subprotocol "skylark.v1.json"), device keys in WebCrypto,
// and the HTTP JSON API for sign-up and linking. See docs/PROTOCOL.md.
//
// 64-bit integers travel as decimal strings (proto3 JSON) and stay strings
// here; bytes are base64.

export const PROTOCOL_VERSION = 1;
const CONTEXT = new TextEncoder().encode("skylark-auth-v1\0");

export function toBase64(bytes) {
  let s = "";
  for (const b of new Uint8Array(bytes)) s += String.fromCharCode(b);
  return btoa(s);
}

export function fromBase64(text) {
  const s = atob(text || "");
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

/// What the device signs: context, server id, nonce, device id (big-endian),
/// each variable part prefixed by its length.
export function transcript(serverId, nonce, deviceId) {
  const out = new Uint8Array(CONTEXT.length + 4 + serverId.length + 4 + nonce.length + 8);
  const view = new DataView(out.buffer);
  let at = 0;
  out.set(CONTEXT, at);
  at += CONTEXT.length;
  view.setUint32(at, serverId.length);
  at += 4;
  out.set(serverId, at);
  at += serverId.length;
  view.setUint32(at, nonce.length);
  at += 4;
  out.set(nonce, at);
  at += nonce.length;
  view.setBigUint64(at, BigInt(deviceId));
  return out;
}

// ---------------------------------------------------------------- keys

const DB = "skylark";
const STORE = "identity";

function openDb() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function idb(mode, fn) {
  const db = await openDb();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const req = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req && req.result);
      tx.onerror = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

/// A new Ed25519 key pair whose private half can never leave the browser.
export async function generateKey() {
  const pair = await crypto.subtle.generateKey({ name: "Ed25519" }, false, ["sign", "verify"]);
  const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return { pair, publicKey };
}

/// The saved identity: { accountId, deviceId, phone, pair }, or undefined.
export function loadIdentity() {
  return idb("readonly", (s) => s.get("me"));
}

export function saveIdentity(identity) {
  return idb("readwrite", (s) => s.put(identity, "me"));
}

export function forgetIdentity() {
  return idb("readwrite", (s) => s.delete("me"));
}

// ---------------------------------------------------------------- HTTP API

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.error;
    this.retryAfterMs = body && body.retry_after_ms;
    this.attemptsLeft = body && body.attempts_left;
  }
}

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "content-type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const json = await response.json().catch(() => ({}));
  if (!response.ok) throw new ApiError(response.status, json);
  return json;
}

export const api = {
  startVerification: (phone) => call("POST", "/v1/verification", { phone }),
  resend: (id) => call("POST", `/v1/verification/${encodeURIComponent(id)}/resend`),
  verify: (id, code, publicKey, deviceName, pin) =>
    call("POST", `/v1/verification/${encodeURIComponent(id)}/verify`, {
      code,
      public_key: toBase64(publicKey),
      device_name: deviceName,
      ...(pin ? { pin } : {}),
    }),
  createLink: (publicKey, deviceName) =>
    call("POST", "/v1/links", { public_key: toBase64(publicKey), device_name: deviceName }),
  waitLink: (id, waitMs) => call("GET", `/v1/links/${encodeURIComponent(id)}?wait_ms=${waitMs}`),
  nodes: () => call("GET", "/v1/nodes"),
  vapid: () => call("GET", "/v1/push/vapid"),
};

// ---------------------------------------------------------------- sessions

/// A refusal from the server (an Error frame), with its code name.
export class Refused extends Error {
  constructor(error) {
    super(error.message || error.code);
    this.code = error.code;
    this.retryAfterMs = Number(error.retryAfterMs || 0);
  }
}

/// Close codes after which reconnecting by itself would be wrong.
const FINAL_CLOSES = new Set([4001, 4003, 4004, 4005]);

/// How long a connect may take to be authenticated before the next node is
/// tried: a node that is gone without refusing (a dropped route) would
/// otherwise hold the page until the browser gives up on it.
const OPEN_TIMEOUT_MS = 8000;

/// One authenticated WebSocket session. `onFrame(frame)` gets every frame
/// the server sends on its own (events, caught-up, presence, typing), in
/// order, each after `prepare(frame)` (optional) has settled when it
/// returned a promise (a rejected one closes the connection, so that the
/// next one brings that frame again);
/// `onClose(code, reason)` is called once when it ends. `host` is the
/// node's `host:port` (the page's own by default), reached with the page's
/// scheme.
export class Session {
  static open(identity, { onFrame, onClose, host = location.host, prepare = null }) {
    return new Promise((resolve, reject) => {
      const url = `${location.protocol === "https:" ? "wss" : "ws"}://${host}/v1/ws`;
      const ws = new WebSocket(url, "skylark.v1.json");
      const session = new Session(ws, onFrame, onClose);
      session.prepare = prepare;
      session.host = host;
      let authenticated = false;
      const timer = setTimeout(() => {
        if (authenticated) return;
        reject(new Refused({ code: "TIMEOUT", message: `${host} did not answer in time` }));
        ws.close();
      }, OPEN_TIMEOUT_MS);
      ws.onopen = () =>
        session.raw({ id: "1", hello: { minVersion: 1, maxVersion: 1, client: "skylark-web/0.1" } });
      ws.onmessage = async (message) => {
        const frame = JSON.parse(message.data);
        if (!authenticated) {
          if (frame.challenge) {
            const c = frame.challenge;
            const nonce = fromBase64(c.nonce);
            const signed = transcript(fromBase64(c.serverId), nonce, identity.deviceId);
            const signature = await crypto.subtle.sign({ name: "Ed25519" }, identity.pair.privateKey, signed);
            session.raw({
              id: "2",
              authenticate: { deviceId: String(identity.deviceId), nonce: c.nonce, signature: toBase64(signature) },
            });
          } else if (frame.authenticated) {
            authenticated = true;
            clearTimeout(timer);
            session.info = frame.authenticated;
            session.startHeartbeat(Number(frame.authenticated.heartbeatIntervalMs || 25000));
            resolve(session);
          } else if (frame.error) {
            reject(new Refused(frame.error));
          }
          return;
        }
        session.dispatch(frame);
      };
      ws.onclose = (e) => {
        clearTimeout(timer);
        if (authenticated) session.closed(e.code, e.reason);
        else reject(new Refused({ code: `CLOSE_${e.code}`, message: e.reason || "connection closed" }));
      };
    });
  }

  constructor(ws, onFrame, onClose) {
    this.ws = ws;
    this.onFrame = onFrame;
    this.onClose = onClose;
    this.nextId = 10;
    this.pending = new Map();
    this.timer = null;
    this.ended = false;
    this.backlog = [];
    this.delivering = false;
    this.halted = false;
    this.prepare = null;
  }

  raw(frame) {
    if (this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  startHeartbeat(ms) {
    this.timer = setInterval(() => this.request({ ping: {} }).catch(() => {}), ms);
  }

  dispatch(frame) {
    const id = frame.id || "0";
    if (id !== "0" && this.pending.has(id)) {
      const { resolve, reject } = this.pending.get(id);
      this.pending.delete(id);
      if (frame.error) reject(new Refused(frame.error));
      else resolve(frame);
      return;
    }
    if (frame.close || this.halted) return;
    this.backlog.push(frame);
    if (!this.delivering) this.deliver();
  }

  /// Hands frames to `onFrame` in the order they came. `prepare(frame)`,
  /// when set, may return a promise (a frame whose content must be fetched
  /// first): the frames after it wait for it, answers to requests do not.
  async deliver() {
    this.delivering = true;
    try {
      while (this.backlog.length) {
        const frame = this.backlog.shift();
        const ready = this.prepare && this.prepare(frame);
        if (ready && !(await ready.then(() => true, () => false))) {
          // It could not be made ready (its content could not be fetched):
          // the connection ends here, with it and what follows it not
          // acknowledged (nothing after it is handed on, even what arrives
          // before the socket has closed), and the next connection brings
          // them again.
          this.halted = true;
          this.backlog = [];
          this.close();
          return;
        }
        try {
          this.onFrame(frame);
        } catch (err) {
          setTimeout(() => { throw err; }); // reported as the page's error, the frames after it still delivered
        }
      }
    } finally {
      this.delivering = false;
    }
  }

  closed(code, reason) {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.timer);
    for (const { reject } of this.pending.values()) reject(new Refused({ code: "CLOSED", message: "connection closed" }));
    this.pending.clear();
    this.onClose(code, reason, FINAL_CLOSES.has(code));
  }

  /// Sends a request body ({ send: {...} } and so on); resolves with the reply frame.
  request(body) {
    if (this.ended) return Promise.reject(new Refused({ code: "CLOSED", message: "not connected" }));
    const id = String(this.nextId++);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.raw({ id, ...body });
    });
  }

  /// Notifications are never answered.
  notify(body) {
    this.raw({ id: "0", ...body });
  }

  close() {
    this.ws.close(1000, "bye");
  }
}
