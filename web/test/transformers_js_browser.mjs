/**
 * transformers.js' browser build in headless Chromium (Debian's /usr/bin/chromium through
 * playwright-core) captions with a vlmexport `--layout transformers.js` folder.
 *
 *   node test/transformers_js_browser.mjs --fixture FIXTURE.json [--dtype fp32]
 *
 *   --dtype takes a comma-separated list (fp32,int8): one page load, each dtype in turn.
 *
 * FIXTURE is what tests/test_transformers_js.py writes (bundle folder, images, Python's tokens).
 * Every request of the page goes to a made-up origin that playwright answers from local files
 * (the pinned npm packages, the folder, the images): nothing reaches a network, and transformers.js
 * is told to load local models only. Prints {dtype: {"greedy": [...], "beam": [...]}, ...} as JSON.
 */
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

import { chromium } from 'playwright-core';

const { values: args } = parseArgs({
  options: { fixture: { type: 'string' }, dtype: { type: 'string', default: 'fp32' }, timeout: { type: 'string', default: '120000' } },
});
const fixture = JSON.parse(readFileSync(args.fixture, 'utf8'));
const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const TJS = path.join(WEB, 'node_modules', '@huggingface', 'transformers');
const ORIGIN = 'http://vlmexport.test';
const MODEL = path.basename(fixture.bundle);

// URL path prefix → local folder. The ONNX Runtime Web files are the ones transformers.js
// bundles its JavaScript for (its own, nested, onnxruntime-web).
const ROOTS = {
  '/tjs/': path.join(TJS, 'dist'),
  '/ort/': path.join(TJS, 'node_modules', 'onnxruntime-web', 'dist'),
  '/web/': WEB,
  [`/models/${MODEL}/`]: fixture.bundle,
};
const IMAGES = Object.fromEntries(fixture.images.map((file, i) => [`/images/${i}${path.extname(file)}`, file]));

const PAGE = `<!doctype html><meta charset="utf-8">
<script type="importmap">{"imports": {"@huggingface/transformers": "/tjs/transformers.js"}}</script>
<script type="module">
import { AutoModelForImageTextToText, AutoProcessor, RawImage, Tensor, env } from '@huggingface/transformers';
import { beamSearchCaption } from '/web/transformers_js_beam.js';
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = '/models/';
env.useBrowserCache = false;
env.backends.onnx.wasm.wasmPaths = '/ort/';
env.backends.onnx.wasm.numThreads = 1;
const strip = (ids, eos) => (ids.indexOf(eos) >= 0 ? ids.slice(0, ids.indexOf(eos)) : ids);
window.caption = async ({ model: id, dtype, images, prefixLength, eos }) => {
  const processor = await AutoProcessor.from_pretrained(id);
  const model = await AutoModelForImageTextToText.from_pretrained(id, { dtype, device: 'wasm' });
  const greedy = [], beam = [];
  for (const url of images) {
    const inputs = await processor(await RawImage.read(url), '<image>', { add_special_tokens: false });
    const out = await model.generate({ ...inputs, do_sample: false });
    greedy.push(strip(out.tolist()[0].slice(prefixLength).map(Number), eos));
    beam.push(await beamSearchCaption(model, inputs, { numBeams: 3, noRepeatNgramSize: 1 }));
  }
  return { greedy, beam, className: model.constructor.name };
};
window.ready = true;
</script>`;

function localFile(pathname) {
  if (IMAGES[pathname]) return IMAGES[pathname];
  for (const [prefix, root] of Object.entries(ROOTS)) {
    if (!pathname.startsWith(prefix)) continue;
    const file = path.resolve(root, decodeURIComponent(pathname.slice(prefix.length)));
    return file.startsWith(path.resolve(root) + path.sep) ? file : null;
  }
  return null;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const messages = [];
const outside = [];
try {
  const page = await browser.newPage();
  page.on('console', (m) => messages.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => messages.push(`pageerror: ${e.message}`));
  await page.route('**/*', async (route) => {
    const url = new URL(route.request().url());
    if (url.origin !== ORIGIN) {
      outside.push(url.href); // a CDN or hub request: refused, and reported
      return route.abort();
    }
    if (url.pathname === '/') return route.fulfill({ body: PAGE, contentType: 'text/html' });
    const file = localFile(url.pathname);
    let body = null;
    try {
      body = file && readFileSync(file);
    } catch {
      body = null;
    }
    if (!body) return route.fulfill({ status: 404, body: 'not found' });
    const type = { '.mjs': 'text/javascript', '.js': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json', '.png': 'image/png' }[path.extname(file)];
    return route.fulfill({ body, contentType: type ?? 'application/octet-stream' });
  });
  await page.goto(`${ORIGIN}/`);
  await page.waitForFunction(() => window.ready === true, null, { timeout: Number(args.timeout) });
  const results = {};
  for (const dtype of args.dtype.split(',')) {
    const options = { model: MODEL, dtype, images: Object.keys(IMAGES), prefixLength: fixture.prefix_length, eos: fixture.eos };
    results[dtype] = await page.evaluate((o) => window.caption(o), options);
  }
  console.log(JSON.stringify({ results, outside, messages }));
} catch (error) {
  console.error(`${error.message}\n${messages.join('\n')}\noutside requests: ${outside.join(', ')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
