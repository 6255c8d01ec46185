// The web client against a three-node cluster, run by tests/it/cluster.rs
// (`the_web_client_fails_over_when_its_node_dies`), which owns the cluster
// and answers this script's questions on stdin, one line each:
//
//   CODE +15551234567   → the SMS code the cluster sent to that number
//   KILL 0              → node 0 was killed (SIGKILL); "killed" when done
//
// NODES (comma-separated http://host:port) and CHROMIUM come from the
// environment. Alice's page is loaded from node 0, Bob's from node 1; they
// chat; node 0 dies; Alice's page (still the one node 0 served) reconnects
// to another node by itself, and the conversation goes on both ways, files
// too (the nodes share one media directory, as a cluster must).

import { chromium } from "playwright-core";
import { createInterface } from "node:readline";
import assert from "node:assert/strict";
import { png, sendText, signUp, startChat, tickIs, until } from "./lib.mjs";

const NODES = process.env.NODES.split(",");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
// A killed node's actors move once its lease lapses (4 s in the tests),
// and the page backs off between rounds of tries.
const FAILOVER_WAIT = 45000;

const lines = createInterface({ input: process.stdin });
const answers = lines[Symbol.asyncIterator]();
async function ask(question) {
  console.log(question);
  const { value, done } = await answers.next();
  if (done) throw new Error(`no answer to ${question}`);
  return value.trim();
}
const code = (phone) => ask(`CODE ${phone}`);

const ALICE = "+15553100001";
const BOB = "+15553100002";

const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
try {
  const alice = await (await browser.newContext()).newPage();
  const bob = await (await browser.newContext()).newPage();
  for (const p of [alice, bob]) p.on("pageerror", (e) => console.error("page error:", e.message));
  await signUp(alice, NODES[0], ALICE, code);
  await signUp(bob, NODES[1], BOB, code);

  await startChat(alice, BOB);
  await sendText(alice, "before the node died");
  await tickIs(alice, "before the node died", "delivered");
  await bob.click(`[data-chat="p:${ALICE}"]`);
  await bob.waitForSelector("#messages >> text=before the node died");

  // The page learnt the cluster's nodes from the one that served it.
  const known = () => alice.evaluate(() => JSON.parse(localStorage.getItem("skylark.nodes") || "[]"));
  await until("Alice's page to know every node", async () => (await known()).length === NODES.length);
  assert.deepEqual(
    [...(await known())].sort(),
    NODES.map((n) => new URL(n).host).sort(),
    "the nodes the page knows",
  );

  assert.equal(await ask("KILL 0"), "killed");
  await until("Alice's page notices", async () => /offline|connecting/.test(await alice.textContent("#conn-state")));
  await sendText(alice, "after the node died");
  await tickIs(alice, "after the node died", "read", FAILOVER_WAIT);
  await bob.waitForSelector("#messages >> text=after the node died");
  assert.equal(await alice.textContent("#conn-state"), "", "Alice's page is connected again");
  await sendText(bob, "still here");
  await alice.waitForSelector("#messages li.msg:not(.mine) >> text=still here", { timeout: FAILOVER_WAIT });
  await tickIs(bob, "still here", "read", FAILOVER_WAIT);
  for (const [page, text] of [[alice, "after the node died"], [bob, "after the node died"], [bob, "still here"]]) {
    assert.equal(await page.locator("#messages li.msg", { hasText: text }).count(), 1, `"${text}" shown once`);
  }
  // Files go through the node Alice's page is connected to now, not the
  // dead one that served it (the nodes let each other's pages in): a
  // photo from Alice that Bob's page shows, and one from Bob that hers
  // fetches and shows.
  const photo = (name, w, h) => ({ name, mimeType: "image/png", buffer: png(w, h) });
  await alice.setInputFiles("#file-input", photo("after.png", 20, 10));
  await alice.waitForSelector("#messages li.msg.mine[data-ref] .attachment img.full[alt='after.png']", { timeout: FAILOVER_WAIT });
  await bob.waitForSelector("#messages li.msg:not(.mine) .attachment img.full[alt='after.png']", { timeout: FAILOVER_WAIT });
  await bob.setInputFiles("#file-input", photo("back.png", 10, 20));
  await alice.waitForSelector("#messages li.msg:not(.mine) .attachment img.full[alt='back.png']", { timeout: FAILOVER_WAIT });
  console.log("DONE");
} finally {
  // The open stdin would keep Node running after the last step.
  lines.close();
  await browser.close();
}
