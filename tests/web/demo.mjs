// Drives the web demo at TURNPIKE_URL in headless Chromium, as a person would:
// create a conversation, send a message and watch it stream, reload in the
// middle of a long answer and watch it resume, call a tool. Writes a
// screenshot to SCREENSHOT. Exits non-zero on the first failed expectation.
import { chromium } from "playwright-core";

const url = process.env.TURNPIKE_URL;
const key = process.env.TURNPIKE_API_KEY;
const screenshot = process.env.SCREENSHOT || "demo.png";
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 720 } });
  page.setDefaultTimeout(20000);
  await page.goto(`${url}/?key=${key}`);
  await page.click("#new");
  await page.waitForSelector("#conversations li.active");

  // A message streams in.
  await page.fill("#message", "/echo hello from the browser");
  await page.press("#message", "Enter");
  await page.waitForSelector(".item.assistant .text:text-is('hello from the browser')");

  // A long answer: reload while it streams, and it resumes to the end.
  await page.fill("#message", "tell me a long story about toll roads");
  await page.press("#message", "Enter");
  await page.waitForFunction(() => {
    const answers = document.querySelectorAll(".item.assistant .text");
    return answers.length >= 2 && answers[answers.length - 1].textContent.length > 10;
  });
  const partial = await page.$$eval(".item.assistant .text", (els) => els[els.length - 1].textContent);
  await page.reload();
  await page.waitForFunction(() => sessionStorage.getItem("turnpike.stream") === null
    && document.querySelectorAll(".item.assistant").length >= 2
    && document.getElementById("status").textContent === "");
  const full = await page.$$eval(".item.assistant .text", (els) => els[els.length - 1].textContent);
  if (!full.startsWith(partial) || full.length <= partial.length) {
    throw new Error(`after the reload the answer did not resume: ${JSON.stringify({ partial, full })}`);
  }
  const stored = await page.evaluate(async ([key]) => {
    const conversation = localStorage.getItem("turnpike.conversation");
    const res = await fetch(`/v1/conversations/${conversation}/items?order=asc`, { headers: { Authorization: `Bearer ${key}` } });
    const items = (await res.json()).data;
    return items[items.length - 1].content[0].text;
  }, [key]);
  if (stored !== full) throw new Error(`shown ${JSON.stringify(full)} but stored ${JSON.stringify(stored)}`);

  // A tool call is shown.
  await page.fill("#message", '/call get_weather {"city":"Oslo"}');
  await page.press("#message", "Enter");
  await page.waitForSelector(".item.tool .text:text-is('get_weather({\"city\":\"Oslo\"})')");

  // A server-side tool runs inside the turn: its call, its output, then the answer.
  await page.fill("#message", '/call conversation_search {"query":"Oslo"}');
  await page.press("#message", "Enter");
  await page.waitForSelector(".item.tool .text:text-is('conversation_search({\"query\":\"Oslo\"})')");
  await page.waitForFunction(() => [...document.querySelectorAll(".item.tool .text")]
    .some((el) => el.textContent.includes('"matches"') && el.textContent.includes("Oslo")));
  await page.waitForFunction(() => document.querySelector(".item.assistant:last-child .text")?.textContent.startsWith("tool said:")
    && document.getElementById("status").textContent === "");

  await page.screenshot({ path: screenshot, fullPage: true });
  console.log(`web demo: ok (screenshot ${screenshot})`);
} finally {
  await browser.close();
}
