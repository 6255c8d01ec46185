// Helpers shared by the web client's browser tests (e2e.mjs, cluster.mjs):
// waiting on a condition, signing up through the page, starting a chat,
// sending, and reading a message's tick.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { deflateSync } from "node:zlib";

const AXE = readFileSync(new URL("./node_modules/axe-core/axe.min.js", import.meta.url), "utf8");

/// Runs axe-core on what `page` shows; fails on any finding of serious or
/// critical impact, naming the rule and the elements.
export async function accessible(page, what) {
  if (!(await page.evaluate(() => typeof window.axe === "object"))) await page.evaluate(AXE);
  const found = await page.evaluate(async () => {
    const result = await window.axe.run(document, { resultTypes: ["violations"] });
    return result.violations
      .filter((v) => v.impact === "serious" || v.impact === "critical")
      .map((v) => `${v.id} (${v.impact}): ${v.help} — ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
  });
  assert.deepEqual(found, [], `accessibility of ${what}`);
}

export const WAIT = 15000;

export async function until(what, fn, ms = WAIT) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/// The page's settings say its encryption is on (its keys published), with
/// nothing to start: every browser encrypts by default.
export async function encryptionIsOn(page) {
  await until("encryption on", async () => {
    await page.click("#settings");
    const said = await (await page.waitForSelector("dialog .e2ee-state")).textContent();
    await page.keyboard.press("Escape");
    return said.startsWith("On:");
  });
  await page.click("#settings");
  await page.waitForSelector("dialog .e2ee-state >> text=On:");
  assert.equal(await page.locator("dialog >> button:text-is('Start encryption')").count(), 0);
  await page.keyboard.press("Escape");
  await page.waitForSelector("dialog#panel", { state: "hidden" });
}

/// Signs `phone` up on the page at `base`; `code(phone)` resolves with the
/// SMS code the server sent.
export async function signUp(page, base, phone, code) {
  await page.goto(base);
  await page.fill("#phone", phone);
  await page.press("#phone", "Enter");
  await page.waitForSelector("#code-form:not([hidden])");
  await page.fill("#code", await code(phone));
  await page.press("#code", "Enter");
  await page.waitForSelector("#app:not([hidden])");
  assert.equal(await page.textContent("#me-phone"), phone);
}

export async function startChat(page, phone) {
  await page.click("#new-chat");
  await page.fill("dialog input", phone);
  await page.press("dialog input", "Enter");
  await page.waitForSelector("#composer:not([hidden])");
}

export async function sendText(page, text) {
  await page.fill("#text", text);
  await page.press("#text", "Enter");
}

export const tick = (page, text) =>
  page.locator("#messages li.msg.mine", { hasText: text }).locator(".tick").getAttribute("data-status");

export async function tickIs(page, text, status, ms = WAIT) {
  await until(`"${text}" to be ${status}`, async () => (await tick(page, text)) === status, ms);
}

/// Links the browser `page` to `approver`'s account: the page shows a
/// link code, the approver enters it in its devices dialog.
export async function linkTo(approver, page, base) {
  await page.goto(base);
  await page.click("#link-start");
  await page.waitForSelector("#link-show:not([hidden])");
  const code = (await page.textContent("#link-code")).trim();
  await approver.click("#devices");
  await approver.fill("dialog input[aria-label='Link code']", code);
  await approver.press("dialog input[aria-label='Link code']", "Enter");
  await page.waitForSelector("#app:not([hidden])");
  await approver.waitForSelector("#panel-note >> text=Linked");
  await approver.keyboard.press("Escape");
}

/// A small valid PNG (width × height, a colour gradient), made here.
export function png(width, height) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => { let c = 0xffffffff; for (const b of buf) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8); return (c ^ 0xffffffff) >>> 0; };
  const chunk = (type, data) => {
    const out = Buffer.alloc(12 + data.length);
    out.writeUInt32BE(data.length, 0);
    out.write(type, 4, "ascii");
    data.copy(out, 8);
    out.writeUInt32BE(crc(out.subarray(4, 8 + data.length)), 8 + data.length);
    return out;
  };
  const header = Buffer.alloc(13);
  header.writeUInt32BE(width, 0);
  header.writeUInt32BE(height, 4);
  header[8] = 8; header[9] = 2; // 8-bit RGB
  const rows = Buffer.alloc(height * (1 + width * 3));
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) rows.set([x * 4 % 256, y * 5 % 256, 128], y * (1 + width * 3) + 1 + x * 3);
  }
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk("IHDR", header),
    chunk("IDAT", deflateSync(rows)), chunk("IEND", Buffer.alloc(0))]);
}
