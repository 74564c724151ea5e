// A page of another origin calls the API from headless Chromium, as a web
// app would with its user's key: the browser's preflight for a POST with
// `Authorization`, the response, and the rate-limit state the page may
// read. The page is TURNPIKE_URL's /openapi.json (origin 127.0.0.1); it
// calls the same api as `localhost`, a different origin to the browser.
// Exits non-zero on the first failed expectation.
import { chromium } from "playwright-core";

const url = process.env.TURNPIKE_URL;
const key = process.env.TURNPIKE_API_KEY;
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const other = url.replace("127.0.0.1", "localhost");

const browser = await chromium.launch({
  executablePath,
  args: ["--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(30000);
  await page.goto(`${url}/openapi.json`);
  const result = await page.evaluate(async ({ other, key }) => {
    const answer = await fetch(`${other}/v1/responses`, {
      method: "POST",
      headers: { "Authorization": `Bearer ${key}`, "Content-Type": "application/json",
                 "Idempotency-Key": `cors-${Date.now()}` },
      body: JSON.stringify({ input: "/echo from a browser" }),
    });
    const body = await answer.json();
    // An error, too, is readable by the page.
    const refused = await fetch(`${other}/v1/responses/resp_nope`, {
      headers: { "Authorization": `Bearer ${key}` },
    });
    return { status: answer.status, body, ratelimit: answer.headers.get("ratelimit"),
             refused: refused.status, error: (await refused.json()).error };
  }, { other, key });
  if (result.status !== 200) throw new Error(`status ${result.status}: ${JSON.stringify(result.body)}`);
  if (result.body.status !== "completed") throw new Error(`not completed: ${JSON.stringify(result.body)}`);
  const text = result.body.output.flatMap((o) => o.content || []).map((c) => c.text).join("");
  if (!text.includes("from a browser")) throw new Error(`answer: ${text}`);
  if (!result.ratelimit) throw new Error("the page cannot read the RateLimit header");
  if (result.refused !== 404 || !result.error) throw new Error(`error unreadable: ${JSON.stringify(result)}`);
  console.log(`cross-origin call: ${result.status}, "${text}", RateLimit ${result.ratelimit}`);
} finally {
  await browser.close();
}
