import { test, after } from "node:test";
import assert from "node:assert/strict";
import { durableRelayAndBrowser, screenshotPath } from "./support.js";

const cleanups = [];
after(async () => {
  for (const f of cleanups.reverse()) await f();
});

const state = (page) => page.locator("#conn").getAttribute("data-state");
// What a page shows: waits until one of its notes' text areas holds `text`.
const shows = (page, text) => page.waitForFunction((t) => [...document.querySelectorAll(".note textarea")].some((a) => a.value === t), text);
const notes = (page) => page.evaluate(() => window.demo.notes().map(({ text, by }) => ({ text, by })).sort((a, b) => a.text.localeCompare(b.text)));

test("the demo board: two pages see each other's notes, cursors and names, through a restart", async () => {
  const setup = await durableRelayAndBrowser(cleanups);
  let relay = setup.relay;
  const browser = setup.browser;
  const context = await browser.newContext({ viewport: { width: 1280, height: 760 } });
  const open = async (name, color) => {
    const page = await context.newPage();
    const problems = [];
    page.on("pageerror", (e) => problems.push(e.message));
    page.on("console", (m) => m.type() === "error" && problems.push(m.text()));
    await page.goto(`${relay.http}/demo?doc=board&name=${name}&color=${encodeURIComponent(color)}`);
    await page.waitForSelector('#conn[data-state="connected"]');
    return { page, problems };
  };
  const { page: ada, problems: adaProblems } = await open("ada", "#d62728");
  const { page: bob, problems: bobProblems } = await open("bob", "#1f77b4");

  // The participants list shows both, in their colours, on both pages.
  for (const page of [ada, bob]) await page.waitForFunction(() => document.querySelectorAll("#participants li").length === 2);
  assert.deepEqual((await bob.locator("#participants li").allTextContents()).sort(), ["ada", "bob (you)"]);
  assert.deepEqual((await ada.locator("#participants li").allTextContents()).sort(), ["ada (you)", "bob"]);

  // Ada adds a note and writes in it; Bob's page shows it.
  await ada.bringToFront();
  await ada.click("#add");
  await ada.keyboard.type("Ship the demo");
  await ada.mouse.click(900, 600); // on the board: the note loses focus and its text is sent
  await shows(bob, "Ship the demo");
  const bobNote = bob.locator(".note", { has: bob.locator(".bar", { hasText: "ada" }) });
  assert.equal(await bobNote.locator("textarea").inputValue(), "Ship the demo");

  // Bob adds one by double-clicking the board, then drags Ada's note; Ada sees both.
  await bob.bringToFront();
  await bob.mouse.dblclick(700, 300);
  await bob.keyboard.type("Write the tests");
  await bob.mouse.click(1000, 650);
  const bar = await bobNote.locator(".bar").boundingBox();
  await bob.mouse.move(bar.x + 40, bar.y + 10);
  await bob.mouse.down();
  await bob.mouse.move(bar.x + 240, bar.y + 160, { steps: 8 });
  await bob.mouse.up();
  await shows(ada, "Write the tests");
  await ada.waitForFunction(() => {
    const n = window.demo.notes().find((x) => x.by === "ada");
    return n && n.x > 200;
  });
  // Both boards converge: same notes, same places.
  const board = (page) => page.evaluate(() => window.demo.notes().map(({ id, x, y, text }) => ({ id, x, y, text })).sort((a, b) => (a.id < b.id ? -1 : 1)));
  await ada.waitForFunction(() => window.demo.client.seq > 0);
  await bob.waitForFunction((seq) => window.demo.client.seq === seq, await ada.evaluate(() => window.demo.client.seq));
  assert.deepEqual(await board(ada), await board(bob));

  // Ada's cursor, with her name and colour, on Bob's page.
  await ada.bringToFront();
  await ada.mouse.move(500, 420);
  await ada.mouse.move(520, 440, { steps: 3 });
  const cursor = bob.locator(".cursor", { hasText: "ada" });
  await cursor.waitFor();
  assert.equal(await cursor.locator("path").getAttribute("fill"), "#d62728");
  await bob.bringToFront();
  await bob.mouse.move(800, 250, { steps: 3 }); // and Bob's on Ada's
  await ada.locator(".cursor", { hasText: "bob" }).waitFor();

  const shot = screenshotPath("demo-two-participants.png");
  await bob.screenshot({ path: shot });
  console.log(`screenshot of the demo with two participants: ${shot}`);

  // The relay dies: both indicators say so; it comes back on its storage: both
  // pages catch up and keep their board.
  await ada.evaluate(() => {
    window.states = [];
    const conn = document.getElementById("conn");
    new MutationObserver(() => window.states.at(-1) !== conn.dataset.state && window.states.push(conn.dataset.state)).observe(conn, { attributes: true });
  });
  await relay.kill();
  for (const page of [ada, bob]) await page.waitForSelector('#conn[data-state="reconnecting"]');
  assert.equal(await ada.locator("#conn-text").textContent(), "Reconnecting…");
  assert.equal(await ada.locator("#add").isDisabled(), true);
  relay = await setup.restart();
  for (const page of [ada, bob]) await page.waitForSelector('#conn[data-state="connected"]', { timeout: 15000 });
  // The indicator went through "catching up" (the resume's sync) to "connected".
  assert.deepEqual(await ada.evaluate(() => window.states), ["reconnecting", "catching-up", "connected"]);
  const expected = [{ text: "Ship the demo", by: "ada" }, { text: "Write the tests", by: "bob" }];
  assert.deepEqual(await notes(ada), expected);
  assert.deepEqual(await notes(bob), expected);

  // A page opened now loads the board from the relay's history.
  const { page: cy } = await open("cy", "#2ca02c");
  await shows(cy, "Ship the demo");
  await shows(cy, "Write the tests");
  assert.deepEqual(await notes(cy), expected);
  // Deleting is seen everywhere.
  await cy.bringToFront();
  await cy.locator(".note", { hasText: "" }).filter({ has: cy.locator(".bar", { hasText: "bob" }) }).locator(".del").click();
  for (const page of [ada, bob, cy]) await page.waitForFunction(() => document.querySelectorAll(".note").length === 1);
  assert.deepEqual(adaProblems, []);
  assert.deepEqual(bobProblems, []);
});
