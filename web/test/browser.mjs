/**
 * Drive the demo page in headless Chromium (Debian's /usr/bin/chromium through playwright-core):
 * open it from a running `vlmexport serve` (or any static server of a `vlmexport site` folder), pick a
 * variant, caption images through the page's own file input, and print what the page showed as JSON
 * on stdout, with every request the page made.
 *
 *   node web/test/browser.mjs --url http://127.0.0.1:8000/ [--variant int8] --image a.png [--image b.png]
 *        [--repeat 3] [--threads 2] [--device webgpu] [--compare] [--screenshot docs/demo.png]
 *        [--profile DIR] [--clear-cache] [--keep-going] [--webgpu]
 *
 * --profile keeps the browser profile (Cache Storage, service workers) in DIR, so a second run is a
 * second visit. --keep-going records a page error per image (a non-image) instead of stopping.
 * --webgpu starts Chromium with WebGPU on a software adapter (SwiftShader) where it has one.
 * Used by tests/test_web.py (the caption must equal Python's) and bench/web_bench.py (timings).
 * Exit 1 with a message on stderr when the page reports an error or times out.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    variant: { type: 'string' },
    device: { type: 'string' },
    profile: { type: 'string' },
    'clear-cache': { type: 'boolean', default: false },
    'keep-going': { type: 'boolean', default: false },
    webgpu: { type: 'boolean', default: false },
    image: { type: 'string', multiple: true, default: [] },
    repeat: { type: 'string', default: '1' },
    compare: { type: 'boolean', default: false },
    screenshot: { type: 'string' },
    threads: { type: 'string' },
    timeout: { type: 'string', default: '120000' },
  },
});
if (!args.url) {
  console.error('usage: browser.mjs --url URL [--variant V] --image FILE ... [--repeat N] [--compare] [--screenshot PNG]');
  process.exit(2);
}
const timeout = Number(args.timeout);

// The flags this machine needs (docs: .library machines/python.md): no sandbox as root, no GPU,
// and no background networking, which the closed network would refuse many times over.
// --webgpu: SwiftShader's Vulkan adapter instead of no GPU at all.
const gpu = args.webgpu ? ['--enable-unsafe-webgpu', '--enable-features=Vulkan', '--use-angle=swiftshader', '--use-webgpu-adapter=swiftshader'] : ['--disable-gpu'];
// A persistent profile either way, so service workers and Cache Storage behave as for a user.
const profile = args.profile || mkdtempSync(join(tmpdir(), 'vlm-chromium-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  viewport: { width: 960, height: 640 },
  deviceScaleFactor: 1,
  args: ['--no-sandbox', ...gpu, '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const messages = [];
const requests = [];
try {
  const page = context.pages()[0] || (await context.newPage());
  // Every request the page and its service worker send to the server (not Cache Storage hits).
  context.on('request', (r) => requests.push(new URL(r.url()).pathname));
  page.on('console', (m) => messages.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => messages.push(`pageerror: ${e.message}`));
  const settled = (states) => page.waitForFunction((s) => s.includes(window.vlmDemo?.state), states, { timeout });
  const failIfError = async () => {
    const state = await page.evaluate(() => ({ state: window.vlmDemo?.state, error: window.vlmDemo?.error }));
    if (state.state === 'error') throw new Error(`the page reports: ${state.error}`);
  };

  const query = new URLSearchParams();
  for (const key of ['variant', 'threads', 'device']) if (args[key]) query.set(key, args[key]);
  const started = Date.now();
  await page.goto(new URL(`?${query}`, args.url).href);
  await settled(['ready', 'error']);
  await failIfError();
  const visitMs = Date.now() - started;
  const loadRequests = [...requests];
  const { isolated, cores } = await page.evaluate(() => ({ isolated: globalThis.crossOriginIsolated, cores: navigator.hardwareConcurrency }));
  const results = [];
  for (const image of args.image) {
    for (let r = 0; r < Number(args.repeat); r++) {
      // A new file each time (clearing first), so the change event fires even for the same path;
      // the page counts finished captions, so a fast one cannot be missed.
      const before = await page.evaluate(() => window.vlmDemo.captions);
      await page.evaluate(() => { window.vlmDemo.error = null; });
      await page.setInputFiles('#file', []);
      await page.setInputFiles('#file', image);
      await page.waitForFunction((n) => window.vlmDemo.captions > n || window.vlmDemo.state === 'error', before, { timeout });
      if (args['keep-going']) {
        const error = await page.evaluate(() => (window.vlmDemo.state === 'error' ? window.vlmDemo.error : null));
        if (error) {
          results.push({ image, error, shownError: await page.textContent('#error') });
          continue;
        }
      }
      await failIfError();
      const last = await page.evaluate(() => window.vlmDemo.last);
      let python = null;
      if (args.compare && r === Number(args.repeat) - 1) {
        await page.click('#compare');
        await page.waitForFunction(() => window.vlmDemo.python || window.vlmDemo.state === 'error', null, { timeout });
        await failIfError();
        python = await page.evaluate(() => window.vlmDemo.python);
      }
      results.push({ image, caption: last.caption, tokens: last.tokens, timings: last.timings, shown: await page.textContent('#caption'), python });
    }
  }
  if (args.screenshot) await page.screenshot({ path: args.screenshot, fullPage: true });
  const shown = await page.evaluate(() => ({ threads: document.getElementById('threads').textContent, status: document.getElementById('status').textContent }));
  const { loadTimings, loadStats, threads, device, notes } = await page.evaluate(() => window.vlmDemo);
  const variant = await page.evaluate(() => document.getElementById('variant').value);
  if (args['clear-cache']) {
    await page.click('#clearCache');
    await page.waitForFunction(() => window.vlmDemo.cleared > 0, null, { timeout });
  }
  const cacheEntries = await page.evaluate(async () => (globalThis.caches ? (await (await caches.open('vlmexport-bundle-v1')).keys()).length : null));
  console.log(JSON.stringify({ variant, device, crossOriginIsolated: isolated, hardwareConcurrency: cores, threads, shown, visitMs, loadTimings, loadStats, loadRequests, cacheEntries, notes, results, messages }));
} catch (error) {
  console.error(`${error.message}\n--- page console ---\n${messages.join('\n')}`);
  process.exitCode = 1;
} finally {
  await context.close();
  if (!args.profile) rmSync(profile, { recursive: true, force: true });
}
