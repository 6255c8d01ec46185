// Helpers shared by the web client's browser tests (e2e.mjs, cluster.mjs):
// waiting on a condition, signing up through the page, starting a chat,
// sending, and reading a message's tick.

import assert from "node:assert/strict";

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
