// End-to-end test of the web client in headless Chromium against the real
// `skylark serve` binary. Run by tests/it/web.rs (`cargo test`), which
// passes SKYLARK_BIN, CHROMIUM and SCREENSHOTS in the environment.
//
// Every browser encrypts end to end by default, so all of this runs
// encrypted wherever both sides can. Two browsers sign up two numbers and
// chat (ticks sent → delivered →
// read, typing, presence); a third links to the first account and sees the
// same conversation; a group is created, used and managed; two command
// line accounts write more than a few history pages; a reload shows every
// chat from the browser's own copy before it reconnects; a browser linked
// afterwards reads the whole history back from the server and pages back
// as the user scrolls; the server is killed and restarted mid-conversation,
// a message typed meanwhile survives closing the tab, and nothing is lost
// or shown twice; replies, reactions, edits, deletions, forwards and
// disappearing messages go both ways (browser and command line); a number
// is blocked and unblocked; two-step verification
// is turned on and asked for at sign-up; an account's data is downloaded
// and the account deleted; a phone-sized window works.

import { chromium } from "playwright-core";
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import assert from "node:assert/strict";
import { accessible, encryptionIsOn, linkTo, png, sendText, signUp as signUpAt, startChat, tick, tickIs, until } from "./lib.mjs";
import { harness } from "./harness.mjs";

const BIN = process.env.SKYLARK_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = process.env.SCREENSHOTS || join(tmpdir(), "skylark-web-screenshots");
mkdirSync(SHOTS, { recursive: true });

// One upload started per account each 4 s: the page's files below go
// faster, and it waits as the server says instead of failing.
const LIMITS = "[media]\nuploads_per_account = { burst = 1, per_ms = 4000 }\n";
const { dataDir, adminPort, base, codes, startServer, cli, cliUntil, cliRegister } = await harness(BIN, undefined, LIMITS);
const signUp = (page, phone) =>
  signUpAt(page, base, phone, (p) => until(`the SMS code for ${p}`, () => codes.get(p)));
let server = null;


/// The server's admin token (written to its data directory at start).
const adminToken = () => readFileSync(join(dataDir, "admin.token"), "utf8").trim();

/// How many messages from `phone` the page has kept in its local store.
const keptFrom = (page, phone) => page.evaluate(async (phone) => {
  const [info] = (await indexedDB.databases()).filter((d) => d.name.startsWith("skylark-device-"));
  if (!info) return 0;
  const db = await new Promise((resolve, reject) => {
    const req = indexedDB.open(info.name);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
  const rows = await new Promise((resolve) => {
    db.transaction("events").objectStore("events").getAll().onsuccess = (e) => resolve(e.target.result);
  });
  db.close();
  // A 1:1 message, or a post of the 1:1 conversation's group (encrypted),
  // not the commit that started its encryption (a commit and Welcome).
  const handshake = (m) => atob(m.payload || "").startsWith("\0SKMLSB");
  const from = (e) => (e.message && e.message.fromPhone)
    || (e.group && e.group.message && !handshake(e.group.message) && e.group.byPhone);
  return rows.filter((r) => from(r.event) === phone).length;
}, phone);

const badge = async (page, phone) => {
  const b = page.locator(`[data-chat="p:${phone}"] .badge`);
  return (await b.count()) ? b.textContent() : null;
};

async function shot(page, name) {
  await page.screenshot({ path: join(SHOTS, `${name}.png`), fullPage: true });
}

/// Opens a message's ⋯ menu on `page` and picks `action` (a reaction, Reply, Edit…).
async function actOn(page, text, action) {
  await page.click(`#messages li.msg:has-text('${text}') button.more`);
  await page.click(`dialog >> button:text-is('${action}')`);
}

async function count(page, selector, text) {
  return page.locator(selector, { hasText: text }).count();
}

// Every request the pages make must find its file (the favicon too).
const missing = [];
const watched = (page) => {
  page.on("response", (r) => { if (r.status() === 404) missing.push(r.url()); });
  return page;
};

/// Screenshots at a desktop's 1280×800 (and a phone's 390×780 below).
const DESKTOP = { viewport: { width: 1280, height: 800 } };

const ALICE = "+15553000001";
const BOB = "+15553000002";
const CAROL = "+15553000003";
const DAVE = "+15553000004";
/// More events than two history pages of the server (200 each).
const MANY = 550;

server = await startServer();
// A fake microphone (a tone) for voice notes, allowed without asking.
const browser = await chromium.launch({ executablePath: CHROMIUM,
  args: ["--no-sandbox", "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"] });
try {
  // Alice allows notifications; Bob has not been asked yet.
  let alice = watched(await (await browser.newContext({ ...DESKTOP, permissions: ["notifications", "microphone"] })).newPage());
  const bob = watched(await (await browser.newContext(DESKTOP)).newPage());
  for (const p of [alice, bob]) p.on("pageerror", (e) => console.error("page error:", e.message));

  await alice.goto(base);
  await shot(alice, "01-welcome");
  await accessible(alice, "the welcome screen");
  await signUp(alice, ALICE);
  await signUp(bob, BOB);
  await encryptionIsOn(alice);
  await encryptionIsOn(bob);

  // Alice starts a chat with Bob. Bob's browser is open but not on the chat:
  // ✓ when stored, ✓✓ when Bob's device has it, blue when he opens it.
  await startChat(alice, BOB);
  await sendText(alice, "hello bob");
  await tickIs(alice, "hello bob", "delivered");
  await bob.waitForSelector(`[data-chat="p:${ALICE}"] .badge`);
  assert.match(await bob.textContent(`[data-chat="p:${ALICE}"]`), /hello bob/);
  await shot(bob, "02-chat-list-unread");
  await bob.click(`[data-chat="p:${ALICE}"]`);
  await tickIs(alice, "hello bob", "read");
  assert.equal(await bob.locator(`[data-chat="p:${ALICE}"] .badge`).count(), 0, "opened chat has no unread badge");

  // Presence and typing, then Bob's answer.
  await until("Bob shown online", async () => (await alice.textContent("#chat-status")) === "online");
  await bob.type("#text", "hi ali", { delay: 20 });
  await until("Alice sees Bob typing", async () => (await alice.textContent("#chat-status")) === "typing…");
  await shot(alice, "03-typing");
  await bob.fill("#text", "hi alice");
  await bob.press("#text", "Enter");
  await alice.waitForSelector("#messages li.msg:not(.mine) >> text=hi alice");
  // The message ends "typing…" at once (not when the indicator expires).
  assert.equal(await alice.textContent("#chat-status"), "online", "typing… ends with the message");
  await tickIs(bob, "hi alice", "read"); // Alice has the chat open
  // Every browser encrypts by default: the chat is end-to-end encrypted.
  await alice.waitForSelector("#chat-title .icon-lock");
  await bob.waitForSelector("#chat-title .icon-lock");
  // Both sides of a conversation in the order they happened, on both screens,
  // even when the two senders' message ids (which count in different
  // sequences) drift apart: Alice's own log moves on in a group of her own.
  await alice.click("#new-group");
  await alice.fill("dialog input[aria-label='Subject']", "Notes");
  await alice.press("dialog input[aria-label='Subject']", "Enter");
  await alice.waitForSelector("#chat-title >> text=Notes");
  for (let i = 1; i <= 6; i++) {
    await sendText(alice, `note ${i}`);
    await until(`note ${i} stored`, async () => (await tick(alice, `note ${i}`)) !== "pending");
  }
  await alice.click(`[data-chat="p:${BOB}"]`);
  for (const text of ["one", "two", "three"]) {
    await sendText(alice, text);
    await tickIs(alice, text, "read");
  }
  await bob.fill("#text", "four");
  await bob.press("#text", "Enter");
  await alice.waitForSelector("#messages li.msg:not(.mine) >> text=four");
  const expected = ["hello bob", "hi alice", "one", "two", "three", "four"];
  for (const page of [alice, bob]) {
    const shown = await page.locator("#messages li.msg .text").allTextContents();
    assert.deepEqual(shown, expected, "conversation order");
  }
  await shot(alice, "04-conversation");
  await accessible(alice, "a conversation");

  // Notifications: Bob's page offers them; Alice allowed them. With her
  // page out of view, a message from Bob raises one with his words; once
  // she mutes his chat, the next raises none.
  assert.equal(await bob.isVisible("#notify-offer"), true, "notifications offered");
  assert.equal(await alice.isVisible("#notify-offer"), false, "nothing to offer once allowed");
  const notifications = (page) => page.evaluate(async () =>
    (await (await navigator.serviceWorker.ready).getNotifications()).map((n) => `${n.title}: ${n.body}`));
  const visibility = (page, hidden) => page.evaluate((hidden) => {
    if (hidden) Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
    else delete document.visibilityState;
    document.dispatchEvent(new Event("visibilitychange"));
  }, hidden);
  await visibility(alice, true);
  await sendText(bob, "are you there?");
  await until("a notification on Alice's page", async () => (await notifications(alice)).includes(`${BOB}: are you there?`));
  await alice.click("#mute");
  assert.equal(await alice.getAttribute("#mute", "aria-pressed"), "true");
  await sendText(bob, "quiet one");
  await alice.waitForSelector("#messages >> text=quiet one");
  await new Promise((r) => setTimeout(r, 300));
  assert.ok(!(await notifications(alice)).some((n) => n.includes("quiet one")), "a muted chat raises no notification");
  await alice.click("#mute");
  await visibility(alice, false);
  await tickIs(bob, "quiet one", "read");

  // A third browser links to Alice's account without SMS and sees the chat.
  const smsBefore = codes.size;
  const laptop = watched(await (await browser.newContext(DESKTOP)).newPage());
  await laptop.goto(base);
  await laptop.click("#link-start");
  await laptop.waitForSelector("#link-show:not([hidden])");
  const code = (await laptop.textContent("#link-code")).trim();
  assert.match(code, /^[A-Z0-9]{4}-[A-Z0-9]{4}$/);
  assert.ok(await laptop.getAttribute("#link-qr", "src"), "a QR code is shown");
  await shot(laptop, "05-link-code");
  await alice.click("#devices");
  await alice.fill("dialog input[aria-label='Link code']", code);
  await alice.press("dialog input[aria-label='Link code']", "Enter");
  // Each browser is named after itself, and can be renamed.
  await alice.waitForSelector("dialog li.device >> text=Chrome on Linux");
  await until("two devices listed", async () => (await alice.locator("dialog li.device").count()) === 2);
  await shot(alice, "06-devices");
  await accessible(alice, "the devices dialog");
  await alice.keyboard.press("Escape");
  await laptop.waitForSelector("#app:not([hidden])");
  assert.equal(codes.size, smsBefore, "linking sent no SMS");
  await laptop.click(`[data-chat="p:${BOB}"]`);
  await laptop.waitForSelector("#messages >> text=hello bob");
  await laptop.waitForSelector("#messages >> text=hi alice");

  // A group: Alice creates it with Bob; both post; Alice makes Bob an admin.
  await alice.click("#new-group");
  await alice.fill("dialog input[aria-label='Subject']", "Weekend");
  await alice.fill("dialog input[aria-label='Members']", BOB);
  await alice.press("dialog input[aria-label='Members']", "Enter");
  await alice.waitForSelector("#chat-title >> text=Weekend");
  await sendText(alice, "who is in?");
  await tickIs(alice, "who is in?", "delivered");
  const groupItem = bob.locator("li.chat", { hasText: "Weekend" });
  await groupItem.waitFor();
  await groupItem.click();
  await bob.waitForSelector("#messages >> text=who is in?");
  await bob.waitForSelector(`#messages li.system >> text=created "Weekend"`);
  await sendText(bob, "me!");
  await alice.waitForSelector("#messages li.msg:not(.mine) >> text=me!");
  await tickIs(alice, "who is in?", "read");
  // Message info: who has it (each member's read and delivered marks).
  await alice.click("#messages li.msg.mine:has-text('who is in?') button.info");
  await alice.waitForSelector(`dialog >> text=Read by 1 of 1`);
  await alice.waitForSelector(`dialog li[data-member="${BOB}"]`);
  await alice.keyboard.press("Escape");
  assert.equal(await alice.locator("#messages li.day").first().textContent(), "Today", "a day line above today's messages");
  await alice.click("#group-info");
  await alice.click(`dialog li[data-member="${BOB}"] >> text=Make admin`);
  await alice.waitForSelector(`dialog li[data-member="${BOB}"] .admin-tag`);
  await shot(alice, "07-group-info");
  await accessible(alice, "the group dialog");
  await alice.keyboard.press("Escape");
  await bob.waitForSelector("#messages li.system >> text=an admin");
  await laptop.waitForSelector("li.chat >> text=Weekend");
  // Reactions and deletions for everyone work in groups as in 1:1 chats.
  await actOn(bob, "who is in?", "🙏");
  await alice.waitForSelector("#messages li.msg.mine:has-text('who is in?') .reactions >> text=🙏");
  await sendText(alice, "typo in the group");
  await bob.waitForSelector("#messages >> text=typo in the group");
  await actOn(alice, "typo in the group", "Delete for everyone");
  await alice.click("dialog >> button:text-is('Delete')");
  await until("the post deleted on Bob's page", async () => (await count(bob, "#messages li.msg", "typo in the group")) === 0);
  await bob.waitForSelector("#messages li.msg.deleted >> text=This message was deleted");

  // History longer than the server's pages: Carol (command line) writes
  // once, then Dave (command line) writes MANY times; Alice reads neither.
  await cliRegister("carol", CAROL);
  await cliRegister("dave", DAVE);
  await cli("carol", ["send", ALICE, "carol was here"]);
  const lines = Array.from({ length: MANY }, (_, i) => `dave ${String(i + 1).padStart(3, "0")}`);
  await cli("dave", ["chat", ALICE], `${lines.join("\n")}\n`);
  await until("Dave's messages counted on Alice's page", async () => (await badge(alice, DAVE)) === String(MANY), 30000);
  assert.equal(await badge(alice, CAROL), "1");
  await until("Dave's messages kept in Alice's browser", async () => (await keptFrom(alice, DAVE)) === MANY);
  assert.match(await alice.title(), /^\(\d+\) Skylark$/, "unread count in the tab title");

  // A reload shows every chat from the browser's own copy, before (here:
  // without) a connection to the server.
  let hold = true; // while set, the page's socket opens to nobody
  await alice.routeWebSocket(/\/v1\/ws/, (ws) => { if (!hold) ws.connectToServer(); });
  await alice.reload();
  await alice.waitForSelector("#app:not([hidden])");
  await alice.waitForSelector(`[data-chat="p:${CAROL}"] .badge`);
  assert.equal(await badge(alice, CAROL), "1");
  assert.equal(await badge(alice, DAVE), String(MANY));
  await alice.click(`[data-chat="p:${BOB}"]`);
  await alice.waitForSelector("#messages >> text=hello bob");
  await alice.waitForSelector("#messages >> text=hi alice");
  assert.notEqual(await alice.textContent("#conn-state"), "", "not connected while the socket is held");
  hold = false;
  await alice.reload();
  await alice.waitForSelector("#app:not([hidden])");
  await until("Alice reconnected", async () => (await alice.textContent("#conn-state")) === "");

  // A browser linked now has nothing of its own: it reads the history back
  // from the server, down to Carol's message, and pages back through Dave's
  // as the user scrolls up.
  const tablet = watched(await (await browser.newContext(DESKTOP)).newPage());
  await linkTo(alice, tablet, base);
  await until("Carol's chat read back from history", async () => (await badge(tablet, CAROL)) === "1");
  await until("every message of Dave's counted", async () => (await badge(tablet, DAVE)) === String(MANY));
  assert.equal(await tablet.title(), await alice.title(), "the same unread count on both devices");
  await tablet.click(`[data-chat="p:${DAVE}"]`);
  await tablet.waitForSelector(`#messages >> text=dave ${MANY}`);
  assert.ok((await tablet.locator("#messages li.msg").count()) < MANY, "a long chat draws its newest messages first");
  await until("scrolled back to Dave's first message", async () => {
    await tablet.locator("#messages").evaluate((box) => { box.scrollTop = 0; });
    return (await tablet.locator("#messages >> text=dave 001").count()) === 1;
  });
  await tablet.waitForSelector("#messages li.older >> text=No older messages");
  assert.equal(await tablet.locator("#messages li.msg").count(), MANY, "each message once");
  await shot(tablet, "08-history");
  // Search finds Carol's chat by the words of her message.
  await tablet.fill("#search", "was here");
  await until("search shows Carol's chat alone", async () => (await tablet.locator("li.chat").count()) === 1);
  assert.match(await tablet.textContent("li.chat"), /carol was here/);
  await tablet.fill("#search", "");
  // Logging out asks first, then forgets the browser's copy of the account.
  await tablet.click("#devices");
  await tablet.click("dialog li.device >> text=Log out");
  await tablet.waitForSelector("dialog >> text=Log out of this browser?");
  await tablet.click("dialog button.danger");
  await tablet.waitForSelector("#welcome:not([hidden])");
  assert.equal(await tablet.isVisible("#panel"), false, "no dialog left open");
  assert.match(await tablet.textContent("#banner"), /You logged out of this browser/);
  assert.equal(await keptFrom(tablet, DAVE), 0, "nothing of the account is left in the browser");
  await tablet.close();

  // The server dies (kill -9) mid-conversation and comes back: what Alice
  // typed meanwhile survives closing the tab, is sent once when a tab is
  // open again, and Bob sees it exactly once.
  await alice.click(`[data-chat="p:${BOB}"]`);
  server.kill("SIGKILL");
  await new Promise((r) => server.once("exit", r));
  await until("Alice's page notices", async () => /offline|connecting/.test(await alice.textContent("#conn-state")));
  assert.equal(await alice.textContent("#chat-status"), "", "no presence shown while offline");
  await sendText(alice, "while you were away");
  assert.equal(await tick(alice, "while you were away"), "pending");
  await shot(alice, "09-offline");
  const aliceContext = alice.context();
  await alice.close();

  // With no page open, a push (here handed to the browser through the
  // DevTools protocol, since headless Chromium has no push service) shows
  // a notification from the service worker, without content.
  // The probe is a same-origin document that is not the app (the icon,
  // served by the service worker while the server is down).
  const probe = await aliceContext.newPage();
  await probe.goto(`${base}/favicon.svg`);
  const devtools = await aliceContext.newCDPSession(probe);
  const registration = new Promise((resolve) => devtools.on("ServiceWorker.workerRegistrationUpdated", ({ registrations }) => {
    const mine = registrations.find((r) => r.scopeURL === `${base}/` && !r.isDeleted);
    if (mine) resolve(mine.registrationId);
  }));
  await devtools.send("ServiceWorker.enable");
  const registrationId = await registration;
  await until("the service worker's notification", async () => {
    // Handed again while none shows: the worker may still be starting.
    await devtools.send("ServiceWorker.deliverPushMessage",
      { origin: base, registrationId, data: JSON.stringify({ type: "wake" }) });
    await new Promise((r) => setTimeout(r, 200));
    const shown = await probe.evaluate(async () => {
      const r = await navigator.serviceWorker.getRegistration("/");
      return r ? (await r.getNotifications()).map((n) => `${n.title}: ${n.body}`) : [];
    });
    return shown.includes("Skylark: You have new messages.");
  });
  await probe.close();

  // The page opens with the server still down (its files kept by the
  // service worker), showing the chats and the message waiting to be sent.
  alice = watched(await aliceContext.newPage());
  await alice.goto(base);
  await alice.waitForSelector("#app:not([hidden])");
  await alice.click(`[data-chat="p:${BOB}"]`);
  assert.equal(await tick(alice, "while you were away"), "pending");
  server = await startServer();
  await tickIs(alice, "while you were away", "delivered");
  await bob.click(`[data-chat="p:${ALICE}"]`);
  await bob.waitForSelector("#messages >> text=while you were away");
  await tickIs(alice, "while you were away", "read");
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(await count(bob, "#messages li.msg", "while you were away"), 1, "shown once to Bob");
  assert.equal(await count(alice, "#messages li.msg", "while you were away"), 1, "shown once to Alice");
  assert.equal(await count(bob, "#messages li.msg", "hello bob"), 1);

  // Replies, reactions, edits, deletions for everyone, forwards and
  // disappearing messages, between two browsers.
  await sendText(bob, "are you coming?");
  await alice.waitForSelector("#messages li.msg:not(.mine) >> text=are you coming?");
  await actOn(alice, "are you coming?", "Reply");
  await alice.waitForSelector("#compose-note:not([hidden]) >> text=Replying to: are you coming?");
  await sendText(alice, "yes, on my way");
  await bob.waitForSelector("#messages li.msg:has-text('yes, on my way') .quote >> text=are you coming?");
  await actOn(alice, "are you coming?", "👍");
  await bob.waitForSelector("#messages li.msg.mine:has-text('are you coming?') .reactions >> text=👍");
  await actOn(alice, "are you coming?", "😂"); // one reaction per person: the new one replaces it
  await bob.waitForSelector("#messages li.msg.mine:has-text('are you coming?') .reactions >> text=😂");
  assert.equal(await count(bob, "#messages li.msg.mine .reactions", "👍"), 0, "replaced, not added");
  await actOn(alice, "yes, on my way", "Edit");
  await alice.fill("#text", "yes, in 5 minutes");
  await alice.press("#text", "Enter");
  await bob.waitForSelector("#messages li.msg:has-text('yes, in 5 minutes') .edited");
  assert.equal(await count(bob, "#messages li.msg", "yes, on my way"), 0, "the edit replaces the text");
  await shot(bob, "16-reply-react-edit");
  await sendText(alice, "oops, wrong chat");
  await bob.waitForSelector("#messages >> text=oops, wrong chat");
  await actOn(alice, "oops, wrong chat", "Delete for everyone");
  await alice.click("dialog >> button:text-is('Delete')");
  await bob.waitForSelector("#messages li.msg.deleted >> text=This message was deleted");
  assert.equal(await count(bob, "#messages li.msg", "oops, wrong chat"), 0, "gone from Bob's screen");
  assert.equal(await count(alice, "#messages li.msg", "oops, wrong chat"), 0, "and from Alice's");
  await shot(bob, "17-deleted");
  await actOn(alice, "are you coming?", "Forward");
  await alice.click("dialog >> button:text-is('Notes')");
  await alice.waitForSelector("#chat-title >> text=Notes");
  await alice.waitForSelector("#messages li.msg.mine:has-text('are you coming?') .fwd");
  await alice.click(`[data-chat="p:${BOB}"]`);
  await alice.click("#timer");
  await alice.click("dialog >> button:text-is('24 hours')");
  await bob.waitForSelector(`#messages >> text=${ALICE} set disappearing messages to 24 hours`);
  assert.equal((await bob.textContent("#timer")).trim(), "24 hours", "the timer is the chat's, on both sides");
  await sendText(bob, "this one disappears");
  await alice.waitForSelector("#messages li.msg:has-text('this one disappears') .timer");
  await shot(alice, "18-disappearing");
  await alice.click("#timer");
  await alice.click("dialog >> button:text-is('Off')");
  await bob.waitForSelector(`#messages >> text=${ALICE} turned off disappearing messages`);

  // An unknown number is refused in words.
  await startChat(alice, "+15553999999");
  await sendText(alice, "anyone?");
  await alice.waitForSelector("#banner:not([hidden]) >> text=No Skylark account has that phone number.");
  assert.equal(await tick(alice, "anyone?"), "failed");

  // A chat that begins with an incoming message shows the sender's presence
  // without a reload (Erin, on the command line, writes and leaves).
  await cliRegister("erin", "+15553000005");
  await cli("erin", ["send", ALICE, "hello from erin"]);
  await alice.waitForSelector(`[data-chat="p:+15553000005"]`);
  await alice.click(`[data-chat="p:+15553000005"]`);
  await until("Erin's last seen on Alice's page", async () => /last seen|online/.test(await alice.textContent("#chat-status")));

  // Alice blocks Erin: asked first, then the composer gives way to a note,
  // Erin's presence is hidden, and what Erin sends meanwhile (she still
  // gets her tick) never reaches Alice, not even after the unblock.
  await alice.click("#block");
  await alice.click("dialog >> button:has-text('Block')");
  await alice.waitForSelector("#blocked-note:not([hidden])");
  await alice.waitForSelector("#messages >> text=You blocked +15553000005");
  assert.equal(await alice.isVisible("#composer"), false, "no composer for a blocked chat");
  assert.equal(await alice.textContent("#block"), "Unblock");
  const sent = await cli("erin", ["send", ALICE, "erin while blocked"]);
  assert.match(sent, /✓ (🔒 )?sent/, "the blocked sender sees one tick");
  await shot(alice, "12-blocked");
  await alice.click("#block");
  await alice.waitForSelector("#composer:not([hidden])");
  await alice.waitForSelector("#messages >> text=You unblocked +15553000005");
  await cli("erin", ["send", ALICE, "erin after the unblock"]);
  await alice.waitForSelector("#messages >> text=erin after the unblock");
  assert.equal(await count(alice, "#messages li.msg", "erin while blocked"), 0, "dropped for good");
  // The command line's reactions, edits, deletions and timers show in the
  // browser (one content format for both clients).
  const erinSent = await cli("erin", ["send", ALICE, "lunch at noon?"]);
  const erinId = erinSent.match(/message (\d+:\d+)/)[1];
  await alice.waitForSelector("#messages >> text=lunch at noon?");
  await sendText(alice, "sounds good");
  await tickIs(alice, "sounds good", "sent"); // Erin has no device online
  const aliceRef = await alice.getAttribute("#messages li.msg.mine:has-text('sounds good')", "data-ref");
  await cli("erin", ["react", ALICE, aliceRef, "❤️"]);
  await alice.waitForSelector("#messages li.msg.mine:has-text('sounds good') .reactions >> text=❤️");
  await cli("erin", ["edit", ALICE, erinId, "lunch at one?"]);
  await alice.waitForSelector("#messages li.msg:has-text('lunch at one?') .edited");
  await cli("erin", ["delete", ALICE, erinId]);
  await until("Erin's message deleted", async () => (await count(alice, "#messages li.msg", "lunch at one?")) === 0);
  await cli("erin", ["disappear", ALICE, "3s"]);
  await alice.waitForSelector("#messages >> text=+15553000005 set disappearing messages to 3 seconds");
  await cli("erin", ["send", ALICE, "gone in three seconds"]);
  await alice.waitForSelector("#messages >> text=gone in three seconds");
  await until("the disappearing message to leave the page", async () =>
    (await count(alice, "#messages li.msg", "gone in three seconds")) === 0, 10000);
  await cli("erin", ["disappear", ALICE, "off"]);
  // Files both ways. Alice attaches a photo and records a voice note (the
  // fake microphone), faster than the server's limit of uploads (LIMITS):
  // the page waits its turn. Erin's listen saves both, byte for byte. Erin sends a
  // photo back from the command line and forwards the voice note back;
  // Alice's page shows the picture and can play the notes. The server
  // only ever holds their ciphertext.
  const photo = png(40, 30);
  await alice.setInputFiles("#file-input", { name: "photo.png", mimeType: "image/png", buffer: photo });
  await alice.waitForSelector("#messages li.msg.mine .attachment img.full[alt='photo.png']");
  await alice.click("#record");
  await alice.waitForSelector("#record[aria-pressed='true']");
  await new Promise((r) => setTimeout(r, 1500));
  await alice.click("#record");
  await alice.waitForSelector("#messages li.msg.mine .attachment audio");
  await alice.waitForSelector("#messages li.msg.mine[data-ref] .attachment audio");
  // A file dropped on the conversation, and one pasted into the composer, go too.
  await alice.evaluate(() => {
    const dt = new DataTransfer();
    dt.items.add(new File(["dropped notes"], "dropped.txt", { type: "text/plain" }));
    document.querySelector("#conversation").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true }));
  });
  await alice.waitForSelector("#messages li.msg.mine[data-ref] .attachment.file >> text=dropped.txt");
  await alice.evaluate(() => {
    const dt = new DataTransfer();
    dt.items.add(new File(["pasted notes"], "pasted.txt", { type: "text/plain" }));
    document.querySelector("#text").dispatchEvent(new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true }));
  });
  await alice.waitForSelector("#messages li.msg.mine[data-ref] .attachment.file >> text=pasted.txt");
  const erinFiles = join(dataDir, "erin-files");
  const heard = await cliUntil("erin", ["listen", "--files", erinFiles], /📥 saved pasted\.txt/);
  assert.equal(readFileSync(join(erinFiles, "dropped.txt"), "utf8"), "dropped notes");
  assert.equal(readFileSync(join(erinFiles, "pasted.txt"), "utf8"), "pasted notes");
  assert.match(heard, /📎 photo\.png \([\d.]+ (bytes|kB)\)/);
  assert.deepEqual(readFileSync(join(erinFiles, "photo.png")), photo, "Erin's copy is Alice's photo");
  const voice = readFileSync(join(erinFiles, "voice-note.webm"));
  assert.deepEqual([...voice.subarray(0, 4)], [0x1a, 0x45, 0xdf, 0xa3], "the voice note is a WebM recording");
  // (#SENDER:SEQ for a 1:1 message; #SEQ for a post of the encrypted
  // conversation's group.)
  const voiceRef = heard.match(/🎤 voice note \(0:0\d\)\s+\(#(\d+(?::\d+)?)\)/)[1];
  const blobDir = join(dataDir, "media", "blobs", "blobs");
  assert.equal(readdirSync(blobDir).length, 4);
  for (const name of readdirSync(blobDir)) {
    const stored = readFileSync(join(blobDir, name));
    assert.ok(!stored.includes(photo.subarray(16, 48)) && !stored.includes(voice.subarray(0, 32)), "the server holds ciphertext only");
  }
  const menu = png(64, 48);
  writeFileSync(join(dataDir, "menu.png"), menu);
  const sentMenu = await cli("erin", ["send", ALICE, "--file", join(dataDir, "menu.png"), "the menu"]);
  assert.match(sentMenu, /📎 menu\.png \([\d.]+ (bytes|kB)\) sent/);
  await alice.waitForSelector("#messages li.msg:not(.mine):has-text('the menu') .attachment img.full[alt='menu.png']");
  assert.equal(await alice.evaluate(() => document.querySelector("img.full[alt='menu.png']").naturalWidth), 64, "the picture decodes");
  await cli("erin", ["forward", ALICE, voiceRef, ALICE]);
  await alice.waitForSelector("#messages li.msg:not(.mine):has(.fwd) .attachment audio");
  const ready = await alice.evaluate(async () => {
    const a = document.querySelector("#messages li.msg:not(.mine):has(.fwd) .attachment audio");
    if (a.readyState < 1) await new Promise((r) => { a.addEventListener("loadedmetadata", r, { once: true }); setTimeout(r, 5000); });
    return a.readyState;
  });
  assert.ok(ready >= 1, "the forwarded voice note loads in the player");
  await shot(alice, "19-attachments");
  await accessible(alice, "a chat with attachments");
  // Alice names Erin: the chat is called so in the list and the header.
  await alice.click("#name-contact");
  await alice.fill("dialog input[aria-label='Contact name']", "Erin E.");
  await alice.press("dialog input[aria-label='Contact name']", "Enter");
  await alice.waitForSelector(`[data-chat="p:+15553000005"] >> text=Erin E. (+15553000005)`);
  assert.equal(await alice.textContent("#chat-title"), "Erin E. (+15553000005)");
  // Alice reports the conversation; the operator sees it, without text.
  await alice.click("#report");
  await alice.click("dialog >> button:text-is('Report')");
  await alice.waitForSelector("#banner >> text=Reported +15553000005");
  const reports = await (await fetch(`http://127.0.0.1:${adminPort}/admin/v1/reports`,
    { headers: { authorization: `Bearer ${adminToken()}` } })).json();
  assert.equal(reports[0].reporter, ALICE);
  assert.equal(reports[0].reported, "+15553000005");
  assert.ok(reports[0].messages.length > 0 && !JSON.stringify(reports).includes("erin after"), "metadata only");

  // Settings: two-step verification on, then off again; the blocked list
  // (empty again) is there too.
  await alice.click("#settings");
  await alice.waitForSelector("dialog >> text=Two-step verification");
  assert.match(await alice.textContent("dialog .pin-state"), /^Off/);
  await alice.waitForSelector("dialog >> text=Nobody. Block a number from its chat.");
  // Her profile: Bob (whom she wrote to) sees her name where he gave none.
  await alice.fill("dialog input[aria-label='Your name']", "Alice Liddell");
  await alice.fill("dialog input[aria-label='About you']", "down the rabbit hole");
  await alice.selectOption("dialog select[aria-label='Who sees your profile']", "VISIBILITY_CONTACTS");
  await alice.click("dialog >> button:has-text('Save profile')");
  await alice.waitForSelector("dialog >> text=Your profile is saved.");
  await bob.reload();
  await bob.waitForSelector(`[data-chat="p:${ALICE}"] >> text=~Alice Liddell (${ALICE})`);
  await alice.fill("dialog input[aria-label='New PIN']", "246810");
  await alice.fill("dialog input[aria-label='New PIN again']", "246810");
  await alice.click("dialog >> button:has-text('Turn on')");
  await until("the PIN on", async () => /^On since/.test(await alice.textContent("dialog .pin-state")));
  await shot(alice, "13-settings");
  await alice.click("dialog >> button:has-text('Turn off')");
  await until("the PIN off", async () => /^Off/.test(await alice.textContent("dialog .pin-state")));
  await alice.keyboard.press("Escape");

  // Erin sets a PIN on the command line; a browser registering her number
  // is asked for it once the code is right.
  await cli("erin", ["pin", "set"], "135790\n135790\n");
  const newPhone = watched(await (await browser.newContext(DESKTOP)).newPage());
  codes.delete("+15553000005");
  await newPhone.goto(base);
  await newPhone.fill("#phone", "+15553000005");
  await newPhone.press("#phone", "Enter");
  await newPhone.waitForSelector("#code-form:not([hidden])");
  await newPhone.fill("#code", await until("Erin's new code", () => codes.get("+15553000005")));
  await newPhone.press("#code", "Enter");
  await newPhone.waitForSelector("#pin-field:not([hidden])");
  await newPhone.fill("#pin", "000000");
  await newPhone.press("#pin", "Enter");
  await newPhone.waitForSelector("#banner:not([hidden]) >> text=Wrong PIN; 9 attempts left");
  await shot(newPhone, "14-pin-asked");
  await newPhone.fill("#pin", "135790");
  await newPhone.press("#pin", "Enter");
  await newPhone.waitForSelector("#app:not([hidden])");
  assert.equal(await newPhone.textContent("#me-phone"), "+15553000005");

  // Erin downloads her data, then deletes her account: the page signs out,
  // and her number is free.
  await newPhone.click("#settings");
  await newPhone.waitForSelector("dialog >> text=Your account");
  const [download] = await Promise.all([
    newPhone.waitForEvent("download"),
    newPhone.click("dialog >> button:has-text('Download my data')"),
  ]);
  const exported = JSON.parse(readFileSync(await download.path(), "utf8"));
  assert.equal(exported.account.phone, "+15553000005");
  assert.equal(exported.settings.two_step_verification, true, "the PIN she signed in with");
  await newPhone.click("dialog >> button:has-text('Delete my account')");
  await newPhone.fill("dialog input[aria-label='Your phone number']", "+15553000005");
  await shot(newPhone, "15-delete-account");
  await newPhone.click("dialog >> button[type=submit]:has-text('Delete my account')");
  await newPhone.waitForSelector("#welcome:not([hidden])");
  await newPhone.waitForSelector("#banner >> text=Your account was deleted.");
  await until("Erin's number is free", async () => {
    const r = await fetch(`http://127.0.0.1:${adminPort}/admin/v1/accounts/%2B15553000005`, { headers: { authorization: `Bearer ${adminToken()}` } });
    return r.status === 404;
  });

  // Phone-sized window: one pane at a time.
  const phone = watched(await (await browser.newContext({ viewport: { width: 390, height: 780 } })).newPage());
  // A fresh context, linked to Bob's account.
  await linkTo(bob, phone, base);
  await phone.waitForSelector(`[data-chat="p:${ALICE}"]`);
  assert.equal(await phone.isVisible("#conversation"), false, "narrow: the list alone");
  await shot(phone, "10-narrow-list");
  await phone.click(`[data-chat="p:${ALICE}"]`);
  assert.equal(await phone.isVisible("#sidebar"), false, "narrow: the conversation alone");
  await phone.waitForSelector("#messages >> text=while you were away");
  await shot(phone, "11-narrow-chat");
  await accessible(phone, "a conversation on a phone-sized screen");
  await phone.click("#back");
  assert.equal(await phone.isVisible("#sidebar"), true);
  assert.deepEqual(missing, [], "no request of the pages ends in 404");
  console.log(`web e2e passed; screenshots in ${SHOTS}`);
} finally {
  await browser.close();
  if (server) server.kill("SIGKILL");
  rmSync(dataDir, { recursive: true, force: true });
}
