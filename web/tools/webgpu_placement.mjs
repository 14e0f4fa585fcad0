/**
 * Which nodes of each ONNX graph have no WebGPU kernel in the pinned onnxruntime-web, in its own words.
 *
 *   node web/tools/webgpu_placement.mjs BUNDLE_DIR GRAPH.onnx [GRAPH.onnx ...]
 *
 * Prints JSON {graph: {adapter, fallbacks: {opType: node count}, error}} on stdout; `error` (else null)
 * is why the WebGPU backend cannot start the graph at all (e.g. 8-bit MatMulNBits). Each graph is started with
 * the WebGPU execution provider in headless Chromium on SwiftShader's software adapter, with verbose
 * logging; onnxruntime-web then reports every node its WebGPU kernel registry cannot take ("webgpu
 * kernel not found in registries for Op type: X"), which run on the WebAssembly CPU provider instead.
 * The registry is matched by domain, opset version and type, so no list of op names could say this
 * (RotaryEmbedding has a kernel for com.microsoft, none for ONNX opset 23). Files are streamed from
 * disk by a server on 127.0.0.1 (an ephemeral port, closed at exit) and the page is opened as
 * http://localhost (a secure context, which WebGPU requires). Not Playwright's request routing:
 * it hands each body to Chromium in one DevTools message, and a full-size fp32 graph (370 MB)
 * closed the page. Exit 1 with one line on stderr when Chromium has no WebGPU adapter.
 */
import { createReadStream, statSync } from 'node:fs';
import { createServer } from 'node:http';
import { dirname, extname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [bundleDir, ...graphs] = process.argv.slice(2);
if (!bundleDir || !graphs.length) {
  console.error('usage: webgpu_placement.mjs BUNDLE_DIR GRAPH.onnx [GRAPH.onnx ...]');
  process.exit(2);
}
const dist = join(dirname(fileURLToPath(import.meta.url)), '..', 'node_modules', 'onnxruntime-web', 'dist');
const TYPES = { '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };
const PAGE = `<!doctype html><script type="module">
import * as ort from '/ort/ort.all.bundle.min.mjs';
ort.env.logLevel = 'verbose';
ort.env.wasm.numThreads = 1;
window.place = async (graph) => {
  const bytes = new Uint8Array(await (await fetch('/bundle/' + graph)).arrayBuffer());
  try {
    const session = await ort.InferenceSession.create(bytes, { executionProviders: ['webgpu'], logSeverityLevel: 0, logVerbosityLevel: 0 });
    await session.release();
    return null;
  } catch (error) {
    // A kernel that claimed a node and then refused its attributes: the last line says which.
    return String(error.message).split('ERROR_MESSAGE: ').pop().split(String.fromCharCode(10))[0];
  }
};
window.adapter = navigator.gpu ? await navigator.gpu.requestAdapter() : null;
window.ready = true;
</script>`;

const root = resolve(bundleDir);
const server = createServer((request, response) => {
  const path = decodeURIComponent(new URL(request.url, 'http://localhost').pathname);
  if (path === '/') return response.writeHead(200, { 'Content-Type': 'text/html' }).end(PAGE);
  const [base, rest] = path.startsWith('/ort/') ? [dist, path.slice(5)] : path.startsWith('/bundle/') ? [root, path.slice(8)] : [null, null];
  const file = base && resolve(base, rest);
  try {
    if (!file || !file.startsWith(base + '/') || !statSync(file).isFile()) throw new Error('not found');
    response.writeHead(200, { 'Content-Type': TYPES[extname(file)] || 'application/octet-stream' });
    createReadStream(file).pipe(response);
  } catch {
    response.writeHead(404).end('not found');
  }
});
await new Promise((done) => server.listen(0, '127.0.0.1', done));
const ORIGIN = `http://localhost:${server.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'],
});
try {
  const page = await browser.newPage();
  let current = null;
  const found = {};
  page.on('console', (message) => {
    // The partitioner may ask twice per node: count node names once.
    const match = /webgpu kernel not found in registries for Op type: (\w+) node name: (.*)$/.exec(message.text());
    if (match && current) (found[current][match[1]] ??= new Set()).add(match[2].trim());
  });
  await page.goto(`${ORIGIN}/`);
  await page.waitForFunction(() => window.ready, null, { timeout: 300000 });
  const adapter = await page.evaluate(() => (window.adapter ? window.adapter.info?.architecture || 'unknown' : null));
  if (!adapter) throw new Error('this Chromium offers no WebGPU adapter (not even SwiftShader)');
  const result = {};
  for (const graph of graphs) {
    current = graph;
    found[graph] = {};
    const error = await page.evaluate((g) => window.place(g), graph);
    result[graph] = { adapter, fallbacks: Object.fromEntries(Object.entries(found[graph]).map(([op, nodes]) => [op, nodes.size])), error };
  }
  console.log(JSON.stringify(result));
} catch (error) {
  console.error(`webgpu placement: ${String(error.message).split('\n')[0]}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  server.close();
}
