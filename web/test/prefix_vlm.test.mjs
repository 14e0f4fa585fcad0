/**
 * prefix_vlm.js and its modules under Node with onnxruntime-web (WebAssembly backend).
 *
 * Unit tests of the decoding helpers run on their own. The parity tests read the references
 * tests/test_web.py computes with the Python runtime (VLM_WEB_FIXTURE): exported bundles in both
 * layouts and variants with their pixel values, greedy and beam-search tokens and captions,
 * plus PIL resizes and Python pixel values. Run them through `pytest tests/test_web.py`.
 */
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { argmax, decodeOptions, makeRng, noRepeatNgram, sample, topk, topKFilter, topPFilter } from '../decoding.js';
import { pixelValues, readPreprocessorConfig, resizeRGB, toRGB } from '../preprocess.js';
import { chooseThreads, pickVariant, PrefixConditioningVLM } from '../prefix_vlm.js';

const FIXTURE = process.env.VLM_WEB_FIXTURE;
// WebAssembly threads for every model these tests load (tests/test_web.py runs them with 1 and 2).
const THREADS = Number(process.env.VLM_WEB_THREADS || 1);
const fixture = FIXTURE ? JSON.parse(readFileSync(FIXTURE, 'utf8')) : null;
const needsFixture = { skip: fixture ? false : 'VLM_WEB_FIXTURE is not set: run `pytest tests/test_web.py`' };

const bytes = (b64) => {
  const buffer = Buffer.from(b64, 'base64');
  return new Uint8Array(buffer.buffer, buffer.byteOffset, buffer.length);
};
const floats = (b64) => {
  const raw = bytes(b64);
  return new Float32Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length));
};

/** fetch over local files, so loadModel runs unchanged in Node; `tamper` may alter a file's bytes. */
function fileFetch(tamper = (url, data) => data) {
  return async (url) => {
    try {
      return new Response(tamper(url, readFileSync(url)));
    } catch {
      return new Response('not found', { status: 404 });
    }
  };
}

// A fake decoder over fixed logits, for the decoding loop alone: each step's logits depend on the
// number of tokens so far; token 0 is EOS.
function fakeModel(table) {
  const logits = (n) => Float32Array.from(table[Math.min(n, table.length - 1)]);
  return {
    firstPass: async () => ({ logits: logits(0), state: 1 }),
    step: async (tokens, state) => ({ logits: Float32Array.from(tokens.flatMap(() => [...logits(state)])), state: state + 1 }),
  };
}

test('topk orders by score, lower index first on ties', () => {
  assert.deepEqual(topk(Float32Array.from([1, 3, 3, 2, 3]), 3), [1, 2, 4]);
  assert.deepEqual(topk([5, -Infinity, 5], 2), [0, 2]);
  assert.equal(argmax(Float32Array.from([0, 7, 7])), 1);
});

test('top-k keeps ties with the k-th score; top-p keeps the most likely tokens', () => {
  assert.deepEqual([...topKFilter(Float32Array.from([1, 2, 2, 0]), 2)], [-Infinity, 2, 2, -Infinity]);
  const kept = topPFilter(Float32Array.from([0, 5, 1, 4]), 0.9, 1);
  assert.deepEqual([...kept].map((v) => v !== -Infinity), [false, true, false, true]);
  assert.deepEqual([...topPFilter(Float32Array.from([0, 5, 1, 4]), 0.01, 2)].map((v) => v !== -Infinity), [false, true, false, true]);
});

test('no-repeat-ngram bans the token that would repeat a bigram', () => {
  const out = noRepeatNgram([5, 6, 5], Float32Array.from([0, 0, 0, 0, 0, 0, 0]), 2);
  assert.equal(out[6], -Infinity);
  assert.equal(out.filter((v) => v === -Infinity).length, 1);
});

test('bad decoding options are all named in one error', () => {
  assert.throws(() => decodeOptions({ maxLength: 0, numBeams: 0, topP: 2 }), /maxLength.*numBeams.*topP/);
  assert.throws(() => decodeOptions({ maxLength: 5, temperature: 0 }), /temperature/);
});

test('greedy stops at EOS; seeded sampling repeats itself; top-k 1 sampling is greedy', async () => {
  const table = [
    [0, 1, 3, 2],
    [0, 3, 1, 2],
    [5, 1, 1, 1],
  ];
  assert.deepEqual(await sample(fakeModel(table), decodeOptions({ maxLength: 8 }), 0, makeRng(null)), [2, 1]);
  const sampled = decodeOptions({ maxLength: 8, doSample: true, temperature: 3 });
  const draws = async (seed) => sample(fakeModel(table), sampled, 0, makeRng(seed));
  assert.deepEqual(await draws(7), await draws(7));
  const runs = await Promise.all([1, 2, 3, 4, 5, 6, 7, 8].map(draws));
  assert.ok(new Set(runs.map(String)).size > 1, 'sampling at temperature 3 never varied');
  const topOne = decodeOptions({ maxLength: 8, doSample: true, topK: 1 });
  assert.deepEqual(await sample(fakeModel(table), topOne, 0, makeRng(3)), [2, 1]);
});

test('resizeRGB equals PIL for every filter and both pass orders', needsFixture, () => {
  for (const c of fixture.resize) {
    const out = resizeRGB(bytes(c.rgb), c.width, c.height, c.outWidth, c.outHeight, c.resample);
    const expected = bytes(c.out);
    const differ = out.reduce((n, v, i) => n + (v !== expected[i]), 0);
    assert.equal(differ, 0, `${c.width}x${c.height} → ${c.outWidth}x${c.outHeight} resample ${c.resample}: ${differ} bytes differ`);
  }
});

test('pixel values from decoded RGB(A) equal Python preprocessing bit for bit', needsFixture, () => {
  const pre = readPreprocessorConfig(fixture.preprocess.config);
  for (const [i, c] of fixture.preprocess.cases.entries()) {
    const rgb = toRGB({ data: bytes(c.data), width: c.width, height: c.height, channels: c.channels });
    const ours = pixelValues(rgb, c.width, c.height, pre);
    const theirs = floats(c.pixels);
    assert.equal(ours.length, theirs.length);
    const differ = ours.reduce((n, v, j) => n + (v !== theirs[j]), 0);
    assert.equal(differ, 0, `image ${i} (${c.channels} channels): ${differ} values differ`);
  }
});

for (const reference of fixture?.bundles ?? []) {
  test(`${reference.name}: greedy and beam-search tokens and captions equal the Python runtime's`, async () => {
    const model = await new PrefixConditioningVLM().loadModel(reference.dir, { variant: reference.variant, fetch: fileFetch(), numThreads: THREADS });
    assert.equal(model.threads, THREADS);
    const pixels = { data: floats(reference.pixels), dims: reference.dims };
    assert.deepEqual(await model.generateTokens(pixels), reference.greedy);
    // One cached step per token after the first, none after EOS: a caption of n < max tokens took n steps.
    const max = model.manifest.model.max_length;
    assert.equal(model.lastTimings.stepCount, reference.greedy.reduce((n, t) => n + (t.length < max ? t.length : max - 1), 0));
    assert.deepEqual(await model.generateTokens(pixels, { numBeams: 3 }), reference.beam3);
    assert.deepEqual(await model.generate(pixels), reference.captions);
    await model.dispose();
  });
}

test('loadModel reports progress up to 100%, names a missing variant, and rejects a changed file', needsFixture, async () => {
  const { dir } = fixture.bundles[0];
  const seen = [];
  const model = await new PrefixConditioningVLM().loadModel(dir, { fetch: fileFetch(), onProgress: (message, percent) => seen.push(percent) });
  assert.ok(seen.length > 3 && seen.every((p, i) => i === 0 || p >= seen[i - 1]), 'progress went backwards');
  assert.equal(seen.at(-1), 100);
  assert.ok(model.loadTimings.total > 0);
  await model.dispose();
  await assert.rejects(new PrefixConditioningVLM().loadModel(dir, { variant: 'q9', fetch: fileFetch() }), /variant "q9" is not in this bundle \(it has fp32, int8\)/);
  const flipByte = (url, data) => {
    if (!url.endsWith('projection.onnx')) return data;
    const copy = Uint8Array.from(data);
    copy[copy.length - 1] ^= 1;
    return copy;
  };
  await assert.rejects(new PrefixConditioningVLM().loadModel(dir, { fetch: fileFetch(flipByte) }), /projection\.onnx does not match its manifest sha256/);
});

test('seeded sampling on a real bundle repeats itself, and top-k 1 sampling equals greedy', needsFixture, async () => {
  const reference = fixture.bundles[0];
  const model = await new PrefixConditioningVLM().loadModel(reference.dir, { fetch: fileFetch() });
  const pixels = { data: floats(reference.pixels), dims: reference.dims };
  const options = { doSample: true, temperature: 1.5, seed: 11 };
  assert.deepEqual(await model.generateTokens(pixels, options), await model.generateTokens(pixels, options));
  assert.deepEqual(await model.generateTokens(pixels, { doSample: true, topK: 1, seed: 5 }), reference.greedy);
  await model.dispose();
});

/** Runs `fn` with globalThis.crossOriginIsolated and navigator.hardwareConcurrency as a browser would set them. */
function asBrowser(isolated, cores, fn) {
  const saved = Object.getOwnPropertyDescriptors(globalThis);
  Object.defineProperty(globalThis, 'crossOriginIsolated', { value: isolated, configurable: true });
  Object.defineProperty(globalThis, 'navigator', { value: { hardwareConcurrency: cores }, configurable: true });
  try {
    return fn();
  } finally {
    for (const name of ['crossOriginIsolated', 'navigator']) {
      if (saved[name]) Object.defineProperty(globalThis, name, saved[name]);
      else delete globalThis[name];
    }
  }
}

test('threads: all cores up to 4 when cross-origin isolated, 1 with a reason when not, numThreads overrides', () => {
  assert.deepEqual(asBrowser(true, 2, () => chooseThreads()), { threads: 2, note: null });
  assert.deepEqual(asBrowser(true, 16, () => chooseThreads()), { threads: 4, note: null });
  assert.deepEqual(asBrowser(true, 16, () => chooseThreads(8)), { threads: 8, note: null });
  const alone = asBrowser(false, 8, () => chooseThreads());
  assert.equal(alone.threads, 1);
  assert.match(alone.note, /not cross-origin isolated.*COOP\/COEP/);
  assert.equal(asBrowser(false, 8, () => chooseThreads(4)).threads, 1);
  assert.deepEqual(chooseThreads(), { threads: 1, note: null }); // Node: no isolation concept, 1 unless asked
  assert.throws(() => chooseThreads(0), /numThreads must be a whole number/);
});

test('the default variant is the fastest one that passed its check', () => {
  const manifest = (checks) => ({ variants: { fp32: {}, int8: {}, fp16: {} }, checks });
  assert.equal(pickVariant(manifest({ fp32: { passed: true }, int8: { passed: true } })), 'int8');
  assert.equal(pickVariant(manifest({ fp32: { passed: true }, int8: { passed: false } })), 'fp32');
  assert.equal(pickVariant(manifest({})), 'int8'); // nothing checked: the fastest present
  // A blockwise (MatMulNBits) int8 is the slowest in the browser: fp32 goes first.
  const blockwise = { variants: { fp32: { d: 'd.onnx' }, int8: { d: 'd_int8.onnx' } }, files: { 'd_int8.onnx': { ops: ['Add', 'com.microsoft.MatMulNBits'] } }, checks: { fp32: { passed: true }, int8: { passed: true } } };
  assert.equal(pickVariant(blockwise), 'fp32');
});

test('device webgpu falls back to WebAssembly with a note where there is no adapter; an unknown device is refused', needsFixture, async () => {
  const { dir } = fixture.bundles[0];
  const model = await new PrefixConditioningVLM().loadModel(dir, { fetch: fileFetch(), device: 'webgpu', numThreads: THREADS });
  assert.equal(model.device, 'wasm');
  assert.match(model.notes.join(' '), /WebGPU is not available here.*WebAssembly/);
  assert.equal(model.loadStats.downloaded.length, model.loadStats.downloaded.length + model.loadStats.fromCache.length); // no Cache Storage in Node
  await model.dispose();
  await assert.rejects(new PrefixConditioningVLM().loadModel(dir, { fetch: fileFetch(), device: 'webgl' }), /device "webgl" is not one this class runs/);
});

test('graphs arrive smallest first, and a session starts while a larger graph is still downloading', needsFixture, async () => {
  const { dir } = fixture.bundles[0];
  const manifest = JSON.parse(readFileSync(`${dir}/vlmexport.json`, 'utf8'));
  const bySize = Object.values(manifest.variants.fp32).sort((a, b) => manifest.files[a].size - manifest.files[b].size);
  const largest = bySize.at(-1);
  const events = [];
  let release;
  const held = new Promise((resolve) => {
    release = (why) => {
      if (!events.some((e) => e.startsWith('released'))) events.push(why);
      resolve();
    };
  });
  // Without overlap no session could start before the largest graph arrives: the timer ends the wait.
  const timer = setTimeout(() => release('released by timeout'), 5000);
  const plain = fileFetch();
  const fetchFn = async (url) => {
    const rel = bySize.find((graph) => url.endsWith(`/${graph}`));
    if (rel) events.push(`fetch ${rel}`);
    if (rel === largest) {
      await held;
      events.push(`delivered ${rel}`);
    }
    return plain(url);
  };
  const onProgress = (message) => {
    if (message.startsWith('starting ')) {
      events.push(message);
      release('released after a session started');
    }
  };
  const model = await new PrefixConditioningVLM().loadModel(dir, { fetch: fetchFn, onProgress, numThreads: THREADS });
  clearTimeout(timer);
  assert.deepEqual(events.filter((e) => e.startsWith('fetch ')), bySize.map((rel) => `fetch ${rel}`));
  // A session started before the largest graph was delivered (a sequential loader waits for the timer).
  assert.ok(events.includes('released after a session started'), events.join(' | '));
  assert.ok(events.findIndex((e) => e.startsWith('starting ')) < events.indexOf(`delivered ${largest}`), events.join(' | '));
  await model.dispose();
});

/** Cache Storage as a browser has it, in memory (Node has none): what loadModel stores and reads. */
function memoryCaches() {
  const entries = new Map();
  const store = {
    entries,
    match: async (key) => (entries.has(key) ? new Response(entries.get(key)) : undefined),
    put: async (key, response) => void entries.set(key, new Uint8Array(await response.arrayBuffer())),
    keys: async () => [...entries.keys()].map((url) => ({ url })),
    delete: async (request) => entries.delete(request.url ?? request),
  };
  return { store, caches: { open: async () => store, delete: async () => entries.clear() || true } };
}

test('the cache keeps files in parts, reads them back whole, and downloads a file again when a part is gone', needsFixture, async () => {
  const reference = fixture.bundles[0];
  const { dir } = reference;
  const { store, caches } = memoryCaches();
  const saved = [globalThis.caches, PrefixConditioningVLM.cachePartBytes];
  globalThis.caches = caches;
  PrefixConditioningVLM.cachePartBytes = 4096;
  try {
    const manifest = JSON.parse(readFileSync(`${dir}/vlmexport.json`, 'utf8'));
    const largest = Object.values(manifest.variants.fp32).sort((a, b) => manifest.files[b].size - manifest.files[a].size)[0];
    const parts = Math.ceil(manifest.files[largest].size / 4096);
    assert.ok(parts > 1, `${largest} is too small to need parts`);
    const load = () => new PrefixConditioningVLM().loadModel(dir, { fetch: fileFetch(), numThreads: THREADS });
    const first = await load();
    assert.equal(first.loadStats.fromCache.length, 0);
    const sha = manifest.files[largest].sha256;
    const keys = [...store.entries.keys()].filter((key) => key.includes(`/sha256/${sha}/`));
    assert.equal(keys.length, parts);
    await first.dispose();

    const second = await load();
    assert.equal(second.loadStats.downloadedBytes, 0);
    assert.deepEqual(await second.generateTokens({ data: floats(reference.pixels), dims: reference.dims }), reference.greedy);
    await second.dispose();

    store.entries.delete(keys.at(-1));
    const third = await load();
    assert.deepEqual(third.loadStats.downloaded, [largest]);
    await third.dispose();
  } finally {
    [globalThis.caches, PrefixConditioningVLM.cachePartBytes] = saved;
  }
});

test('a failed load of another variant leaves the loaded model running', needsFixture, async () => {
  const reference = fixture.bundles[0];
  const model = await new PrefixConditioningVLM().loadModel(reference.dir, { fetch: fileFetch(), numThreads: THREADS });
  const manifest = JSON.parse(readFileSync(`${reference.dir}/vlmexport.json`, 'utf8'));
  const last = Object.values(manifest.variants.int8).sort((a, b) => manifest.files[a].size - manifest.files[b].size).at(-1);
  const flipLast = (url, data) => (url.endsWith(`/${last}`) ? Uint8Array.from(data, (b, i) => (i === data.length - 1 ? b ^ 1 : b)) : data);
  await assert.rejects(model.loadModel(reference.dir, { variant: 'int8', fetch: fileFetch(flipLast), numThreads: THREADS }), /does not match its manifest sha256/);
  assert.equal(model.variant, 'fp32');
  assert.deepEqual(await model.generateTokens({ data: floats(reference.pixels), dims: reference.dims }), reference.greedy);
  await model.dispose();
});
