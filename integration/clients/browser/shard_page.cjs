// Drives shardgate's shard page in headless Chromium (Debian's /usr/bin/chromium) with
// playwright-core, for integration/tests/operators.rs. Protocol on stdout/stdin:
//   prints  SHARDS <json>   the managed topic's shards as the page draws them
//   reads   a line          (the test changed the map), then waits, without reloading, until
//                           the page draws another set of shards, and prints SHARDS again
//   saves   a full-page screenshot to SCREENSHOT and exits 0.
// Usage: node shard_page.cjs ADMIN_URL TOPIC SCREENSHOT   (PLAYWRIGHT_CORE: the module's path)
"use strict";
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");
const readline = require("readline");

const [admin, topic, screenshot] = process.argv.slice(2);
const lines = readline.createInterface({ input: process.stdin });
const nextLine = () => new Promise(resolve => lines.once("line", resolve));

async function shown(page) {
  return page.$$eval(`section[data-topic="${topic}"] .bar .shard`, boxes => boxes.map(b => ({
    id: Number(b.dataset.shard), start: b.dataset.start, end: b.dataset.end,
    partition: Number(b.dataset.partition), state: b.dataset.state,
  })));
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    // This machine has no route out: without these Chromium keeps trying Google's hosts.
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
    const errors = [];
    page.on("pageerror", e => errors.push(String(e)));
    page.on("console", m => { if (m.type() === "error") errors.push(m.text()); });
    await page.goto(admin.replace(/\/$/, "") + "/", { waitUntil: "load" });
    await page.waitForSelector(`section[data-topic="${topic}"] .bar .shard`, { timeout: 20000 });
    const before = await shown(page);
    console.log("SHARDS " + JSON.stringify(before));
    await nextLine();
    const key = s => JSON.stringify(s.map(x => [x.id, x.start, x.end, x.partition]));
    const deadline = Date.now() + 20000;
    let after = before;
    while (key(after) === key(before) && Date.now() < deadline) {
      await page.waitForTimeout(250);
      after = await shown(page);
    }
    // One more refresh so the load columns are drawn for the new shards too.
    await page.waitForTimeout(2500);
    after = await shown(page);
    console.log("SHARDS " + JSON.stringify(after));
    await page.screenshot({ path: screenshot, fullPage: true });
    if (errors.length) console.log("PAGE_ERRORS " + JSON.stringify(errors));
  } finally {
    await browser.close();
  }
  lines.close();
})().catch(e => { console.error(e); process.exit(1); });
