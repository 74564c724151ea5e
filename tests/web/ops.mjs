// Opens the ops page at TURNPIKE_URL/ops with an admin key in headless
// Chromium and waits until the topology table lists every node and every
// chart has plotted a few polls, then writes a screenshot to SCREENSHOT.
// Exits non-zero on the first failed expectation.
import { chromium } from "playwright-core";

const url = process.env.TURNPIKE_URL;
const key = process.env.TURNPIKE_ADMIN_KEY;
const nodes = Number(process.env.NODES || "3");
const screenshot = process.env.SCREENSHOT || "ops.png";
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  page.setDefaultTimeout(30000);
  const errors = [];
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${url}/ops?key=${key}`);
  await page.waitForFunction((n) => document.querySelectorAll("#topology tbody tr").length === n, nodes);
  const states = await page.$$eval("#topology tbody tr td:nth-child(3)", (cells) => cells.map((c) => c.textContent));
  if (!states.includes("up")) throw new Error(`no node is up: ${states}`);
  // Every chart has drawn (a canvas) from at least three polls.
  await page.waitForFunction(() => [...document.querySelectorAll(".chart")].every(
    (c) => c.querySelector("canvas") && Number(c.dataset.points || 0) >= 3));
  const status = await page.textContent("#status");
  if (!status.startsWith("live")) throw new Error(`status: ${status}`);
  if (errors.length) throw new Error(`page errors: ${errors.join("; ")}`);
  // Without a key, the page asks for one and shows no data.
  const anonymous = await browser.newPage();
  await anonymous.goto(`${url}/ops`);
  await anonymous.waitForSelector("#key-form:not([hidden])");
  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`ops page: ${states.length} nodes, charts live, screenshot at ${screenshot}`);
} finally {
  await browser.close();
}
