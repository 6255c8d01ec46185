// Skylark in the browser: sign-up or linking, chat list, conversations
// with live ticks, typing and presence, groups, linked devices.
//
// The page keeps its own copy of the account in IndexedDB (store.js):
// after a reload it shows every chat at once from there, then reads what
// is newer from the server's history, then, in the background, the older
// pages down to the start of the server's history window. Live events are
// kept as they arrive. Every log event is handled once (by its sequence
// number) and acknowledged after it is kept. Messages typed but not yet
// acknowledged are kept too, and sent when a connection comes back, even
// after the tab was closed.

import {
  api, ApiError, Refused, Session, forgetIdentity, fromBase64, generateKey, loadIdentity, saveIdentity, toBase64,
} from "./proto.js";
import { LocalStore } from "./store.js";
import { Crypto } from "./e2ee.js";

const $ = (id) => document.getElementById(id);

/// Builds an element; children are nodes or text (never parsed as HTML).
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c);
  return el;
}

// ---------------------------------------------------------------- state

const state = {
  me: null,
  session: null,
  connected: false,
  chats: new Map(), // key ("p:+1555…" or "g:<id>") → chat
  open: null,
  seen: new Set(), // log sequences already handled
  groups: new Map(), // group id → GroupInfo
  // The groups of 1:1 conversations (the order of their end-to-end
  // encryption): group id → the other person's phone. Their posts are
  // shown in that person's chat.
  directs: new Map(),
  presence: new Map(), // phone → PresenceInfo
  typing: new Map(), // phone → expiry time (ms)
  outbox: [], // sends waiting for their ack (kept across reconnects and in the local store)
  local: null, // the LocalStore of this device, when IndexedDB opened
  crypto: null, // this device's end-to-end encryption (e2ee.js), when it loaded
  keysPublished: false, // its key packages are on the server: others can encrypt for it
  // Encrypted posts shown as not readable here, by group: group → groupSeq
  // → { g, order }, shown again when another device of this account gives
  // this one the conversation's history.
  locked: new Map(),
  // The part of the account's log held here with nothing missing:
  // sequences lo..=hi (lo 0: down to the start of the history window);
  // null before the first page was read.
  log: { hi: null, lo: null },
  wake: null, // ends the pause between two background history pages
  muted: new Set(), // chat keys whose messages raise no notification (kept in the local store)
  blocked: new Set(), // phone numbers this account blocked (from the server, kept current by the log)
  names: new Map(), // phone → the name this account gave that contact (synced across its devices)
  profiles: new Map(), // phone → ProfileInfo (their own name and about, as they let us see them)
  pushOn: false, // this session registered the browser's push subscription
  ackTimer: null,
  arrived: [], // live events to keep and acknowledge
  composing: null, // the next message replies to ({ key, reply }) or edits ({ key, edits }) another
  backoff: 0,
  lastHost: null, // the node that took the last session
};

/// How many of a conversation's newest messages are drawn at first; each
/// scroll to the top draws this many more.
const WINDOW = 60;

function chat(key, init = {}) {
  let c = state.chats.get(key);
  if (!c) {
    const group = key.startsWith("g:");
    c = {
      key, kind: group ? "group" : "peer", title: key.slice(2), peer: null, group: group ? key.slice(2) : undefined,
      messages: new Map(), delivered: 0, read: 0, readByMe: 0, lastAt: 0, window: WINDOW,
    };
    state.chats.set(key, c);
    if (!group && state.session) presenceSoon();
  }
  Object.assign(c, init);
  return c;
}

const peerKey = (phone) => `p:${phone}`;
const groupKey = (id) => `g:${id}`;

function normalisePhone(text) {
  const digits = text.replace(/[\s\-().]/g, "");
  return /^\+[1-9]\d{6,14}$/.test(digits) ? digits : null;
}

function clientId() {
  const b = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

const decoder = new TextDecoder();
// End-to-end encrypted payloads (MLS) start with these bytes
// (skylark_e2ee::MAGIC); e2ee.js opens them.
const MLS_MAGIC = [0, 83, 75, 77, 76, 83, 49]; // "\0SKMLS1"
const LOCKED = "An end-to-end encrypted message this browser cannot read: it was sent before this browser joined the conversation, or its keys have not arrived yet.";
// "application" for an encrypted message, "handshake" for a Welcome or a
// commit (nothing to show), null for a plain payload.
const mlsKind = (bytes) => {
  // A commit bundled with its Welcome ("\0SKMLSB"): a handshake.
  if (bytes.length > MLS_MAGIC.length && MLS_MAGIC.slice(0, 6).every((b, i) => bytes[i] === b) && bytes[6] === 66) {
    return "handshake";
  }
  if (bytes.length < MLS_MAGIC.length + 4 || MLS_MAGIC.some((b, i) => bytes[i] !== b)) return null;
  let at = MLS_MAGIC.length + 2; // past the protocol version
  const wireFormat = (bytes[at] << 8) | bytes[at + 1];
  at += 2;
  if (wireFormat !== 2) return "handshake"; // not a PrivateMessage
  const lengthBytes = 1 << (bytes[at] >> 6); // the group id's QUIC-style length prefix
  let groupIdLength = bytes[at] & 0x3f;
  for (let i = 1; i < lengthBytes; i++) groupIdLength = groupIdLength * 256 + bytes[at + i];
  at += lengthBytes + groupIdLength + 8; // past the group id and the epoch
  return bytes[at] === 1 ? "application" : "handshake";
};
const payloadBytes = (b64) => Uint8Array.from(atob(b64 || ""), (c) => c.charCodeAt(0));
const payloadText = (b64) => {
  try {
    const bytes = payloadBytes(b64);
    if (mlsKind(bytes)) return LOCKED;
    return decoder.decode(bytes);
  } catch {
    return "(unreadable)";
  }
};
const payloadOf = (text) => {
  const bytes = new TextEncoder().encode(text);
  let s = "";
  for (const b of bytes) s += String.fromCharCode(b);
  return btoa(s);
};

// ---------------------------------------------------------------- content
//
// What a message says, as every Skylark client writes it in the payload
// (skylark_client::content): plain text, or "\u0001" and a JSON object
// tagged by "t" — a text with a quoted reply or marked forwarded, a
// reaction, a disappearing-timer change, a deletion. Message ids in it are
// "SENDER:SEQ" (for a group post, the group and its sequence).

const MARK = "\u0001";
function parseContent(text) {
  if (!text.startsWith(MARK)) return { t: "text", text };
  try {
    const c = JSON.parse(text.slice(1));
    return c && typeof c.t === "string" ? c : { t: "unknown" };
  } catch {
    return { t: "unknown" };
  }
}
function encodeContent(c) {
  if (c.t === "text" && !c.reply && !c.fwd && !c.text.startsWith(MARK)) return c.text;
  return MARK + JSON.stringify(c);
}
/// The disappearing timers offered, as [ms, words].
const TIMERS = [[0, "Off"], [86400000, "24 hours"], [7 * 86400000, "7 days"], [90 * 86400000, "90 days"]];
function timerWords(ms) {
  const known = TIMERS.find(([t]) => t === ms);
  if (known) return known[1].toLowerCase();
  for (const [unit, name] of [[86400000, "day"], [3600000, "hour"], [60000, "minute"], [1000, "second"]]) {
    if (ms % unit === 0 || unit === 1000) {
      const n = Math.ceil(ms / unit);
      return `${n} ${name}${n === 1 ? "" : "s"}`;
    }
  }
  return `${ms} ms`;
}
/// The server's windows for changing a sent message (messaging.edit_window_ms
/// and delete_window_ms at their defaults; the server has the last word).
const EDIT_WINDOW_MS = 15 * 60 * 1000;
const DELETE_WINDOW_MS = 48 * 60 * 60 * 1000;
const REACTIONS = ["👍", "❤️", "😂", "😮", "😢", "🙏"];
const QUOTE_CHARS = 80;
const quoteOf = (text) => (text.length > QUOTE_CHARS ? `${[...text].slice(0, QUOTE_CHARS).join("")}…` : text);

/// A message's fields that come from its content and from what the server
/// says of it: `ref` (its id), what it edits or deletes, when it expires,
/// whether its payload was purged, and the words to show for it.
function described(ref, sender, text, meta, mine, from) {
  const content = text === LOCKED ? { t: "text", text } : parseContent(text);
  const target = (seq) => (seq ? `${sender}:${seq}` : null);
  const out = {
    ref, content, edits: target(meta.edits), deletes: target(meta.deletes),
    expiresAt: Number(meta.expiresAtMs || 0), purged: !!meta.purged, text: "",
  };
  const who = mine ? "You" : from;
  if (out.purged) out.text = "This message was deleted";
  else if (out.deletes) out.text = `${who} deleted a message`;
  else if (content.t === "text") out.text = content.text;
  else if (content.t === "file" && content.file) out.text = fileWords(content);
  else if (content.t === "react") out.text = content.emoji ? `${who} reacted ${content.emoji}` : `${who} took back a reaction`;
  else if (content.t === "timer") {
    out.text = content.ms ? `${who} set disappearing messages to ${timerWords(Number(content.ms))}` : `${who} turned off disappearing messages`;
  } else out.text = "A kind of message this version cannot show; reload the page to update it.";
  // Reactions, edits and deletions change other messages: never unread.
  out.quiet = !!(out.edits || out.deletes || content.t === "react");
  out.timer = content.t === "timer";
  return out;
}

// Icons are drawn (SVG), not taken from a font: a browser without an emoji
// font would show boxes.
const SVG = "http://www.w3.org/2000/svg";
const ICONS = {
  clock: ["M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18", "M12 7v5l3 2"],
  sent: ["M5 13l4 4L19 7"],
  delivered: ["M2 13l4 4L16 7", "M9 15l2 2L21 7"],
  read: ["M2 13l4 4L16 7", "M9 15l2 2L21 7"],
  failed: ["M12 4v10", "M12 18v2"],
  lock: ["M6 11h12v9H6z", "M8 11V8a4 4 0 0 1 8 0v3"],
  person: ["M12 4a4 4 0 1 0 0 8a4 4 0 1 0 0-8", "M4 21a8 8 0 0 1 16 0"],
  info: ["M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18", "M12 11v6", "M12 7.5v.5"],
  deleted: ["M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18", "M5.6 5.6l12.8 12.8"],
  timer: ["M7 3h10", "M7 21h10", "M8 3c0 5 8 5 8 9s-8 4-8 9", "M16 3c0 5-8 5-8 9s8 4 8 9"],
  clip: ["M20 11l-8 8a5 5 0 0 1-7-7l8-8a3.5 3.5 0 0 1 5 5l-8 8a2 2 0 0 1-3-3l7-7"],
  mic: ["M9 5a3 3 0 0 1 6 0v6a3 3 0 0 1-6 0z", "M5 11a7 7 0 0 0 14 0", "M12 18v3"],
  stop: ["M7 7h10v10H7z"],
  file: ["M6 3h8l4 4v14H6z", "M14 3v4h4"],
};
function icon(name, label) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", `icon icon-${name}`);
  if (label) {
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", label);
  } else {
    svg.setAttribute("aria-hidden", "true");
  }
  for (const d of ICONS[name]) {
    const path = document.createElementNS(SVG, "path");
    path.setAttribute("d", d);
    svg.append(path);
  }
  return svg;
}

/// A name for this browser in the account's device list ("Chrome on
/// Linux"); it can be renamed there.
function browserName() {
  const ua = navigator.userAgent;
  const browser = /Edg\//.test(ua) ? "Edge" : /Firefox\//.test(ua) ? "Firefox"
    : /Chrom(e|ium)\//.test(ua) ? "Chrome" : /Safari\//.test(ua) ? "Safari" : "Web browser";
  const system = /Android/.test(ua) ? "Android" : /iPhone|iPad/.test(ua) ? "iOS" : /Windows/.test(ua) ? "Windows"
    : /Mac OS X/.test(ua) ? "macOS" : /Linux/.test(ua) ? "Linux" : null;
  return system ? `${browser} on ${system}` : browser;
}

function clock(ms) {
  const d = new Date(Number(ms));
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/// Midnight of the day of `ms`, local time.
const dayOf = (ms) => new Date(Number(ms)).setHours(0, 0, 0, 0);

/// "Today", "Yesterday", a weekday within the week, else the date.
function dayName(ms) {
  const days = Math.round((dayOf(Date.now()) - dayOf(ms)) / 86400000);
  if (days === 0) return "Today";
  if (days === 1) return "Yesterday";
  const d = new Date(Number(ms));
  if (days > 1 && days < 7) return d.toLocaleDateString([], { weekday: "long" });
  return d.toLocaleDateString([], { day: "numeric", month: "long", year: "numeric" });
}

/// "today at 13:36", "yesterday at 09:12", "on 30 November at 18:02".
function whenSeen(ms) {
  const day = dayName(ms);
  const at = clock(ms);
  if (day === "Today" || day === "Yesterday") return `${day.toLowerCase()} at ${at}`;
  return `on ${day} at ${at}`;
}

/// A chat list time: the time today, "Yesterday", then the date.
function listTime(ms) {
  const day = dayName(ms);
  if (day === "Today") return clock(ms);
  return day === "Yesterday" ? day : new Date(Number(ms)).toLocaleDateString([], { day: "numeric", month: "short" });
}

/// A round picture: a group's initials, or a person's outline, on a colour
/// of its own.
function avatar(c) {
  let hash = 0;
  for (const ch of c.key) hash = (hash * 31 + ch.charCodeAt(0)) >>> 0;
  const words = c.kind === "group" && !c.locked ? c.title.split(/\s+/).filter(Boolean) : [];
  const initials = words.slice(0, 2).map((w) => [...w][0].toUpperCase()).join("");
  return h("span", { class: `avatar hue-${hash % 6}`, "aria-hidden": "true" }, initials || icon("person"));
}

// ---------------------------------------------------------------- errors

let bannerTimer = null;
function say(text, kind = "error") {
  // A dialog is drawn above the page: its messages go inside it.
  if ($("panel").open) {
    const note = $("panel-note");
    note.textContent = text;
    note.className = kind;
    note.hidden = false;
    return;
  }
  const b = $("banner");
  b.textContent = text;
  b.className = kind;
  b.hidden = false;
  clearTimeout(bannerTimer);
  bannerTimer = setTimeout(() => (b.hidden = true), kind === "error" ? 8000 : 3000);
}

/// The server's message as a sentence: capitalised, with a full stop.
function sentence(text) {
  if (!text) return "";
  const s = text[0].toUpperCase() + text.slice(1);
  return /[.!?]$/.test(s) ? s : `${s}.`;
}

function explain(e) {
  if (e instanceof Refused) {
    const words = {
      ERROR_CODE_UNKNOWN_RECIPIENT: "No Skylark account has that phone number.",
      ERROR_CODE_NOT_A_MEMBER: "You are not a member of that group.",
      ERROR_CODE_FORBIDDEN: sentence(e.message) || "You may not do that.",
      ERROR_CODE_BLOCKED: "You blocked this contact. Unblock them to send messages.",
      ERROR_CODE_GROUP_FULL: "The group is full.",
      ERROR_CODE_RATE_LIMITED: `Too many requests; try again in ${Math.ceil(e.retryAfterMs / 1000)} s.`,
      ERROR_CODE_UNAVAILABLE: "The server is busy; it will be retried.",
      ERROR_CODE_MESSAGE_TOO_LARGE: "That message is too large.",
      ERROR_CODE_BANNED: "This number is banned from this server; ask its operator.",
    };
    return words[e.code] || e.message || e.code;
  }
  if (e instanceof ApiError) return e.message;
  return String(e && e.message ? e.message : e);
}

// ---------------------------------------------------------------- welcome

function showWelcome() {
  $("app").hidden = true;
  $("welcome").hidden = false;
  $("phone").focus();
}

let verification = null;
let pendingKey = null;

$("phone-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const phone = normalisePhone($("phone").value);
  if (!phone) return say("Type the number in international form, like +15551234567.");
  try {
    verification = await api.startVerification(phone);
    $("code-phone").textContent = verification.phone;
    $("code-form").hidden = false;
    $("code").focus();
    if (verification.sms && verification.sms.status === "failed") say("The SMS could not be sent; ask for a new code.");
  } catch (err) {
    say(explain(err));
  }
});

$("resend").addEventListener("click", async () => {
  if (!verification) return;
  try {
    verification = await api.resend(verification.session_id);
    say("A new code is on its way.", "info");
  } catch (err) {
    say(explain(err));
  }
});

$("code-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    pendingKey = pendingKey || (await generateKey());
    const pin = $("pin-field").hidden ? undefined : $("pin").value.trim();
    if (pin !== undefined && !/^[0-9]{6}$/.test(pin)) return say("A PIN is 6 digits; nothing was checked, so no attempt was used.");
    const r = await api.verify(verification.session_id, $("code").value.trim(), pendingKey.publicKey, browserName(), pin);
    await enter({ accountId: String(r.account_id), deviceId: String(r.device_id), phone: r.phone, pair: pendingKey.pair });
  } catch (err) {
    if (err instanceof ApiError && err.code === "registration_locked") {
      // The code was right: the number's PIN is needed too.
      $("pin-field").hidden = false;
      $("pin").focus();
      return say(sentence(err.message), "info");
    }
    if (err instanceof ApiError && err.code === "wrong_pin") {
      $("pin").value = "";
      return say(sentence(err.message));
    }
    say(err instanceof ApiError && err.code === "wrong_code"
      ? `Wrong code; ${err.attemptsLeft} ${err.attemptsLeft === 1 ? "attempt" : "attempts"} left.` : explain(err));
  }
});

$("link-start").addEventListener("click", async () => {
  try {
    const key = await generateKey();
    const link = await api.createLink(key.publicKey, browserName());
    $("link-show").hidden = false;
    $("link-code").textContent = link.code;
    $("link-code-2").textContent = link.code;
    if (link.qr_svg) $("link-qr").src = `data:image/svg+xml;base64,${btoa(link.qr_svg)}`;
    $("link-start").hidden = true;
    for (;;) {
      const s = await api.waitLink(link.link_id, 25000);
      if (s.status === "approved") {
        await enter({ accountId: String(s.account_id), deviceId: String(s.device_id), phone: s.phone, pair: key.pair });
        return;
      }
      if (s.status === "expired") {
        $("link-status").textContent = "The code expired.";
        $("link-start").hidden = false;
        return;
      }
    }
  } catch (err) {
    say(explain(err));
    $("link-start").hidden = false;
  }
});

// ---------------------------------------------------------------- session

async function enter(identity) {
  await saveIdentity(identity);
  state.me = identity;
  $("welcome").hidden = true;
  $("app").hidden = false;
  $("me-phone").textContent = identity.phone;
  setConnState("connecting…"); // encryption and the local copy open first
  await openLocal();
  connect();
}

/// Shows what this browser kept: chats, messages, ticks and the outbox.
async function openLocal() {
  try {
    state.local = await LocalStore.open(state.me.deviceId);
    await openCrypto(); // on by default: every browser that can keep keys encrypts
    const kept = await state.local.load();
    state.log = { hi: kept.meta.hi ?? null, lo: kept.meta.lo ?? null };
    for (const g of kept.meta.groups || []) rememberGroup(g);
    state.muted = new Set(kept.meta.muted || []);
    applyReceipts(kept.meta.receipts || []);
    for (const event of kept.events) apply(event, false);
    for (const item of kept.outbox) enqueue(item);
  } catch {
    state.local = null;
    say("This browser could not open its copy of your chats; they are read from the server instead.");
  }
  renderAll();
}

/// This device's end-to-end encryption, from IndexedDB (made the first
/// time, its MLS key signed by the device key). Without it (no IndexedDB,
/// no WebAssembly) this browser publishes no keys, and its conversations
/// stay unencrypted.
async function openCrypto() {
  try {
    await holdCrypto();
    const sign = (bytes) => crypto.subtle.sign({ name: "Ed25519" }, state.me.pair.privateKey, bytes);
    state.crypto = await Crypto.open(state.me, state.local, sign);
    state.crypto.blobs = commitBlobs;
    return true;
  } catch (err) {
    state.crypto = null;
    say(`End-to-end encryption could not start in this browser (${err.message}); your messages are sent unencrypted.`);
    return false;
  }
}

/// One tab of this browser at a time keeps the device's encryption: a tab
/// opened later takes it over before reading it (as it takes over the
/// device's connection), and this one then stops writing or using it.
/// Held for the tab's life.
async function holdCrypto() {
  if (!navigator.locks) return;
  await new Promise((held) => {
    navigator.locks.request(`skylark-e2ee-${state.me.deviceId}`, { steal: true }, () => {
      held();
      return new Promise(() => {});
    }).catch(() => {
      // Taken over by a newer tab (or, not granted at all: go on without).
      if (state.crypto) state.crypto.stop();
      held();
    });
  });
}

/// Tries again to start end-to-end encryption in this browser (it starts
/// by itself when the page opens; this is for when that failed).
async function turnOnEncryption() {
  if (!state.local) return say("This browser cannot keep encryption keys (its storage is unavailable), so it cannot encrypt.");
  if (!state.session) return say("Not connected; start it once this browser is back online.");
  if (!state.crypto && !(await openCrypto())) return;
  await cryptoAfterConnect(state.session);
  for (const c of state.chats.values()) if (c.direct) c.locked = encryptsFor(c.direct);
  renderAll();
  await showSettings();
  say("End-to-end encryption is on for this browser.", "info");
}

/// Finishes what a closed page left half-done, and keeps this device's
/// key packages published so others can start encrypted conversations.
async function cryptoAfterConnect(session) {
  if (!state.crypto) return;
  try {
    await state.crypto.resume(session);
    await state.crypto.replenish(session);
    state.keysPublished = true;
    await maintainCrypto(session);
  } catch (err) {
    if (!(err instanceof Refused && err.code === "CLOSED")) say(explain(err));
  }
}

/// Carries device changes into the encrypted conversations; a linked
/// device that has not published its keys yet (a slow one may take a
/// while) is tried again a little later, at most 15 s apart, for three
/// minutes of this session (the next connection tries too).
async function maintainCrypto(session, wait = 2000, since = Date.now()) {
  if (!(await state.crypto.maintain(session)) || state.session !== session || Date.now() - since > 180000) return;
  setTimeout(() => {
    maintainCrypto(session, Math.min(wait * 2, 15000), since).catch((err) => {
      if (!(err instanceof Refused && err.code === "CLOSED")) say(explain(err));
    });
  }, wait);
}

function setConnState(text) {
  $("conn-state").textContent = text;
}

// ---------------------------------------------------------------- nodes
//
// A cluster's nodes are listed at /v1/nodes. The page keeps the list, so
// when the node it was loaded from is gone it reconnects to another one
// (as the SDK's Endpoint::Any does): the node that served it last first,
// then the page's own, then the others in a random order.

const NODES_KEY = "skylark.nodes";
/// Refusals of the device itself, which every node would repeat.
const SIGNED_OUT = ["ERROR_CODE_UNKNOWN_DEVICE", "ERROR_CODE_DEVICE_REMOVED"];

function knownNodes() {
  try {
    const nodes = JSON.parse(localStorage.getItem(NODES_KEY) || "[]");
    return Array.isArray(nodes) ? nodes.filter((n) => typeof n === "string") : [];
  } catch {
    return [];
  }
}

async function refreshNodes() {
  try {
    const list = await api.nodes();
    localStorage.setItem(NODES_KEY, JSON.stringify((list.nodes || []).map((n) => n.address)));
  } catch {
    // The page's own node is unreachable: keep the list from before.
  }
}

function candidates() {
  const others = knownNodes().filter((n) => n !== location.host);
  for (let i = others.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [others[i], others[j]] = [others[j], others[i]];
  }
  const order = [state.lastHost, location.host, ...others].filter(Boolean);
  return [...new Set(order)];
}

/// The first node that takes the session; a refusal of this device (not
/// of the node) ends the search, since every node would say the same.
async function openAnywhere() {
  let last = null;
  for (const host of candidates()) {
    try {
      return await Session.open(state.me, { onFrame, onClose, host, prepare: prepareFrame });
    } catch (err) {
      if (err instanceof Refused && (SIGNED_OUT.includes(err.code) || err.code === "ERROR_CODE_BANNED")) throw err;
      last = err;
    }
  }
  throw last || new Error("no server to connect to");
}

async function connect() {
  setConnState("connecting…");
  try {
    const session = await openAnywhere();
    state.session = session;
    state.lastHost = session.host;
    state.connected = true;
    state.backoff = 0;
    setConnState("");
    refreshNodes();
    await afterConnect(session);
  } catch (err) {
    if (err instanceof Refused && SIGNED_OUT.includes(err.code)) {
      return signedOut("This browser was signed out of the account.");
    }
    if (err instanceof Refused && err.code === "ERROR_CODE_BANNED") {
      // Kept signed in: the operator may lift the ban; a reload tries again.
      setConnState("banned");
      return say(explain(err));
    }
    if (!state.connected) reconnectLater();
  }
}

function reconnectLater() {
  // Exponential back-off with full jitter: 250 ms doubling to 10 s.
  const ceiling = Math.min(10000, 250 * 2 ** state.backoff);
  state.backoff = Math.min(state.backoff + 1, 10);
  setConnState("offline — reconnecting…");
  setTimeout(connect, Math.random() * ceiling);
}

function onClose(code, reason, final) {
  state.connected = false;
  state.session = null;
  renderHeader(); // no "online" or "typing…" while this page cannot know
  if (code === 4005) {
    const why = state.deletingAccount ? "Your account was deleted."
      : state.loggingOut ? "You logged out of this browser." : "This browser was removed from the account.";
    return signedOut(why);
  }
  if (code === 4004) {
    setConnState("open in another window");
    return say("Skylark is open in another window or tab with this account; this one stopped.");
  }
  if (final) {
    setConnState("disconnected");
    return say(code === 4003
      ? "The server no longer speaks this page's protocol version; reload the page to get the current one."
      : "The server did not accept this browser's sign-in; reload the page to try again, or link it anew.");
  }
  reconnectLater();
}

async function signedOut(why) {
  state.loggingOut = false;
  state.deletingAccount = false;
  state.blocked = new Set();
  state.names = new Map();
  state.profiles = new Map();
  const device = state.me && state.me.deviceId;
  await forgetIdentity();
  if (state.local) state.local.close();
  state.local = null;
  if (device) await LocalStore.destroy(device);
  if ($("panel").open) $("panel").close();
  if (why) say(why, "info");
  state.me = null;
  state.chats.clear();
  state.seen.clear();
  state.groups.clear();
  state.outbox = [];
  state.open = null;
  state.log = { hi: null, lo: null };
  // Decrypted files of this account leave with it.
  for (const f of files.values()) if (f.url) URL.revokeObjectURL(f.url);
  files.clear();
  players.clear();
  mediaToken = null;
  $("app").classList.remove("chat-open");
  renderAll();
  showWelcome();
}

async function afterConnect(session) {
  // Groups first (titles), then what is newer than the log held here, then
  // whatever waits to be sent; older history is read in the background.
  try {
    const list = await session.request({ listGroups: {} });
    state.groups.clear();
    for (const g of list.groupList.groups || []) rememberGroup(g);
    keep([], { groups: list.groupList.groups || [] });
    await catchUp(session);
    await cryptoAfterConnect(session);
    await refreshBlocked(session);
    await refreshNames(session);
    await subscribePresence();
    session.request({ setActive: { active: document.visibilityState === "visible" } }).catch(() => {});
  } catch (err) {
    if (!(err instanceof Refused && err.code === "CLOSED")) say(explain(err));
  }
  renderAll();
  flushOutbox();
  if (window.Notification && Notification.permission === "granted") startPush(session).catch(() => {});
  backfill(session).catch((err) => {
    if (!(err instanceof Refused && err.code === "CLOSED")) say(explain(err));
  });
}

function rememberGroup(info) {
  state.groups.set(info.id, info);
  const other = info.direct && (info.members || []).find((m) => m.account !== state.me.accountId);
  if (other) rememberDirect(info.id, other);
  else chat(groupKey(info.id), { title: info.subject, group: info.id, locked: encryptsFor(info.id) });
}

/// A 1:1 conversation's group: its posts (end-to-end encrypted) belong in
/// the chat with the other person, beside any plain messages of before.
function rememberDirect(group, other) {
  state.directs.set(String(group), other.phone);
  const c = chat(peerKey(other.phone), { peer: other.account, direct: String(group) });
  c.locked = encryptsFor(group);
  c.g = c.g || { delivered: 0, read: 0, readByMe: 0 };
  state.chats.delete(groupKey(group)); // shown apart by an earlier version
  return c;
}

/// Whether this device encrypts for the group (it holds its keys).
function encryptsFor(group) {
  try {
    return !!state.crypto && state.crypto.encrypts(group);
  } catch {
    return false;
  }
}

/// The chat a group's events belong in: the person's, for a 1:1
/// conversation's group.
function groupChat(group) {
  const phone = state.directs.get(String(group));
  return phone ? chat(peerKey(phone)) : chat(groupKey(group), { group });
}

/// Where the delivery and read marks of a message are counted: a 1:1
/// conversation counts its group's posts apart from its plain messages
/// (the two number their messages in different sequences).
const laneOf = (c, m) => (c.direct && String(m.id).startsWith("g:") ? c.g : c);

/// The marks a receipt or read sync moves (see laneOf).
function marksOf(r) {
  if (r.peerPhone) return chat(peerKey(r.peerPhone), r.peer ? { peer: r.peer } : {});
  const c = groupChat(r.peer);
  return c.direct ? c.g : c;
}

// ---------------------------------------------------------------- history

/// The server's largest history page.
const HISTORY_PAGE = 200;
/// An upload refused for starting too many at once waits for the server's
/// Retry-After when it is at most this many seconds, this many times at
/// most (as the CLI does).
const UPLOAD_WAIT_SECS = 10;
const UPLOAD_WAITS = 60;
/// The pause between two background pages of older history, unless the
/// user is scrolling back and waits for them.
const BACKFILL_PAUSE_MS = 250;

async function historyPage(session, before) {
  const reply = await session.request({ history: { beforeSeq: String(before), limit: HISTORY_PAGE } });
  const page = reply.historyPage;
  const events = page.events || [];
  return {
    events, receipts: page.receipts || [], hasMore: !!page.hasMore,
    newest: events.length ? Number(events[0].seq) : 0,
    oldest: events.length ? Number(events[events.length - 1].seq) : 0,
  };
}

/// Shows events read from the server's history and keeps them here, with
/// the `meta` that says which part of the log is now held.
function keep(events, meta) {
  for (const event of events.slice().reverse()) apply(event, false);
  if (meta.receipts) applyReceipts(meta.receipts);
  if (meta.hi !== undefined) state.log.hi = meta.hi;
  if (meta.lo !== undefined) state.log.lo = meta.lo;
  renderAll();
  if (!state.local) return Promise.resolve();
  return state.local.putEvents(events, meta).catch(() => {
    say("This browser could not keep a copy of new messages (is its storage full?); they stay on the server.");
  });
}

/// Reads the log from the newest entry down to the part already held. The
/// held range grows only once every page in between was read, so a tab
/// closed halfway reads them again next time.
async function catchUp(session) {
  const held = state.log.hi;
  let before = 0;
  let newest = null;
  for (;;) {
    const page = await historyPage(session, before);
    if (newest === null) newest = page.newest;
    if (held === null) {
      // Nothing held yet: this page is the held range; older ones follow.
      return keep(page.events, { receipts: page.receipts, hi: newest, lo: page.hasMore ? page.oldest : 0 });
    }
    const done = !page.hasMore || page.events.length === 0 || page.oldest <= held;
    await keep(page.events, done ? { receipts: page.receipts, hi: Math.max(newest, held) } : { receipts: page.receipts });
    if (done) return;
    before = page.oldest;
  }
}

/// Reads older pages, down to the start of the server's history window,
/// while this session lasts: chats whose last message is old, and unread
/// counts, are then complete.
async function backfill(session) {
  while (state.log.lo !== 0 && state.log.lo !== null && state.session === session) {
    const page = await historyPage(session, state.log.lo);
    await keep(page.events, { receipts: page.receipts, lo: page.hasMore && page.events.length ? page.oldest : 0 });
    if (state.log.lo !== 0) {
      await new Promise((resolve) => {
        state.wake = resolve;
        setTimeout(resolve, BACKFILL_PAUSE_MS);
      });
      state.wake = null;
    }
  }
}

function applyReceipts(receipts) {
  for (const r of receipts) {
    const c = marksOf(r);
    c.delivered = Math.max(c.delivered, Number(r.deliveredUpTo || 0));
    c.read = Math.max(c.read, Number(r.readUpTo || 0));
    c.readByMe = Math.max(c.readByMe, Number(r.readByMeUpTo || 0));
  }
}

/// Before a frame is handled: a post naming the parts of a commit too
/// large for one post gets the parts this browser needs downloaded in
/// place (the frames after it wait; the log's order matters to MLS). When
/// that fails for now, the connection starts again from that entry.
function prepareFrame(frame) {
  if (!frame.event || !state.crypto || !Crypto.keptOutOfLine(frame.event)) return null;
  return state.crypto.fetchParts(frame.event).then((event) => { frame.event = event; });
}

/// The blobs of commits too large for one post, as the encryption
/// uploads and downloads them.
const commitBlobs = {
  upload: (bytes) => uploadBytes(bytes, () => {}),
  async download(id) {
    const r = await fetch(`${mediaBase()}/v1/blobs/${id}`, { headers: { authorization: `Bearer ${(await mediaAuth()).token}` } });
    if (!r.ok) throw await httpError(r);
    return new Uint8Array(await r.arrayBuffer());
  },
};

function onFrame(frame) {
  if (frame.event) {
    // Encrypted posts are opened here, in the log's order (MLS needs it),
    // even when a page of history showed them first (as not yet readable).
    let opened = null;
    if (state.crypto) {
      try {
        opened = state.crypto.openEvent(frame.event);
      } catch (err) {
        opened = { kind: "failed", reason: err.message };
      }
    }
    apply(frame.event, true, opened);
    if (opened && opened.kind === "history") showUnlocked(frame.event.group.group);
    keepLive(frame.event);
  } else if (frame.caughtUp) {
    setConnState("");
  } else if (frame.presence) {
    state.presence.set(frame.presence.phone, frame.presence);
    renderHeader();
  } else if (frame.typingUpdate) {
    const t = frame.typingUpdate;
    const composing = t.state === "TYPING_STATE_COMPOSING" || t.state === "TYPING_STATE_RECORDING";
    if (composing) state.typing.set(t.fromPhone, Date.now() + Number(t.expiresInMs || 10000));
    else state.typing.delete(t.fromPhone);
    renderHeader();
  }
}

/// Keeps live events here, a batch per transaction, and acknowledges them
/// once they are kept (the server's log has them either way: an event not
/// kept when the tab closes comes again on the next connection).
function keepLive(event) {
  state.arrived.push(event);
  if (state.ackTimer) return;
  state.ackTimer = setTimeout(async () => {
    const batch = state.arrived;
    state.arrived = [];
    // What the encryption opened is kept with the events, before the ack.
    const crypto = state.crypto && state.crypto.dirty ? state.crypto : null;
    const kept = crypto ? crypto.snapshot() : { meta: {}, drop: [] };
    if (state.local) await state.local.putEvents(batch, kept.meta, kept.drop).catch(() => crypto && crypto.unsaved());
    state.ackTimer = null;
    const upTo = Math.max(...batch.map((e) => Number(e.seq)));
    if (state.session) state.session.notify({ ack: { upToSeq: String(upTo) } });
    if (state.arrived.length) keepLive(state.arrived.pop());
  }, 30);
}

// ---------------------------------------------------------------- events

function apply(event, live, opened = null) {
  const seq = Number(event.seq);
  if (state.seen.has(seq) && !opened) return;
  state.seen.add(seq);
  if (event.message) applyMessage(event.message, seq, live);
  else if (event.receipt) {
    const r = event.receipt;
    const c = marksOf(r);
    const up = Number(r.upToSeq || 0);
    if (r.kind === "RECEIPT_KIND_READ") c.read = Math.max(c.read, up);
    c.delivered = Math.max(c.delivered, up);
  } else if (event.readSync) {
    const r = event.readSync;
    const c = marksOf(r);
    c.readByMe = Math.max(c.readByMe, Number(r.upToSeq || 0));
  } else if (event.group) applyGroup(event.group, seq, live, opened || (state.crypto && event.group.message ? recallPost(event) : null));
  else if (event.blockChange) applyBlock(event.blockChange, seq);
  else if (event.contactName) {
    const n = event.contactName;
    if (n.name) state.names.set(n.peerPhone, n.name);
    else state.names.delete(n.peerPhone);
  }
  else if (event.deviceChange) {
    if (panelShows === "devices") showDevices({ refresh: true });
    // A device linked or removed: this browser carries it into the
    // encrypted conversations (as any device of the account may).
    if (live && state.crypto) {
      const session = state.session;
      state.crypto.noteDeviceChange(event.deviceChange)
        .then(() => session && maintainCrypto(session))
        .catch((err) => { if (!(err instanceof Refused && err.code === "CLOSED")) say(explain(err)); });
    }
  }
  if (live) renderAll();
}

function addMessage(c, m) {
  // A confirmed copy of something this window sent replaces its placeholder.
  if (m.mine && m.clientId) {
    for (const [k, old] of c.messages) {
      if (old.local && old.clientId === m.clientId) c.messages.delete(k);
    }
  }
  c.messages.set(m.id, m);
  c.lastAt = Math.max(c.lastAt, m.at);
}

/// `order` is the entry's place in this account's log: the one order in
/// which both sides of a 1:1 chat (whose message ids count in two
/// different sequences) are shown.
function applyMessage(m, order, live) {
  const mine = m.id.sender === state.me.accountId;
  const phone = mine ? m.toPhone : m.fromPhone;
  const c = chat(peerKey(phone), mine ? { peer: m.to } : { peer: m.id.sender });
  if (live && !mine) state.typing.delete(phone); // the message they were typing
  const shown = described(`${m.id.sender}:${m.id.seq}`, m.id.sender, payloadText(m.payload), m, mine, m.fromPhone);
  addMessage(c, {
    id: `m:${m.id.seq}:${mine ? "out" : "in"}`, seq: Number(m.id.seq), order, mine, from: m.fromPhone,
    at: Number(m.sentAtMs), clientId: m.clientId, ...shown,
  });
  if (shown.deletes) scrub(c, shown.deletes);
  if (live && !mine && !shown.quiet) {
    maybeMarkRead(c);
    notifyPage(c, m.fromPhone, shown.text);
  }
}

/// A block or unblock from one of this account's devices: a line in the
/// conversation, and the block list (which the server keeps too).
function applyBlock(b, order) {
  if (b.blocked) state.blocked.add(b.peerPhone);
  else state.blocked.delete(b.peerPhone);
  const c = chat(peerKey(b.peerPhone), { peer: b.peer });
  const text = b.blocked ? `You blocked ${b.peerPhone}` : `You unblocked ${b.peerPhone}`;
  addMessage(c, { id: `b:${order}`, seq: 0, order, system: true, text, at: Number(b.atMs) || c.lastAt || Date.now() });
}

/// The block list as the server has it (the log's block events may be
/// older than the history held here).
async function refreshBlocked(session) {
  const r = await session.request({ listBlocked: {} });
  state.blocked = new Set((r.blockedList.accounts || []).map((a) => a.phone));
}

/// What a chat is called: the name given to its person, else its title
/// (their number, or the group's subject).
function titleOf(c) {
  const phone = peerPhoneOf(c);
  const name = phone && state.names.get(phone);
  if (name) return `${name} (${phone})`;
  const profile = phone && state.profiles.get(phone);
  return profile && profile.visible && profile.name ? `~${profile.name} (${phone})` : c.title;
}

/// The names this account gave its contacts, as the server has them.
async function refreshNames(session) {
  const r = await session.request({ listContactNames: {} });
  state.names = new Map((r.contactNames.contacts || []).map((c) => [c.phone, c.name]));
}

/// The other person's number of a 1:1 chat (plain or encrypted), else null.
function peerPhoneOf(c) {
  if (!c) return null;
  return c.kind === "peer" ? c.key.slice(2) : null;
}

function systemLine(g) {
  const who = g.by === state.me.accountId ? "You" : g.by === g.group ? "Skylark" : g.byPhone;
  const them = (m) => (m.account === state.me.accountId ? "you" : m.phone);
  if (g.created) return `${who} created "${g.created.subject}"`;
  if (g.added) return `${who} added ${g.added.members.map(them).join(", ")}`;
  if (g.removed) return `${who} removed ${them(g.removed)}`;
  if (g.left) return `${who} left`;
  if (g.promoted) return g.by === g.group ? `${them(g.promoted)} is now an admin` : `${who} made ${them(g.promoted)} an admin`;
  if (g.demoted) return `${who} made ${them(g.demoted)} a plain member`;
  if (g.subject !== undefined) return `${who} changed the subject to "${g.subject}"`;
  if (g.adminOnly !== undefined) return g.adminOnly ? `${who} let only admins post` : `${who} let everyone post`;
  return null;
}

/// What this device made of an encrypted post it read before (history, or
/// the copy kept here); null for anything else.
function recallPost(event) {
  try {
    return state.crypto.recall(event);
  } catch {
    return null;
  }
}

/// Another device of this account gave this one a conversation's history:
/// the posts of `group` shown as not readable here are shown again, with
/// their words where the history has them.
function showUnlocked(group) {
  const locked = state.locked.get(group);
  if (!locked) return;
  for (const { g, order } of [...locked.values()]) {
    const opened = recallPost({ group: g });
    if (opened && opened.kind === "message") applyGroup(g, order, false, opened);
  }
  renderAll();
}

/// The words of a group post: decrypted (`opened`, from e2ee.js) when it
/// is encrypted; null for a handshake (keys changing: nothing to show).
function postText(g, opened) {
  let kind = null;
  try {
    kind = mlsKind(payloadBytes(g.message.payload));
  } catch {
    kind = null;
  }
  if (!kind) return payloadText(g.message.payload);
  if (kind === "handshake" || (opened && opened.kind !== "message" && opened.kind !== "failed")) return null;
  if (!opened) return LOCKED;
  if (opened.kind === "failed") return `An end-to-end encrypted message this browser could not open: ${opened.reason}`;
  return decoder.decode(payloadBytes(opened.plaintext));
}

function applyGroup(g, order, live, opened = null) {
  const direct = g.created && g.created.direct && (g.created.members || []).find((m) => m.account !== state.me.accountId);
  if (direct) rememberDirect(g.group, direct);
  const c = groupChat(g.group);
  const at = Number(g.atMs);
  if (g.message) {
    if (opened && opened.kind === "devicesChanged") {
      const text = "The devices in this conversation changed: its safety number changed with them.";
      addMessage(c, { id: `g:${g.groupSeq}`, seq: Number(g.groupSeq), order, system: true, text, at });
      return;
    }
    if (opened) c.locked = encryptsFor(c.direct || c.group); // keys may have arrived
    const text = postText(g, opened);
    if (text === null) return; // encryption keys changing: nothing to show
    const locked = state.locked.get(g.group) || new Map();
    if (text === LOCKED) state.locked.set(g.group, locked.set(g.groupSeq, { g, order }));
    else locked.delete(g.groupSeq);
    const mine = g.by === state.me.accountId;
    if (live && !mine) state.typing.delete(g.byPhone); // the message they were typing
    const shown = described(`${g.group}:${g.groupSeq}`, g.group, text, g.message, mine, g.byPhone);
    // A post this browser cannot read is shown as such but not counted as
    // unread: it may be a reaction or an edit, which the devices that read
    // it do not count either.
    addMessage(c, {
      id: `g:${g.groupSeq}`, seq: Number(g.groupSeq), order, mine, from: g.byPhone,
      at, clientId: g.message.clientId, ...shown, locked: text === LOCKED,
    });
    if (shown.deletes) scrub(c, shown.deletes);
    if (live && !mine && !shown.quiet) {
      maybeMarkRead(c);
      notifyPage(c, c.direct ? g.byPhone : `${g.byPhone} in ${c.title}`, shown.text);
    }
    return;
  }
  if (c.direct) return; // a 1:1 conversation's group: no roster to show
  if (g.created) c.title = g.created.subject;
  if (g.subject !== undefined) c.title = g.subject;
  const text = systemLine(g);
  if (text) addMessage(c, { id: `g:${g.groupSeq}`, seq: Number(g.groupSeq), order, system: true, text, at });
  // The roster changed: fetch it again (refused once we are out of the group).
  if (live && state.session) {
    state.session.request({ getGroup: { group: g.group } })
      .then((r) => { rememberGroup(r.groupInfo); renderAll(); if (panelShows === `group:${g.group}`) showGroup(g.group); })
      .catch(() => { state.groups.delete(g.group); renderAll(); });
  }
}

function unread(c) {
  let n = 0;
  for (const m of c.messages.values()) {
    if (!m.mine && !m.system && !m.quiet && !m.locked && !gone(m) && m.seq > laneOf(c, m).readByMe) n++;
  }
  return n;
}

/// A disappearing message whose time has passed: no longer shown.
const gone = (m) => m.expiresAt && m.expiresAt <= Date.now();

/// A message deleted for everyone: its text goes from this browser too —
/// from what is shown and from the copy kept in IndexedDB.
function scrub(c, ref) {
  for (const m of c.messages.values()) {
    if (m.ref !== ref || m.purged) continue;
    Object.assign(m, { purged: true, text: "This message was deleted", content: { t: "text", text: "" } });
    if (state.local && Number.isFinite(m.order)) state.local.scrub(m.order).catch(() => {});
  }
}

function maybeMarkRead(c) {
  if (state.open !== c.key || document.visibilityState !== "visible" || !state.session) return;
  // Read markers for a peer are in the peer's sequence numbers; messages
  // from one peer carry that peer's seqs, so the newest covers the rest.
  // A 1:1 chat marks its group's posts apart (in the group's sequence).
  const lanes = [[c, c.kind === "group" ? c.group : c.peer]];
  if (c.direct) lanes.push([c.g, c.direct]);
  for (const [lane, peer] of lanes) {
    let newest = 0;
    for (const m of c.messages.values()) if (!m.mine && !m.system && laneOf(c, m) === lane) newest = Math.max(newest, m.seq);
    if (newest <= lane.readByMe || !peer) continue;
    lane.readByMe = newest;
    state.session.request({ markRead: { peer: String(peer), upToSeq: String(newest) } }).catch(() => {});
  }
}

// ---------------------------------------------------------------- sending

/// Sends `text` to chat `c`; `extra` makes it more than a plain text: a
/// `content` (reply, reaction, timer, forward, deletion) and the server's
/// `edits` / `deletes` (seq of one's own message). A message sent while the
/// chat's disappearing timer is on disappears too.
function send(c, text, extra = {}) {
  const content = extra.content || { t: "text", text };
  const timed = content.t === "timer" || extra.deletes ? 0 : fold(c).timer;
  const item = {
    key: c.key, clientId: clientId(), text, queuedAt: Date.now(), payload: encodeContent(content),
    edits: extra.edits || null, deletes: extra.deletes || null, expireAfterMs: timed, lane: extra.lane || null,
    attachments: extra.attachments || [],
  };
  // Kept before anything else: a tab closed now still sends it next time.
  if (state.local) state.local.queue(item).catch(() => {});
  enqueue(item);
  renderAll();
  flushOutbox();
}

/// Shows a queued message as waiting (🕓) and adds it to the outbox.
function enqueue(item) {
  const c = chat(item.key);
  const sender = c.kind === "group" ? c.group : item.lane === "g" || (!item.lane && c.direct) ? c.direct : state.me.accountId;
  const meta = { edits: item.edits, deletes: item.deletes, expiresAtMs: item.expireAfterMs ? item.queuedAt + item.expireAfterMs : 0 };
  const local = {
    id: `local:${item.clientId}`, local: true, mine: true, at: item.queuedAt,
    clientId: item.clientId, seq: Infinity, order: Infinity,
    ...described(null, sender, item.payload ? payloadText(payloadOf(item.payload)) : item.text, meta, true, null),
  };
  addMessage(c, local);
  state.outbox.push({ ...item, local });
}

/// Keeps this device's own 1:1 message as its account's log has it. The
/// server does not send a message back to the device that sent it (the ack
/// is its copy, and the ack's seq is the entry's place in the log), so the
/// entry is made here from the request and the ack, for the next reload.
function keepSent(c, body, ack) {
  if (!state.local) return;
  const message = {
    id: ack.id, to: c.peer ? String(c.peer) : undefined, toPhone: body.to, fromPhone: state.me.phone,
    senderDevice: String(state.me.deviceId), clientId: body.clientId, sentAtMs: ack.sentAtMs, payload: body.payload,
    edits: body.edits, deletes: body.deletes,
    expiresAtMs: body.expireAfterMs ? String(Number(ack.sentAtMs) + Number(body.expireAfterMs)) : undefined,
  };
  state.local.putEvents([{ seq: ack.id.seq, message }]).catch(() => {});
}

let flushing = false;
/// Where a message of chat `c` goes: its group for a group's chat; for a
/// 1:1 chat, the conversation's group (end-to-end encrypted) when every
/// device of both accounts can encrypt — started here on the first
/// message — else null: to the person, unencrypted. An edit or deletion
/// goes where the message it changes went (`item.lane`). Throws when
/// starting the encryption failed for now (the message waits: it is never
/// sent unencrypted because of a lost connection).
async function destination(c, item) {
  if (c.kind === "group") return c.group;
  if (item.lane === "p") return null;
  if (item.lane === "g") return c.direct || null;
  if (c.direct && encryptsFor(c.direct)) return c.direct;
  if (!state.crypto) return null;
  try {
    const info = await state.crypto.startDirect(state.session, c.key.slice(2));
    if (info) rememberGroup(info);
    return info ? String(info.id) : null;
  } catch (err) {
    // No such account, or one that may not be written to: the plain send
    // is refused in words.
    if (err instanceof Refused && ["ERROR_CODE_FORBIDDEN", "ERROR_CODE_UNKNOWN_RECIPIENT"].includes(err.code)) return null;
    throw err;
  }
}

async function flushOutbox() {
  if (flushing) return;
  flushing = true;
  try {
    while (state.outbox.length && state.session) {
      const item = state.outbox[0];
      const c = state.chats.get(item.key);
      const text = item.payload ?? item.text; // queued by an older page: plain text
      let group;
      try {
        group = await destination(c, item);
      } catch (err) {
        if (!(err instanceof Refused && ["CLOSED", "ERROR_CODE_UNAVAILABLE"].includes(err.code))) say(explain(err));
        break; // tried again with the next message or connection
      }
      if (!state.session) break;
      const body = group
        ? { clientId: item.clientId, group: String(group), payload: payloadOf(text) }
        : { clientId: item.clientId, to: c.key.slice(2), payload: payloadOf(text) };
      if (item.edits) body.edits = String(item.edits);
      if (item.deletes) body.deletes = String(item.deletes);
      if (item.expireAfterMs) body.expireAfterMs = String(item.expireAfterMs);
      if (item.attachments && item.attachments.length) body.attachments = item.attachments;
      try {
        // Encrypted: the same ciphertext when it is sent again (a new one
        // would spend another key of the sender's chain for nothing), made
        // again when a commit ended the epoch it was made in.
        const reply = group && encryptsFor(group)
          ? await state.crypto.sendSealed(state.session, item, group, new TextEncoder().encode(text), body)
          : await state.session.request({ send: body });
        const ack = reply.sendAck;
        const id = group ? `g:${ack.id.seq}` : `m:${ack.id.seq}:out`;
        if (c.messages.has(item.local.id)) {
          c.messages.delete(item.local.id);
          if (!c.messages.has(id)) {
            // A 1:1 message's id is its place in this account's log; a group
            // post gets its place when its copy arrives (it replaces this).
            const order = group ? Infinity : Number(ack.id.seq);
            const ref = `${ack.id.sender}:${ack.id.seq}`;
            c.messages.set(id, { ...item.local, local: false, id, ref, seq: Number(ack.id.seq), order, at: Number(ack.sentAtMs) });
          }
        }
        if (!group) keepSent(c, body, ack);
        state.outbox.shift();
        if (state.local) state.local.unqueue(item.clientId).catch(() => {});
      } catch (err) {
        if (err instanceof Refused && err.code !== "CLOSED" && err.code !== "ERROR_CODE_UNAVAILABLE") {
          // Refused for good: say why and keep the text visible, marked.
          item.local.failed = explain(err);
          state.outbox.shift();
          if (state.local) state.local.unqueue(item.clientId).catch(() => {});
          say(explain(err));
        } else {
          // Not connected (the next connection resends with the same client
          // id), or a change to the group's keys is on its way (sent once
          // it is through).
          break;
        }
      }
      renderAll();
    }
  } finally {
    flushing = false;
  }
}

// ---------------------------------------------------------------- attachments
// A file is encrypted here (AES-256-GCM with a fresh key; the SHA-256 of
// the ciphertext is its digest), uploaded with tus 1.0 in chunks (resuming
// from the server's offset when a chunk fails), and sent as a "file"
// content: blob id, key, digest, name, type, a small preview. Receiving
// reverses it; the digest is checked before anything is decrypted. The
// server stores only ciphertext. The CLI (skylark_client::media) does the
// same, so files go both ways.

const UPLOAD_CHUNK = 4 << 20;
/// Images and voice notes up to this size are fetched as soon as they are shown.
const AUTO_FETCH_BYTES = 8 << 20;
const toB64 = (bytes) => { let s = ""; for (const b of bytes) s += String.fromCharCode(b); return btoa(s); };
const fromB64 = (text) => Uint8Array.from(atob(text || ""), (ch) => ch.charCodeAt(0));
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function sizeWords(n) {
  if (n < 1000) return `${n} bytes`;
  if (n < 1e6) return `${(n / 1e3).toFixed(1)} kB`;
  if (n < 1e9) return `${(n / 1e6).toFixed(1)} MB`;
  return `${(n / 1e9).toFixed(2)} GB`;
}
function lengthWords(ms) {
  const s = Math.ceil((Number(ms) || 0) / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}
/// A file message in words (the chat list, notifications, quotes).
function fileWords(content) {
  const f = content.file;
  const what = f.voice ? `Voice note (${lengthWords(f.ms)})` : `${f.name} (${sizeWords(Number(f.size) || 0)})`;
  return content.text ? `${what}: ${content.text}` : what;
}
/// Only these types are given to the page's elements; anything else is
/// offered for saving as opaque bytes (a received file never runs here).
function safeMime(mime) {
  return /^(image\/(jpeg|png|gif|webp)|audio\/[a-z0-9.+-]+|video\/(mp4|webm))$/.test(mime || "") ? mime : "application/octet-stream";
}
const safeThumb = (url) => (typeof url === "string" && /^data:image\/(jpeg|png|webp);base64,[A-Za-z0-9+/=]+$/.test(url) ? url : null);

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}
async function httpError(r) {
  let message = `The server answered ${r.status}.`;
  try { message = sentence((await r.json()).message) || message; } catch { /* no JSON body */ }
  return new HttpError(r.status, message);
}

/// Where files go and come from: the node this page's connection is on,
/// which in a cluster need not be the one that served the page (that one
/// may be gone); the nodes allow each other's pages (CORS).
function mediaBase() {
  return state.lastHost && state.lastHost !== location.host ? `${location.protocol}//${state.lastHost}` : "";
}

let mediaToken = null;
/// A token for the attachments' HTTP endpoints, asked for over the
/// connection (again for each connection: it names this device).
async function mediaAuth() {
  const session = state.session;
  if (!session) throw new Error("You are offline; try again once connected.");
  if (!mediaToken || mediaToken.session !== session || mediaToken.expiresAt - 60000 < Date.now()) {
    const r = (await session.request({ getMediaToken: {} })).mediaToken;
    mediaToken = { session, token: r.token, expiresAt: Number(r.expiresAtMs), max: Number(r.maxUploadBytes) };
  }
  return mediaToken;
}

async function sealFile(bytes) {
  if (!crypto.subtle) throw new Error("Attachments need a secure connection (https, or this computer's own address).");
  const key = crypto.getRandomValues(new Uint8Array(32));
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const k = await crypto.subtle.importKey("raw", key, "AES-GCM", false, ["encrypt"]);
  const ct = new Uint8Array(await crypto.subtle.encrypt({ name: "AES-GCM", iv }, k, bytes));
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", ct));
  return { ct, key: toB64(key), iv: toB64(iv), sha256: toB64(digest) };
}

async function openFile(file, ct) {
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", ct));
  if (toB64(digest) !== file.sha256) throw new Error("The downloaded file does not match its digest: it was altered or damaged on the way. Nothing was saved.");
  try {
    const k = await crypto.subtle.importKey("raw", fromB64(file.key), "AES-GCM", false, ["decrypt"]);
    return new Uint8Array(await crypto.subtle.decrypt({ name: "AES-GCM", iv: fromB64(file.iv) }, k, ct));
  } catch {
    throw new Error("The file's key does not open it: the message or the file is damaged.");
  }
}

/// Uploads `bytes` (tus: create, then PATCH chunk by chunk); returns the blob id.
/// Started faster than the server's limit of uploads per account allows (a
/// large group's commits, many files at once), it waits as long as the
/// server says, when that is a few seconds, up to UPLOAD_WAITS times.
async function uploadBytes(bytes, onProgress) {
  const auth = { authorization: `Bearer ${(await mediaAuth()).token}`, "tus-resumable": "1.0.0" };
  // An unfinished upload is kept by the node that started it.
  const base = mediaBase();
  let created;
  for (let waits = 0; ; waits++) {
    created = await fetch(`${base}/v1/uploads`, { method: "POST", headers: { ...auth, "upload-length": String(bytes.length) } });
    if (created.status !== 429 || waits >= UPLOAD_WAITS) break;
    // Not the daily quota: that one is said at once.
    const { error } = await created.clone().json().catch(() => ({}));
    const header = created.headers.get("retry-after");
    const wait = header === null ? NaN : Number(header);
    if (error !== "rate_limited" || !(wait <= UPLOAD_WAIT_SECS)) break;
    await sleep(Math.max(wait, 1) * 1000);
  }
  if (created.status !== 201) throw await httpError(created);
  const id = created.headers.get("location").split("/").pop();
  let offset = 0;
  let failures = 0;
  onProgress(0, bytes.length);
  while (offset < bytes.length) {
    try {
      const r = await fetch(`${base}/v1/uploads/${id}`, {
        method: "PATCH",
        headers: { ...auth, "upload-offset": String(offset), "content-type": "application/offset+octet-stream" },
        body: bytes.subarray(offset, Math.min(offset + UPLOAD_CHUNK, bytes.length)),
      });
      if (r.status !== 204) throw await httpError(r);
      offset = Number(r.headers.get("upload-offset"));
      failures = 0;
      onProgress(offset, bytes.length);
    } catch (err) {
      // A refusal stands; a broken connection (or a conflict) resumes from the server's offset.
      if (err instanceof HttpError && err.status !== 409 && err.status < 500) throw err;
      if (++failures > 5) throw err;
      await sleep(200 << failures);
      const head = await fetch(`${base}/v1/uploads/${id}`, { method: "HEAD", headers: auth }).catch(() => null);
      if (head && head.ok) offset = Number(head.headers.get("upload-offset"));
    }
  }
  return id;
}

/// Fetched files by blob id: { url } once decrypted, { progress } while
/// coming, { error } when it failed.
const files = new Map();

async function fetchFile(file) {
  const known = files.get(file.id);
  if (known && (known.url || known.progress !== undefined)) return;
  files.set(file.id, { progress: 0 });
  renderMessages();
  try {
    const r = await fetch(`${mediaBase()}/v1/blobs/${file.id}`, { headers: { authorization: `Bearer ${(await mediaAuth()).token}` } });
    if (!r.ok) throw await httpError(r);
    const total = Number(r.headers.get("content-length")) || 0;
    const reader = r.body.getReader();
    const parts = [];
    let got = 0;
    let shown = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      parts.push(value);
      got += value.length;
      const progress = total ? Math.floor((got * 100) / total) : 0;
      if (progress !== shown) {
        shown = progress;
        files.set(file.id, { progress });
        renderMessages();
      }
    }
    const ct = new Uint8Array(got);
    let at = 0;
    for (const p of parts) { ct.set(p, at); at += p.length; }
    const plain = await openFile(file, ct);
    files.set(file.id, { url: URL.createObjectURL(new Blob([plain], { type: safeMime(file.mime) })) });
  } catch (err) {
    files.set(file.id, { error: err.message || String(err) });
  }
  renderMessages();
}

/// A small JPEG preview of an image, carried inside the message.
async function thumbnail(blob) {
  try {
    const bitmap = await createImageBitmap(blob);
    const scale = Math.min(1, 160 / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const url = canvas.toDataURL("image/jpeg", 0.6);
    return url.length < 24000 ? url : null;
  } catch {
    return null; // not an image this browser can read: no preview
  }
}

let uploads = 0;
/// Encrypts, uploads and sends one file (or a recorded voice note) to chat `c`.
async function sendFile(c, blob, { name, voice = false, ms = null, text = "" } = {}) {
  const mime = (blob.type || "application/octet-stream").split(";")[0];
  name = (name || blob.name || "file").split(/[\\/]/).pop();
  const placeholder = {
    id: `up:${++uploads}`, local: true, mine: true, uploading: true, at: Date.now(), seq: Infinity, order: Infinity,
    text: `Uploading ${name}…`, content: { t: "text", text: `Uploading ${name}…` },
  };
  try {
    const { max } = await mediaAuth();
    if (blob.size > max) throw new Error(`${name} is ${sizeWords(blob.size)}; this server takes files up to ${sizeWords(max)}.`);
    addMessage(c, placeholder);
    renderMessages();
    const bytes = new Uint8Array(await blob.arrayBuffer());
    const thumb = mime.startsWith("image/") ? await thumbnail(blob) : null;
    const sealed = await sealFile(bytes);
    const id = await uploadBytes(sealed.ct, (done, total) => {
      placeholder.text = placeholder.content.text = `Uploading ${name}… ${total ? Math.floor((done * 100) / total) : 100}%`;
      renderMessages();
    });
    // Our own copy shows at once, without fetching it back.
    files.set(id, { url: URL.createObjectURL(new Blob([bytes], { type: safeMime(mime) })) });
    const file = { id, key: sealed.key, iv: sealed.iv, sha256: sealed.sha256, size: bytes.length, name, mime };
    if (thumb) file.thumb = thumb;
    if (voice) { file.voice = true; file.ms = Math.round(ms || 0); }
    const content = { t: "file", file };
    if (text) content.text = text;
    send(c, text, { content, attachments: [id] });
  } catch (err) {
    say(err instanceof Refused ? explain(err) : sentence(err.message || String(err)));
  } finally {
    c.messages.delete(placeholder.id);
    renderAll();
  }
}

function sendFiles(list) {
  const c = state.chats.get(state.open);
  if (!c || $("composer").hidden) return;
  for (const f of list) sendFile(c, f);
}

$("attach").append(icon("clip"));
$("record").append(icon("mic"));
$("attach").addEventListener("click", () => $("file-input").click());
$("file-input").addEventListener("change", () => {
  sendFiles([...$("file-input").files]);
  $("file-input").value = "";
});
$("text").addEventListener("paste", (e) => {
  const pasted = [...(e.clipboardData ? e.clipboardData.files : [])];
  if (pasted.length) {
    e.preventDefault();
    sendFiles(pasted);
  }
});
$("conversation").addEventListener("dragover", (e) => {
  if (e.dataTransfer && [...e.dataTransfer.types].includes("Files")) e.preventDefault();
});
$("conversation").addEventListener("drop", (e) => {
  if (!e.dataTransfer || !e.dataTransfer.files.length) return;
  e.preventDefault();
  sendFiles([...e.dataTransfer.files]);
});

/// Voice notes: press to record, press again to send.
let recording = null;
$("record").addEventListener("click", async () => {
  const c = state.chats.get(state.open);
  if (!c) return;
  if (recording) return recording.recorder.stop();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch {
    return say("The browser did not allow the microphone; allow it for this site to record voice notes.");
  }
  const recorder = new MediaRecorder(stream);
  const chunks = [];
  recording = { recorder, started: Date.now() };
  recorder.addEventListener("dataavailable", (e) => { if (e.data.size) chunks.push(e.data); });
  recorder.addEventListener("stop", () => {
    const ms = Date.now() - recording.started;
    recording = null;
    stream.getTracks().forEach((t) => t.stop());
    $("record").replaceChildren(icon("mic"));
    $("record").setAttribute("aria-pressed", "false");
    $("record").setAttribute("aria-label", "Record a voice note");
    const type = (recorder.mimeType || "audio/webm").split(";")[0];
    const ext = type.includes("ogg") ? "ogg" : type.includes("mp4") ? "m4a" : "webm";
    if (chunks.length) sendFile(c, new Blob(chunks, { type }), { name: `voice-note.${ext}`, voice: true, ms });
  });
  recorder.start();
  $("record").replaceChildren(icon("stop"));
  $("record").setAttribute("aria-pressed", "true");
  $("record").setAttribute("aria-label", "Stop and send the voice note");
});

/// One audio player per message, kept across redraws so playing goes on.
const players = new Map();
function player(where, url, label) {
  let el = players.get(where);
  if (!el || el.src !== url) {
    el = h("audio", { controls: "", src: url, "aria-label": label });
    players.set(where, el);
  }
  return el;
}

/// How a file message (`where`: its id) shows: a picture, a player, or a file to save.
function attachmentView(f, where) {
  const got = files.get(f.id) || {};
  const mime = safeMime(f.mime);
  const auto = Number(f.size) <= AUTO_FETCH_BYTES && (f.voice || mime.startsWith("image/") || mime.startsWith("audio/"));
  if (auto && !files.has(f.id) && state.session) queueMicrotask(() => fetchFile(f));
  const status = got.error ? h("span", { class: "file-error", role: "alert" }, got.error)
    : got.progress !== undefined ? h("span", { class: "progress" }, `Downloading… ${got.progress}%`) : null;
  if (f.voice || mime.startsWith("audio/")) {
    return h("div", { class: "attachment voice" },
      got.url ? player(where, got.url, f.voice ? `Voice note, ${lengthWords(f.ms)}` : f.name)
        : h("button", { type: "button", class: "secondary", onclick: () => fetchFile(f) }, icon("mic"), ` ${f.voice ? `Voice note (${lengthWords(f.ms)})` : f.name}`),
      status);
  }
  if (mime.startsWith("image/")) {
    const src = got.url || safeThumb(f.thumb);
    return h("figure", { class: "attachment image" },
      src ? h("img", { src, alt: f.name, class: got.url ? "full" : "thumb" })
        : h("button", { type: "button", class: "secondary", onclick: () => fetchFile(f) }, icon("file"), ` ${f.name} (${sizeWords(Number(f.size) || 0)})`),
      status);
  }
  return h("div", { class: "attachment file" },
    icon("file"), h("span", { class: "file-name" }, `${f.name} (${sizeWords(Number(f.size) || 0)})`), " ",
    got.url ? h("a", { href: got.url, download: f.name, class: "save" }, "Save")
      : h("button", { type: "button", class: "secondary", onclick: () => fetchFile(f) }, "Download"),
    status);
}

/// A message's status and the words that say it.
function tickOf(c, m) {
  if (m.local) return m.failed ? ["failed", m.failed] : ["pending", "waiting to be sent"];
  const lane = laneOf(c, m);
  if (m.seq <= lane.read) return ["read", "read"];
  if (m.seq <= lane.delivered) return ["delivered", "delivered"];
  return ["sent", "sent"];
}

// ---------------------------------------------------------------- notifications
//
// While this page is open but not in view, a message raises a notification
// with its sender and text (unless the chat is muted). When no page is
// connected, the server pushes a content-free wake-up to the browser's push
// subscription and the service worker (sw.js) says "You have new messages".

/// The service worker's registration (registered once per page), or null.
let workerReady = null;
function worker() {
  workerReady ||= (async () => {
    if (!("serviceWorker" in navigator)) return null;
    try {
      await navigator.serviceWorker.register("/sw.js");
      return await navigator.serviceWorker.ready;
    } catch {
      return null;
    }
  })();
  return workerReady;
}

function renderOffer() {
  const offer = window.Notification && Notification.permission === "default";
  $("notify-offer").hidden = !offer;
}

$("notify-on").addEventListener("click", async () => {
  const answer = await Notification.requestPermission();
  renderOffer();
  if (answer !== "granted") return say("Notifications are blocked for this site; allow them in the browser's site settings.");
  try {
    if (state.session) await startPush(state.session);
    say("Notifications are on.", "info");
  } catch (err) {
    say(`Notifications show while this page is open; with it closed, this browser cannot be woken (${explain(err)}).`, "info");
  }
});

/// Subscribes this browser to Web Push with the server's key and tells the
/// server where to wake it.
async function startPush(session) {
  if (state.pushOn) return;
  const registration = await worker();
  if (!registration || !registration.pushManager) throw new Error("this browser has no push service");
  const { public_key: key } = await api.vapid();
  const applicationServerKey = fromBase64(key.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(key.length / 4) * 4, "="));
  let subscription = await registration.pushManager.getSubscription();
  if (!subscription) subscription = await registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey });
  await session.request({
    registerPush: {
      webPush: {
        endpoint: subscription.endpoint,
        p256dh: toBase64(subscription.getKey("p256dh")),
        auth: toBase64(subscription.getKey("auth")),
      },
    },
  });
  state.pushOn = true;
}

/// A notification for a message that arrived while the page is out of view.
async function notifyPage(c, title, body) {
  if (document.visibilityState === "visible" || state.muted.has(c.key)) return;
  if (!window.Notification || Notification.permission !== "granted") return;
  const registration = await worker();
  const options = { body, tag: c.key, renotify: true, icon: "/favicon.svg", data: { chat: c.key } };
  if (registration) await registration.showNotification(title, options);
  else new Notification(title, options);
}

if ("serviceWorker" in navigator) {
  navigator.serviceWorker.addEventListener("message", (e) => {
    if (e.data && e.data.open && state.chats.has(e.data.open)) openChat(e.data.open);
  });
}

/// Blocks or unblocks the other person of the open 1:1 chat.
async function setBlocked(phone, blocked) {
  if (!state.session) return say("Not connected; try again once this browser is back online.");
  await guarded(async () => {
    await state.session.request({ block: { phone, blocked } });
    if (blocked) state.blocked.add(phone);
    else state.blocked.delete(phone);
    if ($("panel").open) $("panel").close();
    say(blocked ? `You blocked ${phone}.` : `You unblocked ${phone}.`, "info");
  });
  renderAll();
}

$("block").addEventListener("click", () => {
  const phone = peerPhoneOf(state.chats.get(state.open));
  if (!phone) return;
  if (state.blocked.has(phone)) return setBlocked(phone, false);
  panel("block", h("h2", {}, `Block ${phone}?`),
    h("p", {}, "Their messages will not reach you (they see one tick), they will not see when you are online "
      + "or typing, and they cannot add you to groups. You can unblock them at any time."),
    h("p", {}, h("button", { type: "button", class: "danger", onclick: () => setBlocked(phone, true) }, "Block")));
});

$("name-contact").addEventListener("click", () => {
  const phone = peerPhoneOf(state.chats.get(state.open));
  if (!phone) return;
  const name = h("input", { value: state.names.get(phone) || "", maxlength: "64", "aria-label": "Contact name", placeholder: "Name" });
  panel("name-contact", h("h2", {}, `Name ${phone}`),
    h("p", { class: "muted" }, "Shown instead of the number on all your devices. Leave it empty to show the number."),
    h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        guarded(async () => {
          if (!state.session) return say("Not connected; try again once this browser is back online.");
          const value = name.value.trim();
          await state.session.request({ setContactName: { phone, name: value } });
          if (value) state.names.set(phone, value);
          else state.names.delete(phone);
          $("panel").close();
          renderAll();
        });
      },
    }, name, h("button", { type: "submit" }, "Save")));
  name.focus();
});

$("report").addEventListener("click", () => {
  const c = state.chats.get(state.open);
  if (!c) return;
  const phone = peerPhoneOf(c);
  const what = phone || `"${c.title}"`;
  const send = (block) => guarded(async () => {
    if (!state.session) return say("Not connected; report once this browser is back online.");
    const body = phone ? { phone, block } : { group: c.group };
    await state.session.request({ report: body });
    if (block) state.blocked.add(phone);
    if ($("panel").open) $("panel").close();
    say(block ? `Reported and blocked ${phone}.` : `Reported ${what} to this server's operator.`, "info");
    renderAll();
  });
  panel("report", h("h2", {}, `Report ${what}?`),
    h("p", {}, "The server's operator learns who is reported and the last few messages' times and sizes, "
      + "not their text."),
    h("p", {},
      h("button", { type: "button", onclick: () => send(false) }, "Report"),
      phone ? " " : null,
      phone ? h("button", { type: "button", class: "danger", onclick: () => send(true) }, "Report and block") : null));
});

/// The safety number of an encrypted 1:1 conversation, as `skylark verify`
/// shows it: both people compare it to know their messages are encrypted
/// for each other's devices and nobody else's.
$("verify").addEventListener("click", () => guarded(async () => {
  const c = state.chats.get(state.open);
  if (!c || !c.direct || !encryptsFor(c.direct)) return;
  const { number, mine, theirs } = state.crypto.safetyNumber(c.direct, c.peer);
  const words = number.split(" ");
  const lines = [];
  for (let i = 0; i < words.length; i += 4) lines.push(words.slice(i, i + 4).join(" "));
  const devices = (n) => (n === 1 ? "1 device" : `${n} devices`);
  panel("verify", h("h2", {}, `Safety number with ${titleOf(c)}`),
    h("pre", { class: "safety-number", "aria-label": "Safety number" }, lines.join("\n")),
    h("p", {}, `Compare it with the one ${c.key.slice(2)} sees (side by side, or read aloud on a call). If they match, `
      + `your messages are encrypted for your ${devices(mine)} and their ${devices(theirs)} and nobody else. `
      + "It changes when either of you links or removes a device."));
}));

$("mute").addEventListener("click", () => {
  const key = state.open;
  if (!key) return;
  if (state.muted.has(key)) state.muted.delete(key);
  else state.muted.add(key);
  keep([], { muted: [...state.muted] });
});

// ---------------------------------------------------------------- typing

let composingSent = 0;
let pauseTimer = null;
$("text").addEventListener("input", () => {
  const c = state.chats.get(state.open);
  if (!c || c.kind !== "peer" || !state.session) return;
  const now = Date.now();
  if (now - composingSent > 5000) {
    composingSent = now;
    state.session.notify({ typing: { to: c.key.slice(2), state: "TYPING_STATE_COMPOSING" } });
  }
  clearTimeout(pauseTimer);
  pauseTimer = setTimeout(() => {
    composingSent = 0;
    if (state.session) state.session.notify({ typing: { to: c.key.slice(2), state: "TYPING_STATE_PAUSED" } });
  }, 3000);
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const c = state.chats.get(state.open);
  const text = $("text").value.trim();
  if (!c || !text) return;
  $("text").value = "";
  composingSent = 0;
  clearTimeout(pauseTimer);
  const what = state.composing && state.composing.key === c.key ? state.composing : null;
  endCompose();
  if (what && what.reply) send(c, text, { content: { t: "text", text, reply: what.reply } });
  else if (what && what.edits) send(c, text, { edits: what.edits, lane: what.lane });
  else send(c, text);
});

// ---------------------------------------------------------------- rendering

function openChat(key) {
  state.open = key;
  $("app").classList.add("chat-open");
  $("banner").hidden = true; // a message about another screen
  const c = state.chats.get(key);
  c.window = WINDOW;
  maybeMarkRead(c);
  renderAll();
  $("text").focus();
}

$("back").addEventListener("click", () => {
  state.open = null;
  $("app").classList.remove("chat-open");
  renderAll();
});

function preview(c) {
  let last = null;
  for (const m of c.messages.values()) if (!gone(m) && (!last || m.at >= last.at)) last = m;
  if (!last) return "";
  return last.system ? last.text : `${last.mine ? "You: " : c.kind === "group" ? `${last.from}: ` : ""}${last.text}`;
}

/// The newest message of `c` whose text contains `query` (lower case).
function found(c, query) {
  let best = null;
  for (const m of c.messages.values()) {
    if (!m.system && m.text.toLowerCase().includes(query) && (!best || m.at >= best.at)) best = m;
  }
  return best;
}

function renderList() {
  const list = $("chat-list");
  const query = $("search").value.trim().toLowerCase();
  let total = 0;
  for (const c of state.chats.values()) total += unread(c);
  document.title = total ? `(${total}) Skylark` : "Skylark";
  // An encrypted 1:1 group with nothing to show (only key changes) is not a chat yet.
  // A 1:1 conversation's group alone (keys, no message yet) is not a chat yet.
  let chats = [...state.chats.values()].filter((c) => c.messages.size || !c.direct || state.open === c.key).sort((a, b) => b.lastAt - a.lastAt);
  const hits = new Map();
  if (query) {
    chats = chats.filter((c) => {
      const m = found(c, query);
      if (m) hits.set(c.key, m);
      return m || titleOf(c).toLowerCase().includes(query);
    });
  }
  list.replaceChildren(...chats.map((c) => {
    const n = unread(c);
    const hit = hits.get(c.key);
    return h("li", {
      class: `chat${state.open === c.key ? " open" : ""}`, "data-chat": c.key,
    }, h("button", { type: "button", class: "row", "aria-current": state.open === c.key ? "true" : null, onclick: () => openChat(c.key) },
      avatar(c),
      h("span", { class: "name" }, c.locked ? icon("lock", "end-to-end encrypted") : null, titleOf(c)),
      h("span", { class: "time" }, c.lastAt ? listTime(c.lastAt) : ""),
      h("span", { class: "preview" }, hit ? `${hit.mine ? "You: " : ""}${hit.text}` : preview(c)),
      n ? h("span", { class: `badge${state.muted.has(c.key) ? " muted" : ""}` }, String(n)) : h("span"),
      n ? h("span", { class: "sr-only" }, n === 1 ? " 1 unread message" : ` ${n} unread messages`) : null));
  }));
}

function renderHeader() {
  const c = state.chats.get(state.open);
  $("group-info").hidden = !c || c.kind !== "group" || !state.groups.has(c.group);
  $("mute").hidden = !c;
  $("timer").hidden = !c;
  $("verify").hidden = !c || !c.locked;
  if (c) {
    const t = fold(c).timer;
    $("timer").replaceChildren(...(t ? [icon("timer", "disappearing messages:"), ` ${timerWords(t)}`] : ["Timer"]));
  }
  const blockable = peerPhoneOf(c);
  $("block").hidden = !blockable;
  $("name-contact").hidden = !blockable;
  $("report").hidden = !c || (!blockable && c.kind !== "group");
  if (blockable) $("block").textContent = state.blocked.has(blockable) ? "Unblock" : "Block";
  if (c) {
    const muted = state.muted.has(c.key);
    $("mute").textContent = muted ? "Unmute" : "Mute";
    $("mute").setAttribute("aria-pressed", String(muted));
  }
  if (!c) {
    $("chat-title").textContent = "";
    $("chat-status").textContent = "";
    return;
  }
  $("chat-title").replaceChildren(c.locked ? icon("lock", "end-to-end encrypted") : "", titleOf(c));
  let status = "";
  if (c.kind === "group") {
    const info = state.groups.get(c.group);
    status = info ? `${info.members.length} members` : "you are not a member";
  } else {
    const phone = c.key.slice(2);
    const typing = state.typing.get(phone);
    const p = state.presence.get(phone);
    if (!state.connected) status = "";
    else if (typing && typing > Date.now()) status = "typing…";
    else if (p && p.visible && p.online) status = "online";
    else if (p && p.visible && Number(p.lastSeenMs)) status = `last seen ${whenSeen(p.lastSeenMs)}`;
    const profile = state.profiles.get(phone);
    if (!status && profile && profile.visible && profile.about) status = profile.about;
  }
  $("chat-status").textContent = status;
}

/// Draws the open conversation. `grown`: older messages were added above,
/// so the ones in view stay where they are.
function renderMessages(grown = false) {
  const c = state.chats.get(state.open);
  $("empty").hidden = !!c;
  const blocked = !!c && state.blocked.has(peerPhoneOf(c));
  $("composer").hidden = !c || blocked || (c.kind === "group" && !state.groups.has(c.group));
  $("blocked-note").hidden = !blocked;
  const box = $("messages");
  if (!c) return box.replaceChildren();
  const stick = box.scrollTop + box.clientHeight >= box.scrollHeight - 30;
  const [fromBottom, fromTop] = [box.scrollHeight - box.scrollTop, box.scrollTop];
  const folded = fold(c);
  // Reactions, edits and deletions show on the messages they change;
  // disappeared messages are gone.
  const all = [...c.messages.values()].filter((m) => !m.quiet && !gone(m)).sort((a, b) => a.order - b.order || a.at - b.at);
  const items = all.slice(-c.window);
  // Above the first message drawn: older ones here, or on the server.
  let top = null;
  if (items.length < all.length) top = h("li", { class: "older" }, "Scroll up for older messages");
  else if (state.log.lo !== 0) top = h("li", { class: "older" }, "Loading older messages…");
  else if (all.length) top = h("li", { class: "older" }, "No older messages");
  // A line with the day above the first message of each day.
  const drawn = [];
  let day = null;
  for (const m of items) {
    if (dayOf(m.at) !== day) {
      day = dayOf(m.at);
      drawn.push(h("li", { class: "day" }, dayName(m.at)));
    }
    drawn.push(drawMessage(c, m, folded));
  }
  box.replaceChildren(top || "", ...drawn);
  if (stick) box.scrollTop = box.scrollHeight;
  else box.scrollTop = grown ? box.scrollHeight - fromBottom : fromTop;
}

/// What a chat's reactions, edits, deletions and timer changes do to its
/// other messages, taken in log order: the newest reaction of each person
/// to each message, the newest edit of each, which were deleted, and the
/// chat's disappearing timer now.
function fold(c) {
  const out = { reactions: new Map(), edited: new Map(), deleted: new Set(), timer: 0 };
  // Only the messages that change others, in order (few, even in a long chat).
  const acts = [...c.messages.values()].filter((m) => m.quiet || m.timer || m.purged)
    .sort((a, b) => a.order - b.order || a.at - b.at);
  for (const m of acts) {
    if (!m.content) continue;
    if (m.deletes) out.deleted.add(m.deletes);
    else if (m.purged) continue;
    else if (m.edits && m.content.t === "text") out.edited.set(m.edits, m.content.text);
    else if (m.content.t === "react") {
      const who = m.mine ? "you" : m.from;
      const r = out.reactions.get(m.content.to) || new Map();
      if (m.content.emoji) r.set(who, m.content.emoji);
      else r.delete(who);
      out.reactions.set(m.content.to, r);
    } else if (m.timer) out.timer = Number(m.content.ms) || 0;
  }
  return out;
}

/// The sequence the server knows one's own message by (its log's, or the group's).
const ownSeq = (m) => Number(String(m.ref).split(":")[1]);
/// Which of a 1:1 chat's two sequences a message is in: "g" for its
/// group's posts, "p" for plain messages (null in a group's chat).
const laneName = (c, m) => (c.kind === "group" ? null : String(m.id).startsWith("g:") ? "g" : "p");

function drawMessage(c, m, folded) {
  if (m.system || m.timer) return h("li", { class: `system${m.timer ? " timer" : ""}` }, m.timer ? icon("timer") : null, m.text);
  const deleted = m.purged || (m.ref && folded.deleted.has(m.ref));
  const [status, mark] = m.mine ? tickOf(c, m) : [null, null];
  // Who has one of my group posts: asked of the server when wanted.
  const info = m.mine && c.kind === "group" && !m.local && !deleted
    ? h("button", { type: "button", class: "info", "aria-label": "Message info", title: "Message info", onclick: () => guarded(() => showInfo(c, m)) }, icon("info"))
    : null;
  const more = !m.local && m.ref && !deleted && m.text !== LOCKED
    ? h("button", { type: "button", class: "more", "aria-label": "Message actions", title: "Reply, react, forward…", onclick: () => showActions(c, m) }, "⋯")
    : null;
  const edited = m.ref && folded.edited.get(m.ref);
  const content = m.content || { t: "text", text: m.text };
  const isFile = !deleted && content.t === "file" && content.file;
  const text = deleted ? "This message was deleted" : edited ?? (content.t === "text" ? content.text : isFile ? content.text || "" : m.text);
  const reply = !deleted && content.reply
    ? h("blockquote", { class: "quote" }, h("span", { class: "sr-only" }, "Replying to: "), content.reply.quote)
    : null;
  const reactions = m.ref && !deleted ? [...(folded.reactions.get(m.ref) || new Map()).entries()] : [];
  const counted = new Map();
  for (const [, emoji] of reactions) counted.set(emoji, (counted.get(emoji) || 0) + 1);
  const who = reactions.map(([p, e]) => `${p === "you" ? "You" : state.names.get(p) || p} ${e}`).join(", ");
  return h("li", { class: `msg${m.mine ? " mine" : ""}${m.failed ? " failed" : ""}${deleted ? " deleted" : ""}`, "data-client-id": m.clientId, "data-ref": m.ref },
    !m.mine && c.kind === "group" ? h("span", { class: "from" }, m.from) : null,
    !deleted && content.fwd ? h("span", { class: "fwd" }, "Forwarded") : null,
    reply,
    isFile ? attachmentView(content.file, m.id) : null,
    isFile && !text ? null : h("span", { class: "text" }, deleted ? icon("deleted") : null, m.text === LOCKED ? icon("lock") : null, text),
    h("span", { class: "meta" }, edited && !deleted ? h("span", { class: "edited" }, "edited ") : null,
      m.expiresAt && !deleted ? h("span", { class: "timer", title: `Disappears ${whenSeen(m.expiresAt)}` }, icon("timer", "disappearing message"), " ") : null,
      clock(m.at), m.mine ? " " : "",
      m.mine ? h("span", { class: "tick", "data-status": status, title: mark }, icon(status === "pending" ? "clock" : status, mark)) : null,
      info, more),
    counted.size ? h("span", { class: "reactions", title: who, "aria-label": `Reactions: ${who}` },
      [...counted.entries()].map(([e, n]) => h("span", { class: "reaction" }, n > 1 ? `${e} ${n}` : e))) : null);
}

/// What one can do to a message: react, reply, forward; and to one's own,
/// within the server's windows, edit and delete for everyone.
function showActions(c, m) {
  const mine = m.mine && !m.local;
  const age = Date.now() - m.at;
  const content = m.content && (m.content.t === "text" || m.content.t === "file") ? m.content : { t: "text", text: m.text };
  const text = fold(c).edited.get(m.ref) ?? (content.t === "file" ? fileWords(content) : content.text);
  const close = () => { if ($("panel").open) $("panel").close(); };
  const act = (label, fn, cls = "") => h("button", { type: "button", class: cls, onclick: () => { close(); fn(); } }, label);
  const mineNow = [...(fold(c).reactions.get(m.ref) || new Map())].find(([p]) => p === "you");
  panel(`actions:${m.ref}`, h("h2", {}, "Message"),
    h("p", { class: "bubble" }, text),
    h("div", { class: "react-row", role: "group", "aria-label": "React" },
      REACTIONS.map((e) => act(e, () => send(c, "", { content: { t: "react", to: m.ref, emoji: e } }),
        mineNow && mineNow[1] === e ? "chosen" : "")),
      mineNow ? act("Remove reaction", () => send(c, "", { content: { t: "react", to: m.ref, emoji: "" } }), "secondary") : null),
    h("p", {},
      act("Reply", () => compose(c, { reply: { id: m.ref, quote: quoteOf(text) } }, `Replying to: ${quoteOf(text)}`)), " ",
      act("Forward", () => chooseForward(content.t === "file" ? content : { t: "text", text })), " ",
      mine && age < EDIT_WINDOW_MS && !m.quiet && content.t === "text" ? act("Edit", () => compose(c, { edits: ownSeq(m), lane: laneName(c, m) }, "Editing your message", text)) : null, " ",
      mine && age < DELETE_WINDOW_MS ? act("Delete for everyone", () => confirmDelete(c, m), "danger") : null));
}

/// The composer's next message replies to or edits another (`what`).
function compose(c, what, note, text = null) {
  state.composing = { key: c.key, ...what };
  $("compose-what").textContent = note;
  $("compose-note").hidden = false;
  if (text !== null) $("text").value = text;
  $("text").focus();
}

function endCompose() {
  state.composing = null;
  $("compose-note").hidden = true;
}

$("compose-cancel").addEventListener("click", () => { endCompose(); $("text").value = ""; });

function confirmDelete(c, m) {
  panel("delete", h("h2", {}, "Delete for everyone?"),
    h("p", {}, "Everyone in this chat will see that a message was deleted, and the server removes its text."),
    h("p", {}, h("button", { type: "button", class: "danger", onclick: () => {
      $("panel").close();
      send(c, "", { content: { t: "delete" }, deletes: ownSeq(m), lane: laneName(c, m) });
    } }, "Delete")));
}

/// Forwards `content` (a text, or a file: the same blob, shared with the new chat).
function chooseForward(content) {
  const text = content.t === "file" ? content.text || "" : content.text;
  const attachments = content.t === "file" ? [content.file.id] : [];
  const chats = [...state.chats.values()].filter((c) => c.kind !== "group" || state.groups.has(c.group))
    .sort((a, b) => b.lastAt - a.lastAt);
  panel("forward", h("h2", {}, "Forward to…"),
    h("ul", { class: "choices" }, chats.map((c) => h("li", {}, h("button", { type: "button", class: "secondary", onclick: () => {
      $("panel").close();
      send(c, text, { content: { ...content, reply: undefined, fwd: true }, attachments });
      openChat(c.key);
    } }, titleOf(c))))));
}

$("timer").addEventListener("click", () => {
  const c = state.chats.get(state.open);
  if (!c) return;
  const now = fold(c).timer;
  panel("timer", h("h2", {}, "Disappearing messages"),
    h("p", { class: "muted" }, "New messages in this chat disappear this long after they are sent, from every device and "
      + "from the server. Everyone in the chat sees the change."),
    h("div", { role: "group", "aria-label": "Timer" }, TIMERS.map(([ms, words]) => h("button", {
      type: "button", class: ms === now ? "chosen" : "secondary", "aria-pressed": String(ms === now),
      onclick: () => { $("panel").close(); if (ms !== now) send(c, "", { content: { t: "timer", ms } }); },
    }, words))));
});

async function showInfo(c, m) {
  const r = await state.session.request({ getMessageInfo: { group: c.group, seq: String(m.seq) } });
  const info = r.messageInfo;
  const members = info.recipients || [];
  const read = members.filter((x) => x.read);
  const delivered = members.filter((x) => x.delivered && !x.read);
  const waiting = members.filter((x) => !x.delivered);
  const section = (title, list) => (list.length
    ? [h("h3", {}, title), h("ul", {}, list.map((x) => h("li", { class: "member", "data-member": x.phone }, x.phone)))]
    : []);
  panel(`info:${m.id}`, h("h2", {}, "Message info"),
    h("p", { class: "bubble" }, m.text),
    h("p", { class: "muted" }, `Sent ${whenSeen(info.sentAtMs || m.at)}`),
    section(`Read by ${read.length} of ${members.length}`, read),
    section(`Delivered to ${delivered.length}`, delivered),
    section(`Not yet delivered to ${waiting.length}`, waiting));
}

// Scrolling to the top draws older messages, and reads the next page of
// history from the server at once when every kept one is drawn.
$("messages").addEventListener("scroll", () => {
  const c = state.chats.get(state.open);
  if (!c || $("messages").scrollTop > 40) return;
  if (c.window < c.messages.size) {
    c.window += WINDOW;
    renderMessages(true);
  } else if (state.wake) {
    state.wake();
  }
});

$("search").addEventListener("input", renderList);

function renderAll() {
  renderList();
  renderHeader();
  renderMessages();
}

setInterval(renderHeader, 1000); // typing indicators expire
// Disappearing messages leave the open chat when their time comes.
setInterval(() => {
  const c = state.chats.get(state.open);
  if (c && [...c.messages.values()].some((m) => m.expiresAt && gone(m) && !m.goneShown && (m.goneShown = true))) renderAll();
}, 2000);

document.addEventListener("visibilitychange", () => {
  const visible = document.visibilityState === "visible";
  if (state.session) state.session.request({ setActive: { active: visible } }).catch(() => {});
  if (visible && state.open) maybeMarkRead(state.chats.get(state.open));
});

let presenceTimer = null;
/// Subscribes soon to the presence of every 1:1 chat (a new chat was made).
function presenceSoon() {
  clearTimeout(presenceTimer);
  presenceTimer = setTimeout(() => subscribePresence().then(renderHeader).catch(() => {}), 100);
}

async function subscribePresence() {
  if (!state.session) return;
  const phones = [...state.chats.values()].filter((c) => c.kind === "peer").map((c) => c.key.slice(2));
  if (!phones.length) return;
  const r = await state.session.request({ subscribePresence: { phones } });
  for (const p of r.presenceList.presences || []) state.presence.set(p.phone, p);
  // Their profiles too (names shown as ~Name where no contact name is set).
  const profiles = await state.session.request({ getProfiles: { phones: phones.slice(0, 512) } });
  for (const p of profiles.profiles.profiles || []) state.profiles.set(p.phone, p);
  renderAll();
}

// ---------------------------------------------------------------- panels

let panelShows = null;

function panel(name, ...children) {
  // The same panel drawn again (its content changed) keeps its message.
  if (name !== panelShows || !$("panel").open) $("panel-note").hidden = true;
  panelShows = name;
  $("banner").hidden = true;
  $("panel-body").replaceChildren(...children.flat());
  if (!$("panel").open) $("panel").showModal();
}
$("panel").addEventListener("close", () => (panelShows = null));
$("banner").addEventListener("click", () => ($("banner").hidden = true));

async function guarded(fn) {
  try {
    await fn();
  } catch (err) {
    say(explain(err));
  }
}

$("new-chat").addEventListener("click", () => {
  const input = h("input", { type: "tel", placeholder: "+15551234567", "aria-label": "Phone number", required: true });
  panel("new-chat", h("h2", {}, "New chat"), h("form", {
    onsubmit: (e) => {
      e.preventDefault();
      const phone = normalisePhone(input.value);
      if (!phone) return say("Type the number in international form, like +15551234567.");
      if (phone === state.me.phone) return say("That is your own number.");
      chat(peerKey(phone));
      $("panel").close();
      openChat(peerKey(phone));
      subscribePresence().catch(() => {});
    },
  }, input, h("button", { type: "submit" }, "Chat")));
  input.focus();
});

$("new-group").addEventListener("click", () => {
  const subject = h("input", { placeholder: "Subject", "aria-label": "Subject", required: true, maxlength: "100" });
  const members = h("input", { placeholder: "+15551234567, +15557654321", "aria-label": "Members" });
  panel("new-group", h("h2", {}, "New group"), h("form", {
    onsubmit: (e) => {
      e.preventDefault();
      const phones = members.value.split(/[,\s]+/).filter(Boolean).map((p) => normalisePhone(p));
      if (phones.some((p) => !p)) return say("Type every number in international form, like +15551234567.");
      guarded(async () => {
        const r = await state.session.request({ createGroup: { subject: subject.value.trim(), members: phones } });
        // End-to-end encrypted when every device of every member can be.
        if (state.crypto && !(await state.crypto.startGroup(state.session, r.groupInfo))) {
          say("This group is not end-to-end encrypted: a device of a member cannot encrypt.", "info");
        }
        rememberGroup(r.groupInfo);
        $("panel").close();
        openChat(groupKey(r.groupInfo.id));
      });
    },
  }, subject, members, h("button", { type: "submit" }, "Create")));
  subject.focus();
});

$("group-info").addEventListener("click", () => showGroup(state.chats.get(state.open).group));

function showGroup(id) {
  const info = state.groups.get(id);
  if (!info) return;
  const me = info.members.find((m) => m.account === state.me.accountId);
  const admin = me && me.admin;
  const change = (c) => guarded(async () => {
    // An encrypted group's keys follow its members: the added accounts'
    // devices get them (claimed first: a device that cannot encrypt is
    // refused before anything changes), the removed one's lose them.
    const encrypted = encryptsFor(id);
    const packages = encrypted && c.add ? await state.crypto.prepareAdd(state.session, c.add.phones) : null;
    const gone = encrypted && c.remove ? (info.members.find((m) => m.phone === c.remove) || {}).account : null;
    const r = await state.session.request({ changeGroup: { group: id, ...c } });
    rememberGroup(r.groupInfo);
    if (packages) {
      try {
        await state.crypto.addDevices(state.session, id, packages);
      } catch (err) {
        // Members who could not get the keys could not read the group:
        // they are taken out again.
        const out = await state.crypto.undoUnkeyedAdd(state.session, id, c.add.phones);
        if (!out.length) throw err;
        throw new Error(`${explain(err)} So ${out.join(", ")} could not read the group, and `
          + `${out.length === 1 ? "was" : "were"} taken out of it again.`);
      }
    }
    if (gone) await state.crypto.removeAccounts(state.session, id, [gone]);
    renderAll();
    // Drawn again if still open (the encryption's part takes a moment, and
    // a panel closed meanwhile stays closed).
    if (panelShows === `group:${id}`) showGroup(id);
  });
  const add = h("input", { type: "tel", placeholder: "+15551234567", "aria-label": "Add member" });
  const subject = h("input", { value: info.subject, "aria-label": "Subject", maxlength: "100" });
  const adminOnly = h("input", { type: "checkbox", id: "admin-only", checked: info.adminOnly || false, disabled: !admin });
  panel(`group:${id}`,
    h("h2", {}, info.subject),
    h("p", { class: "muted" }, `${info.members.length} members${info.adminOnly ? " · only admins post" : ""}`),
    h("ul", {}, info.members.map((m) => h("li", { class: "member", "data-member": m.phone },
      h("span", { class: "who" }, m.account === state.me.accountId ? `${m.phone} (you)` : m.phone),
      m.admin ? h("span", { class: "admin-tag" }, "admin") : null,
      admin && m.account !== state.me.accountId
        ? [m.admin
          ? h("button", { type: "button", onclick: () => change({ demote: m.phone }) }, "Dismiss as admin")
          : h("button", { type: "button", onclick: () => change({ promote: m.phone }) }, "Make admin"),
          h("button", { type: "button", onclick: () => change({ remove: m.phone }) }, "Remove")]
        : null))),
    admin ? h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        const phone = normalisePhone(add.value);
        if (!phone) return say("Type the number in international form, like +15551234567.");
        change({ add: { phones: [phone] } });
      },
    }, add, h("button", { type: "submit" }, "Add member")) : null,
    admin ? h("form", { onsubmit: (e) => { e.preventDefault(); change({ subject: subject.value.trim() }); } },
      subject, h("button", { type: "submit" }, "Change subject")) : null,
    h("p", {}, h("label", {}, adminOnly, " Only admins may post")),
    h("button", {
      type: "button", class: "secondary",
      onclick: () => guarded(async () => {
        await state.session.request({ changeGroup: { group: id, leave: {} } });
        state.groups.delete(id);
        $("panel").close();
        renderAll();
      }),
    }, "Leave group"));
  adminOnly.addEventListener("change", () => change({ adminOnly: adminOnly.checked }));
}

$("devices").addEventListener("click", () => guarded(showDevices));

/// The devices panel. A refresh (a device linked or removed meanwhile)
/// draws it again only if it is still open: the user may have closed it
/// while the list was being fetched.
async function showDevices({ refresh = false } = {}) {
  const r = await state.session.request({ listDevices: {} });
  if (refresh && panelShows !== "devices") return;
  const code = h("input", { placeholder: "ABCD-EFGH", "aria-label": "Link code" });
  panel("devices",
    h("h2", {}, "Linked devices"),
    h("ul", {}, (r.deviceList.devices || []).map((d) => h("li", { class: "device", "data-device": d.id },
      h("span", { class: "who" }, d.name || `device ${d.id}`, d.current ? " (this browser)" : "",
        h("br"), h("span", { class: "muted" }, d.online ? "online" : Number(d.lastSeenMs) ? `last seen ${whenSeen(d.lastSeenMs)}` : "")),
      d.current ? h("button", { type: "button", onclick: () => renameDevice(d) }, "Rename") : null,
      h("button", {
        type: "button",
        onclick: () => (d.current ? confirmLogOut() : guarded(async () => {
          await state.session.request({ removeDevice: { deviceId: d.id } });
          await showDevices();
        })),
      }, d.current ? "Log out" : "Remove")))),
    h("h3", {}, "Link a device"),
    h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        guarded(async () => {
          const r = await state.session.request({ approveLink: { code: code.value.trim() } });
          await showDevices();
          const name = r.linkApproved && r.linkApproved.device && r.linkApproved.device.name;
          say(`Linked "${name || "a new device"}" to your account. Not yours? Remove it here.`, "info");
        });
      },
    }, code, h("button", { type: "submit" }, "Approve")));
}

$("settings").addEventListener("click", () => guarded(showSettings));

/// Privacy and security: two-step verification and the numbers blocked.
async function showSettings() {
  // Just signed in or back, the page may still be connecting: give it a moment.
  for (let waited = 0; !state.session && waited < 5000; waited += 100) await new Promise((r) => setTimeout(r, 100));
  if (!state.session) return say("Not connected; the settings open once this browser is back online.");
  const [pin, blocked] = await Promise.all([
    state.session.request({ getPinStatus: {} }),
    state.session.request({ listBlocked: {} }),
  ]);
  const status = pin.pinStatus;
  const mine = (await state.session.request({ getProfiles: { phones: [state.me.phone] } })).profiles.profiles[0] || {};
  const myName = h("input", { value: mine.visible ? mine.name : "", maxlength: "25", "aria-label": "Your name", placeholder: "Your name" });
  const myAbout = h("input", { value: mine.visible ? mine.about : "", maxlength: "139", "aria-label": "About you", placeholder: "About" });
  const seenBy = h("select", { "aria-label": "Who sees your profile" },
    ...[["VISIBILITY_EVERYONE", "Everyone"], ["VISIBILITY_CONTACTS", "People you wrote to"], ["VISIBILITY_NOBODY", "Nobody"]]
      .map(([v, label]) => h("option", { value: v, ...(mine.visibleTo === v ? { selected: "" } : {}) }, label)));
  const days = Math.round(Number(status.lapseMs || 0) / 86400000);
  const first = h("input", { type: "password", inputmode: "numeric", maxlength: "6", "aria-label": "New PIN", required: true });
  const again = h("input", { type: "password", inputmode: "numeric", maxlength: "6", "aria-label": "New PIN again", required: true });
  const accounts = blocked.blockedList.accounts || [];
  panel("settings",
    h("h2", {}, "Settings"),
    h("h3", {}, "Profile"),
    h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        guarded(async () => {
          await state.session.request({ setProfile: { name: myName.value.trim(), about: myAbout.value.trim(), visibleTo: seenBy.value } });
          say("Your profile is saved.", "info");
        });
      },
    }, myName, myAbout, seenBy, h("button", { type: "submit" }, "Save profile")),
    h("h3", {}, "Two-step verification"),
    h("p", { class: "pin-state" }, status.enabled
      ? `On since ${whenSeen(status.setAtMs)}: registering ${state.me.phone} on another phone needs your PIN as well as the SMS code.`
      : `Off: the SMS code alone registers ${state.me.phone} on another phone.`),
    h("p", { class: "muted" }, `The PIN stops guarding your number if your account goes unused for ${days} days.`),
    h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        if (!/^[0-9]{6}$/.test(first.value)) return say("A PIN is 6 digits.");
        if (first.value !== again.value) return say("The two PINs differ; nothing was changed.");
        guarded(async () => {
          await state.session.request({ setPin: { pin: first.value } });
          await showSettings();
          say("Two-step verification is on. Keep your PIN safe.", "info");
        });
      },
    }, first, again, h("button", { type: "submit" }, status.enabled ? "Change PIN" : "Turn on")),
    status.enabled ? h("p", {}, h("button", {
      type: "button", class: "secondary",
      onclick: () => guarded(async () => {
        await state.session.request({ setPin: { pin: "" } });
        await showSettings();
        say("Two-step verification is off.", "info");
      }),
    }, "Turn off")) : null,
    h("h3", {}, "End-to-end encryption"),
    state.crypto && state.crypto.stopped
      ? h("p", { class: "e2ee-state" }, "In another tab: a newer tab of this browser keeps its encryption now; use that one.")
      : state.crypto && !state.keysPublished
      ? h("p", { class: "e2ee-state" }, "Starting: this browser is publishing its encryption keys; "
        + "conversations become end-to-end encrypted once it has.")
      : state.crypto
      ? h("p", { class: "e2ee-state" }, "On: a conversation is end-to-end encrypted (🔒) once every device of everyone in it "
        + "can encrypt; then only those devices can read it, not this server. A device you link later is given the earlier "
        + "messages of your 1:1 chats by your other devices; in a group it reads from when it joined.")
      : h("p", { class: "e2ee-state" }, "Off on this browser: encryption could not start here, so what it sends and receives "
        + "can be read by this server, and your other devices' conversations with this browser stay unencrypted."),
    state.crypto ? null : h("p", {}, h("button", { type: "button", onclick: () => guarded(turnOnEncryption) }, "Start encryption")),
    h("h3", {}, "Blocked numbers"),
    accounts.length
      ? h("ul", {}, accounts.map((a) => h("li", { class: "device", "data-blocked": a.phone },
        h("span", { class: "who" }, a.phone, h("br"), h("span", { class: "muted" }, `since ${whenSeen(a.sinceMs)}`)),
        h("button", { type: "button", onclick: () => guarded(async () => {
          await setBlocked(a.phone, false);
          await showSettings();
        }) }, "Unblock"))))
      : h("p", { class: "muted" }, "Nobody. Block a number from its chat."),
    h("h3", {}, "Your account"),
    h("p", {},
      h("button", { type: "button", onclick: () => guarded(downloadExport) }, "Download my data"),
      " ",
      h("button", { type: "button", class: "danger", onclick: confirmDeleteAccount }, "Delete my account")));
  first.focus();
}

/// What the server keeps about the account, saved as a JSON file.
async function downloadExport() {
  const r = await state.session.request({ exportAccount: {} });
  const url = URL.createObjectURL(new Blob([r.accountExport.json], { type: "application/json" }));
  const a = h("a", { href: url, download: `skylark-${state.me.phone.slice(1)}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
  say("Your account's data was downloaded.", "info");
}

function confirmDeleteAccount() {
  const typed = h("input", { type: "tel", placeholder: state.me.phone, "aria-label": "Your phone number", required: true });
  panel("delete-account", h("h2", {}, "Delete your account?"),
    h("p", {}, "This cannot be undone. You leave your groups, every device is signed out, the server forgets your "
      + "settings and undelivered messages, and your number is freed. Type your number to confirm."),
    h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        if (normalisePhone(typed.value) !== state.me.phone) return say("That is not your number; nothing was deleted.");
        guarded(async () => {
          state.deletingAccount = true;
          try {
            await state.session.request({ deleteAccount: { phone: state.me.phone } });
          } catch (err) {
            // Signed out with every other device before the answer came.
            if (!(err instanceof Refused && err.code === "CLOSED")) {
              state.deletingAccount = false;
              throw err;
            }
          }
        });
      },
    }, typed, h("button", { type: "submit", class: "danger" }, "Delete my account")));
  typed.focus();
}

function renameDevice(d) {
  const name = h("input", { value: d.name || "", "aria-label": "Name of this browser", maxlength: "64", required: true });
  panel("rename", h("h2", {}, "Rename this browser"),
    h("p", { class: "muted" }, "The name your other devices show for it."),
    h("form", {
      onsubmit: (e) => {
        e.preventDefault();
        guarded(async () => {
          await state.session.request({ renameDevice: { deviceId: d.id, name: name.value.trim() } });
          await showDevices();
        });
      },
    }, name, h("button", { type: "submit" }, "Save")));
  name.focus();
}

function confirmLogOut() {
  panel("log-out", h("h2", {}, "Log out of this browser?"),
    h("p", {}, "This browser's copy of your chats is deleted, and messages typed but not yet sent are lost. "
      + "Your account, your other devices and your chats on them stay as they are."),
    h("p", {},
      h("button", {
        type: "button", class: "danger",
        onclick: async () => {
          if (!state.session) return say("Not connected; log out once this browser is back online.");
          state.loggingOut = true;
          try {
            await state.session.request({ removeDevice: { deviceId: state.me.deviceId } });
          } catch (err) {
            // The server ends this session as it removes the device.
            if (err instanceof Refused && err.code === "CLOSED") return;
            state.loggingOut = false;
            say(explain(err));
          }
        },
      }, "Log out"), " ",
      h("button", { type: "button", class: "secondary", onclick: () => guarded(showDevices) }, "Cancel")));
}

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && state.open && !$("panel").open && window.matchMedia("(max-width: 700px)").matches) {
    $("back").click();
  }
});

// ---------------------------------------------------------------- start

(async () => {
  if (!window.crypto || !crypto.subtle || !window.indexedDB) {
    return say("This browser lacks WebCrypto or IndexedDB, which Skylark needs.");
  }
  worker(); // the page's files kept for opening offline
  renderOffer();
  const identity = await loadIdentity().catch(() => undefined);
  if (identity) await enter(identity);
  else showWelcome();
})();
