// Drives a web bundle's page in headless Chromium (the system browser, as puppeteer-core needs none of its own) and
// prints what the page stored in window.edgekitResult as one JSON line. Used by tests/test_web.py and
// benchmarks/browser.py.
//
//   node web/drive.mjs URL [--timeout 300] [--chromium /usr/bin/chromium]
//
// The page imports its runtime from a CDN at a pinned version (e.g. https://cdn.jsdelivr.net/npm/@wllama/wllama@3.13.0);
// requests under a CDN package URL are answered from this folder's node_modules/<package> when the version matches,
// so the page runs unchanged and offline.
import { readFile } from "node:fs/promises";
import path from "node:path";
import { fileURLToPath } from "node:url";
import puppeteer from "puppeteer-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, dflt) => { const i = args.indexOf(name); return i >= 0 ? args[i + 1] : dflt; };
const url = args[0];
const timeout = Number(opt("--timeout", "300")) * 1000;
const chromium = opt("--chromium", process.env.CHROMIUM || "/usr/bin/chromium");
const CDN = /^https:\/\/cdn\.jsdelivr\.net\/npm\/((?:@[^/]+\/)?[^/@]+)@([^/]+)\/(.*)$/;
const TYPES = { ".js": "text/javascript", ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json" };

const browser = await puppeteer.launch({ executablePath: chromium, headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-features=SharedArrayBuffer"] });
try {
  const page = await browser.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  page.on("response", (r) => { if (r.status() >= 400) logs.push(`http ${r.status()}: ${r.url()}`); });
  await page.setRequestInterception(true);
  page.on("request", async (req) => {
    const m = req.url().match(CDN);
    if (!m) return req.continue();
    const [, pkg, version, rest] = m;
    try {
      const meta = JSON.parse(await readFile(path.join(here, "node_modules", pkg, "package.json"), "utf8"));
      if (meta.version !== version) throw new Error(`node_modules has ${pkg}@${meta.version}, the page wants ${version}`);
      const file = path.join(here, "node_modules", pkg, rest.split("?")[0]);
      await req.respond({ status: 200, body: await readFile(file),
        headers: { "Content-Type": TYPES[path.extname(file)] || "application/octet-stream",
                   "Access-Control-Allow-Origin": "*", "Cross-Origin-Resource-Policy": "cross-origin" } });
    } catch (e) {
      logs.push(`cdn: ${req.url()}: ${e.message}`);
      await req.respond({ status: 404, body: String(e.message) });
    }
  });
  const t0 = Date.now();
  await page.goto(url, { waitUntil: "domcontentloaded", timeout });
  await page.waitForFunction("window.edgekitResult && window.edgekitResult.done", { timeout: timeout - (Date.now() - t0),
                                                                                    polling: 200 });
  const result = await page.evaluate(() => window.edgekitResult);
  result.browser = await browser.version();
  result.hardware_concurrency = await page.evaluate(() => navigator.hardwareConcurrency);
  result.logs = logs.slice(-30);
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
