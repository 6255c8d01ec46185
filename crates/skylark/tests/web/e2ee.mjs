// End-to-end encryption in the web client, in headless Chromium against
// the real `skylark serve` binary and the real command line client. Run by
// tests/it/web.rs, which passes SKYLARK_BIN and CHROMIUM.
//
// Ann (a browser) encrypts, as every browser does. Cal (the command line) writes to
// her: the CLI now finds keys for every device and encrypts; the page
// decrypts with the same MLS code compiled to WebAssembly. Ann answers,
// and Cal's CLI decrypts. Ann starts an encrypted chat with Yan (another
// CLI account) from the page. Two browsers (Ann and Bea) chat encrypted,
// with ticks. Both sides show the same safety number as `skylark verify`.
// A group made in the page is encrypted for a browser and a CLI, and a
// member added later reads on; a CLI device linked to Ann gets the keys of
// her conversations from her browser, and the history of her 1:1 ones.
// A reload shows every message from the browser's own copy, decrypted.
// The server's files hold none of the messages' words. The server takes
// posts of at most 1,200 bytes here, so most changes to a conversation's
// encryption travel as files (a Welcome, and a commit too large by itself,
// uploaded; a post naming them), made and read by both clients.

import { chromium } from "playwright-core";
import { readFileSync, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import assert from "node:assert/strict";
import { encryptionIsOn, linkTo, sendText, signUp as signUpAt, startChat, tickIs, until } from "./lib.mjs";
import { harness } from "./harness.mjs";

const BIN = process.env.SKYLARK_BIN;
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

// A server whose posts hold at most 1,200 bytes: most changes to a
// conversation's encryption (a Welcome carries the group's tree) are then
// too large for one post, and travel as files both clients upload and
// download.
const MAX_PAYLOAD = 1200;
const { dataDir, base, codes, startServer, cli, cliUntil, cliRegister } =
  await harness(BIN, (dir) => join(dir, "server"), `[messaging]\nmax_payload_bytes = ${MAX_PAYLOAD}\n`);
const serverDir = join(dataDir, "server");
const signUp = (page, phone) => signUpAt(page, base, phone, (p) => until(`the SMS code for ${p}`, () => codes.get(p)));

/// The safety number the page shows for the open chat, digits only.
async function pageSafetyNumber(page) {
  await page.click("#verify");
  const number = (await page.textContent("dialog .safety-number")).replace(/\s+/g, " ").trim();
  await page.keyboard.press("Escape");
  return number;
}

const cliSafetyNumber = (out) => out.split("\n").filter((l) => /^ {4}\d{5}/.test(l)).join(" ").replace(/\s+/g, " ").trim();

/// Every file of the server's data directory, searched for `words`.
function serverFilesContaining(words) {
  const found = [];
  const walk = (dir) => {
    for (const name of readdirSync(dir)) {
      const path = join(dir, name);
      if (statSync(path).isDirectory()) walk(path);
      else {
        const bytes = readFileSync(path);
        for (const w of words) if (bytes.includes(Buffer.from(w))) found.push(`${path}: ${w}`);
      }
    }
  };
  walk(serverDir);
  return found;
}

const ANN = "+15554000001";
const BEA = "+15554000002";
const CAL = "+15554000003";
const YAN = "+15554000004";
// Words that must never reach the server in the clear.
const SECRETS = ["zebra-from-cal-7781", "otter-from-ann-4410", "heron-to-yan-2207", "lynx-ann-to-bea-9034",
  "ibis-bea-to-ann-5561", "puffin-to-the-trip-3318", "wren-after-yan-joined-6605", "newt-for-the-terminal-1187",
  "kiwi-from-a-second-tab-4471"];

const server = await startServer();
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
const errors = [];
try {
  const ann = await (await browser.newContext()).newPage();
  const bea = await (await browser.newContext()).newPage();
  for (const p of [ann, bea]) p.on("pageerror", (e) => errors.push(e.message));
  await signUp(ann, ANN);
  await signUp(bea, BEA);
  // Encryption is on by default.
  await encryptionIsOn(ann);
  await encryptionIsOn(bea);

  // The command line finds keys for every device of Ann's and encrypts.
  await cliRegister("cal", CAL);
  const calSent = await cli("cal", ["send", ANN, SECRETS[0]]);
  assert.match(calSent, /🔒.*end-to-end encrypted/, "the CLI encrypts for a browser that publishes keys");
  await ann.waitForSelector(`[data-chat="p:${CAL}"]`);
  await ann.click(`[data-chat="p:${CAL}"]`);
  await ann.waitForSelector(`#messages >> text=${SECRETS[0]}`);
  assert.ok(await ann.isVisible("#chat-title .icon-lock"), "the chat is marked encrypted");
  // The page answers, encrypted, and the CLI opens it.
  await sendText(ann, SECRETS[1]);
  await tickIs(ann, SECRETS[1], "sent");
  const calHeard = await cliUntil("cal", ["listen"], new RegExp(SECRETS[1]));
  // It is the page's first post in a conversation it joined from a key
  // package: a commit of fresh keys for its leaf came first (a log entry
  // the CLI shows nothing for), then the answer.
  const seqOf = (text) => Number(calHeard.split("\n").find((l) => l.includes(text)).match(/\(#(\d+)\)/)[1]);
  assert.equal(seqOf(SECRETS[1]), seqOf(SECRETS[0]) + 2, `the page refreshed its keys before answering:\n${calHeard}`);
  // The same safety number on both sides.
  const calNumber = cliSafetyNumber(await cli("cal", ["verify", ANN]));
  assert.match(calNumber, /^(\d{5} ){11}\d{5}$/, `the CLI's safety number: ${calNumber}`);
  assert.equal(await pageSafetyNumber(ann), calNumber, "the page and the CLI show one safety number");

  // The page starts an encrypted conversation with a CLI account.
  await cliRegister("yan", YAN);
  await startChat(ann, YAN);
  await sendText(ann, SECRETS[2]);
  await tickIs(ann, SECRETS[2], "sent");
  await cliUntil("yan", ["listen"], new RegExp(SECRETS[2]));
  await ann.waitForSelector("#verify:not([hidden])");

  // Two browsers, both encrypting: the message, its ticks, the answer.
  await startChat(ann, BEA);
  await sendText(ann, SECRETS[3]);
  await tickIs(ann, SECRETS[3], "delivered");
  await bea.click(`[data-chat="p:${ANN}"]`);
  await bea.waitForSelector(`#messages >> text=${SECRETS[3]}`);
  await tickIs(ann, SECRETS[3], "read");
  await bea.type("#text", "ibis", { delay: 20 });
  await until("Ann sees Bea typing", async () => (await ann.textContent("#chat-status")) === "typing…");
  await sendText(bea, SECRETS[4]);
  await ann.waitForSelector(`#messages >> text=${SECRETS[4]}`);
  assert.notEqual(await ann.textContent("#chat-status"), "typing…", "typing… ends with the encrypted message");
  assert.equal(await pageSafetyNumber(ann), await pageSafetyNumber(bea), "both browsers show one safety number");

  // A group made in the browser is encrypted for every device of its
  // members (a browser and a CLI); a member added later gets the keys.
  // Bea's first downloads of its start (kept as files) fail on the way:
  // her page tries again, then reconnects and reads it again from there.
  let blobTries = 0;
  await bea.route("**/v1/blobs/**", (route) => (++blobTries <= 5 ? route.abort() : route.continue()));
  await ann.click("#new-group");
  await ann.fill("dialog input[aria-label='Subject']", "Trip");
  await ann.fill("dialog input[aria-label='Members']", `${BEA}, ${CAL}`);
  await ann.press("dialog input[aria-label='Members']", "Enter");
  await ann.waitForSelector("#chat-title:has-text('Trip') .icon-lock");
  await sendText(ann, SECRETS[5]);
  await bea.waitForSelector(`li.chat >> text=Trip`);
  await bea.click("li.chat >> text=Trip");
  await bea.waitForSelector(`#messages >> text=${SECRETS[5]}`);
  assert.ok(blobTries > 5, `the failed downloads were made again (${blobTries} tries)`);
  await cliUntil("cal", ["listen"], new RegExp(SECRETS[5]));
  await ann.click("#group-info");
  await ann.fill("dialog input[aria-label='Add member']", YAN);
  await ann.press("dialog input[aria-label='Add member']", "Enter");
  await ann.waitForSelector(`dialog li[data-member="${YAN}"]`);
  await ann.keyboard.press("Escape");
  await sendText(ann, SECRETS[6]);
  await cliUntil("yan", ["listen"], new RegExp(SECRETS[6]));
  await bea.waitForSelector(`#messages >> text=${SECRETS[6]}`);

  // A command line device linked to Ann's account is given the keys of
  // her encrypted conversations by her browser, and reads what follows.
  let code = null;
  const linking = cli("ann-cli", ["link", "--name", "terminal"], undefined, (out) => {
    const m = out.match(/Link code: (\S+)/);
    if (m) code = m[1];
  });
  await until("the link code", () => code);
  await ann.click("#devices");
  await ann.fill("dialog input[aria-label='Link code']", code);
  await ann.press("dialog input[aria-label='Link code']", "Enter");
  await ann.waitForSelector("#panel-note >> text=Linked");
  await ann.keyboard.press("Escape");
  await linking;
  await ann.click(`[data-chat="p:${CAL}"]`);
  await until("the terminal in Ann's conversation with Cal", async () => {
    await ann.click("#verify");
    const said = await ann.textContent("#panel-body");
    await ann.keyboard.press("Escape");
    return said.includes("your 2 devices");
  }, 60000);
  await cli("cal", ["send", ANN, SECRETS[7]]);
  await cliUntil("ann-cli", ["listen"], new RegExp(SECRETS[7]));
  await ann.waitForSelector(`#messages >> text=${SECRETS[7]}`);
  // The browser gave the terminal the history of Ann's 1:1 conversations:
  // what Cal and Ann wrote before it was linked shows on it too. (The
  // history may come after Cal's message in the log: a chat opened before
  // it arrived shows those two as unreadable, the next one shows them.)
  await until("the terminal shows what came before it was linked", async () =>
    new RegExp(`${SECRETS[0]}[^]*${SECRETS[1]}`).test(await cli("ann-cli", ["chat", CAL], "")), 30000);

  // A browser linked to Ann's account reads her chats' earlier messages
  // from the server as unreadable; her page gives it the keys and the
  // history of her 1:1 chats, and it shows them in their place.
  const laptop = await (await browser.newContext()).newPage();
  laptop.on("pageerror", (e) => errors.push(e.message));
  await linkTo(ann, laptop, base);
  await encryptionIsOn(laptop);
  await laptop.click(`[data-chat="p:${CAL}"]`);
  await laptop.waitForSelector(`#messages >> text=${SECRETS[0]}`, { timeout: 60000 });
  await laptop.waitForSelector(`#messages >> text=${SECRETS[1]}`);

  // A reload shows everything from the browser's own copy, decrypted.
  await ann.reload();
  await ann.waitForSelector("#app:not([hidden])");
  await ann.click(`[data-chat="p:${CAL}"]`);
  await ann.waitForSelector(`#messages >> text=${SECRETS[0]}`);
  await ann.waitForSelector(`#messages >> text=${SECRETS[1]}`);
  await ann.click(`[data-chat="p:${BEA}"]`);
  await ann.waitForSelector(`#messages >> text=${SECRETS[4]}`);
  assert.equal(await ann.locator("#messages >> text=cannot read").count(), 0, "nothing left unreadable");
  await sendText(ann, "after the reload");
  await bea.click(`[data-chat="p:${ANN}"]`);
  await bea.waitForSelector("#messages >> text=after the reload");

  // A second tab of Ann's browser takes the device over, its connection
  // and its encryption; the first tab stops, and the second chats on,
  // encrypted.
  const annTab = await ann.context().newPage();
  annTab.on("pageerror", (e) => errors.push(e.message));
  await annTab.goto(base);
  await annTab.waitForSelector("#app:not([hidden])");
  await until("the first tab stopped", async () => (await ann.textContent("#conn-state")) === "open in another window");
  await encryptionIsOn(annTab);
  await annTab.click(`[data-chat="p:${BEA}"]`);
  await annTab.waitForSelector(`#messages >> text=${SECRETS[4]}`);
  await sendText(annTab, SECRETS[8]);
  await bea.waitForSelector(`#messages >> text=${SECRETS[8]}`);

  // Changes too large for a post went as files, made by both clients (the
  // CLI's start of its chat with Ann, the page's group): their blobs are
  // with the attachments.
  const blobs = readdirSync(join(serverDir, "media", "blobs", "blobs"));
  assert.ok(blobs.length >= 4, `commits kept as files: ${blobs.length}`);
  // The server never had the words (the scan reads those files too).
  assert.deepEqual(serverFilesContaining(SECRETS), [], "the server's files hold no plaintext of the messages");
  // (The scan does read the store: it finds what the server keeps in the clear.)
  assert.notDeepEqual(serverFilesContaining([ANN]), [], "the scan finds a phone number in the server's files");
  assert.deepEqual(errors, [], "no errors on the pages");
  console.log("web e2ee: ok");
} finally {
  await browser.close();
  server.kill("SIGKILL");
}
