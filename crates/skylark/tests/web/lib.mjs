// Helpers shared by the web client's browser tests (e2e.mjs, cluster.mjs):
// waiting on a condition, signing up through the page, starting a chat,
// sending, and reading a message's tick.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";

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
