/**
 * Drive the demo page in headless Chromium (Debian's /usr/bin/chromium through playwright-core):
 * open it from a running `vlmexport serve`, pick a variant, caption images through the page's
 * own file input, and print what the page showed as JSON on stdout.
 *
 *   node web/test/browser.mjs --url http://127.0.0.1:8000/ --variant int8 --image a.png [--image b.png]
 *        [--repeat 3] [--threads 1] [--compare] [--screenshot docs/demo.png]
 *
 * Used by tests/test_web.py (the caption must equal Python's) and bench/web_bench.py (timings).
 * Exit 1 with a message on stderr when the page reports an error or times out.
 */
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

const { values: args } = parseArgs({
  options: {
    url: { type: 'string' },
    variant: { type: 'string', default: 'fp32' },
    image: { type: 'string', multiple: true, default: [] },
    repeat: { type: 'string', default: '1' },
    compare: { type: 'boolean', default: false },
    screenshot: { type: 'string' },
    threads: { type: 'string', default: '1' },
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
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const messages = [];
try {
  const page = await browser.newPage({ viewport: { width: 960, height: 640 }, deviceScaleFactor: 1 });
  page.on('console', (m) => messages.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => messages.push(`pageerror: ${e.message}`));
  const settled = (states) => page.waitForFunction((s) => s.includes(window.vlmDemo?.state), states, { timeout });
  const failIfError = async () => {
    const state = await page.evaluate(() => ({ state: window.vlmDemo?.state, error: window.vlmDemo?.error }));
    if (state.state === 'error') throw new Error(`the page reports: ${state.error}`);
  };

  await page.goto(new URL(`?variant=${encodeURIComponent(args.variant)}&threads=${Number(args.threads)}`, args.url).href);
  await settled(['ready', 'error']);
  await failIfError();
  const isolated = await page.evaluate(() => globalThis.crossOriginIsolated);
  const results = [];
  for (const image of args.image) {
    for (let r = 0; r < Number(args.repeat); r++) {
      // A new file each time (clearing first), so the change event fires even for the same path;
      // the page counts finished captions, so a fast one cannot be missed.
      const before = await page.evaluate(() => window.vlmDemo.captions);
      await page.setInputFiles('#file', []);
      await page.setInputFiles('#file', image);
      await page.waitForFunction((n) => window.vlmDemo.captions > n || window.vlmDemo.state === 'error', before, { timeout });
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
  const loadTimings = await page.evaluate(() => window.vlmDemo.loadTimings);
  console.log(JSON.stringify({ variant: args.variant, crossOriginIsolated: isolated, loadTimings, results, messages }));
} catch (error) {
  console.error(`${error.message}\n--- page console ---\n${messages.join('\n')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
