// Drives the browser demo (web/) in headless Chromium like a user: node tests/web_driver.mjs URL [--screenshot PNG]
// URL is the page as served from the repository root (http://127.0.0.1:PORT/web/). Draws a "7" on the
// pad with the mouse, waits until the drawing is explained, and prints one JSON line: the page's
// input, target, logits and relevance (plain arrays) and the prediction it shows.
// Chromium: LRP_ONNX_CHROMIUM, else /usr/bin/chromium. playwright-core: the repository's node_modules.
import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const screenshotFlag = args.indexOf("--screenshot");
const screenshot = screenshotFlag >= 0 ? args.splice(screenshotFlag, 2)[1] : null;
const [url] = args;
if (!url) throw new Error("usage: node tests/web_driver.mjs URL [--screenshot PNG]");

// The stroke in pad fractions: the bar of a 7, then its stem down and slightly left.
const SEVEN = [[0.28, 0.22], [0.72, 0.22], [0.62, 0.45], [0.5, 0.8]];
const STEPS_PER_SEGMENT = 12; // pointermove events per segment, so the live updates run too

const browser = await chromium.launch({
  executablePath: process.env.LRP_ONNX_CHROMIUM || "/usr/bin/chromium",
  // Chromium's sandbox refuses to start as root. The other flags keep it from reaching out,
  // which closed networks refuse (as in lrp_onnx/js/run_ort_web.mjs).
  args: [...(process.getuid?.() === 0 ? ["--no-sandbox"] : []), "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1040, height: 600 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  await page.goto(url);
  await page.waitForFunction(() => window.lrpDemo !== undefined, null, { timeout: 30000 }).catch(() => {
    throw new Error(`the demo page did not start: ${errors.join("; ") || "no error reported"}`);
  });
  await page.evaluate(() => window.lrpDemo.ready);

  const box = await page.locator("#pad").boundingBox();
  const at = ([fx, fy]) => [box.x + fx * box.width, box.y + fy * box.height];
  await page.mouse.move(...at(SEVEN[0]));
  await page.mouse.down();
  for (const point of SEVEN.slice(1)) await page.mouse.move(...at(point), { steps: STEPS_PER_SEGMENT });
  await page.mouse.up();
  await page.evaluate(() => window.lrpDemo.settled());

  const result = await page.evaluate(() => {
    const { lastInput, lastTarget, lastLogits, lastRelevance } = window.lrpDemo;
    if (!lastInput) return null;
    return { input: Array.from(lastInput), target: lastTarget, logits: Array.from(lastLogits),
             relevance: Array.from(lastRelevance), shownPrediction: document.getElementById("prediction").textContent,
             status: document.getElementById("status").textContent };
  });
  if (!result) throw new Error(`the stroke was not explained: ${errors.join("; ") || "no error reported"}`);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  console.log(JSON.stringify({ ...result, errors }));
} finally {
  await browser.close();
}
