/**
 * PrefixConditioningVLM: caption images with a vlmexport ONNX bundle in ONNX Runtime Web
 * (WebAssembly), in a browser or in Node.
 *
 *   import { PrefixConditioningVLM } from './prefix_vlm.js';
 *   const model = await new PrefixConditioningVLM().loadModel('/bundle/', {
 *     variant: 'int8', onProgress: (message, percent) => console.log(message, percent) });
 *   const caption = await model.caption(fileFromAnInput);   // "a red circle on a blue background"
 *
 * The bundle's manifest (vlmexport.json) names the graphs of each variant and both layouts:
 * `distilvit` (prefix_init + language_model) and `compact` (one decoder taking
 * prefix_embeddings, input_ids, attention_mask, position_ids and the past; the first pass has an
 * empty past, each later step an empty prefix). Every file is checked against the manifest's
 * size and sha256. Graph inputs and outputs are float32 in every variant (the quantized and
 * fp16 variants keep float32 IO), so caches pass from one call to the next untouched. Generation mirrors vlmexport/runtime/generate.py (see decoding.js);
 * preprocessing mirrors vlmexport/bundle/preprocess.py (see preprocess.js); text comes from
 * the bundle's tokenizer.json through @huggingface/tokenizers.
 *
 * Bare imports ('onnxruntime-web', '@huggingface/tokenizers') resolve from node_modules in Node
 * and through the import map of demo.html in a browser; `device: 'webgpu'` imports
 * 'onnxruntime-web/all' (the build with the WebGPU backend) on first use only.
 *
 * Threads: WebAssembly threads need SharedArrayBuffer, which a browser grants only to a
 * cross-origin isolated page (COOP/COEP headers, or the service worker `vlmexport site` writes).
 * There the default is navigator.hardwareConcurrency threads, at most 4; onnxruntime-web's own
 * default, min(4, ceil(cores / 2)), leaves a 2-core machine on one thread (measured 1.58x slower).
 *
 * Cache: every file is kept in Cache Storage under its manifest sha256 (in parts of at most 128 MB:
 * Chromium refused a 538 MB entry), so a second visit fetches only vlmexport.json and a
 * re-exported file is fetched alone; `clearCache()` deletes it.
 *
 * Load order: files arrive one at a time, the smallest graph first, and each graph's session is
 * created as soon as it is here while the next one downloads (or is read from the cache), so a
 * load costs about max(transfer, session creation) instead of their sum. Loading another variant
 * into a loaded model waits for every new file first, so a failed download leaves the model running.
 */
import * as wasmRuntime from 'onnxruntime-web';
import { Tokenizer } from '@huggingface/tokenizers';

import { beamSearch, decodeOptions, makeRng, sample } from './decoding.js';
import { imageToRGBA, pixelValues, readPreprocessorConfig, toRGB } from './preprocess.js';

export const MANIFEST = 'vlmexport.json';
const LAYOUTS = {
  distilvit: ['vision_encoder', 'projection', 'prefix_init', 'language_model'],
  compact: ['vision_encoder', 'projection', 'decoder'],
};
const SIDE_FILES = ['preprocessor_config.json', 'tokenizer.json', 'tokenizer_config.json'];
const OPTIONAL_FILES = ['generation_config.json'];
export const CACHE_NAME = 'vlmexport-bundle-v1';
const MAX_THREADS = 4;
// Variants from fastest to slowest caption in Chromium's WebAssembly at full size (smollm-135m-siglip-base,
// bench/web_bench.py, the README's browser table: dynamic int8 3.8 s, fp32 7.6 s, fp16 8.5 s, q4 25 s,
// blockwise int8/uint8 55-65 s); the demo takes the first one that passed its check. 8-bit MatMulNBits
// (the blockwise recipe) is that slow in onnxruntime-web 1.30, so such a variant ranks last.
export const SPEED_ORDER = ['int8', 'uint8', 'fp32', 'fp16', 'q4'];
const blockwise8 = (manifest, variant) =>
  ['int8', 'uint8'].includes(variant) && Object.values(manifest.variants[variant]).some((rel) => manifest.files?.[rel]?.ops?.includes('com.microsoft.MatMulNBits'));

// The runtime every tensor and session comes from: the WebAssembly build, or the build with
// WebGPU once a model is loaded with device 'webgpu' (a tensor must come from its session's runtime).
let ort = wasmRuntime;

const now = () => globalThis.performance.now();

function joinUrl(base, relative) {
  return base.endsWith('/') ? base + relative : `${base}/${relative}`;
}

async function fetchOk(fetchFn, url, init) {
  const response = await fetchFn(url, init);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  return response;
}

/**
 * The bundle's manifest, checked to be one this class can run.
 * @param {string} baseUrl folder URL of the bundle (relative URLs work in a browser)
 * @param {typeof fetch} [fetchFn]
 */
export async function readManifest(baseUrl, fetchFn = globalThis.fetch) {
  // Always asked of the server (revalidated, never taken from the HTTP cache unchecked): it says
  // which cached files are still current.
  const manifest = await (await fetchOk(fetchFn, joinUrl(baseUrl, MANIFEST), { cache: 'no-cache' })).json();
  if (manifest.schema_version !== 1 || !(manifest.layout in LAYOUTS)) {
    throw new Error(`${joinUrl(baseUrl, MANIFEST)} is not a vlmexport manifest this page can run (schema ${manifest.schema_version}, layout ${manifest.layout}): re-export with vlmexport export`);
  }
  return manifest;
}

/**
 * The threads a page may use and why: `requested` when given, else navigator.hardwareConcurrency
 * (at most 4) on a cross-origin isolated page, else 1 — SharedArrayBuffer, which threads need,
 * exists only there. In Node (no crossOriginIsolated) the default is 1, `requested` is honoured.
 * @returns {{threads: number, note: string|null}}
 */
export function chooseThreads(requested) {
  const isolated = globalThis.crossOriginIsolated;
  if (requested !== undefined && requested !== null) {
    const threads = Number(requested);
    if (!Number.isInteger(threads) || threads < 1) throw new Error(`numThreads must be a whole number ≥ 1, not ${requested}`);
    if (threads > 1 && isolated === false) {
      return { threads: 1, note: `${threads} threads were asked for but this page is not cross-origin isolated (no COOP/COEP headers), so WebAssembly runs on 1 thread: serve it with vlmexport serve or vlmexport site` };
    }
    return { threads, note: null };
  }
  if (isolated === true) return { threads: Math.max(1, Math.min(MAX_THREADS, globalThis.navigator?.hardwareConcurrency || 1)), note: null };
  if (isolated === false) {
    return { threads: 1, note: 'this page is not cross-origin isolated (no COOP/COEP headers), so WebAssembly runs on 1 thread: serve it with vlmexport serve or vlmexport site for threads' };
  }
  return { threads: 1, note: null };
}

/** The variant a page should load by default: the first of SPEED_ORDER (blockwise 8-bit variants last)
 * that the bundle has and whose last check passed, else the first it has. */
export function pickVariant(manifest) {
  const ranked = SPEED_ORDER.filter((v) => manifest.variants[v]);
  const present = [...ranked.filter((v) => !blockwise8(manifest, v)), ...ranked.filter((v) => blockwise8(manifest, v))];
  return present.find((v) => manifest.checks?.[v]?.passed === true) ?? present[0] ?? Object.keys(manifest.variants)[0];
}

/** Cache Storage for bundle files, or null where there is none (Node, insecure http pages). */
async function openCache(enabled) {
  if (!enabled || !globalThis.caches) return null;
  try {
    return await globalThis.caches.open(CACHE_NAME);
  } catch {
    return null; // e.g. storage disabled by the user: load from the network every time
  }
}

// Content-addressed keys: a file is found again whatever URL or bundle folder it came from, and a
// changed file (new sha256) is a different key. The URL is never fetched.
const cacheKey = (sha256, part) => new URL(`/.vlmexport-cache/sha256/${sha256}/${part}`, globalThis.location?.href ?? 'http://localhost/').href;
// A file is kept in parts of PrefixConditioningVLM.cachePartBytes (see there).
const cacheKeys = (info) => {
  const parts = Math.max(1, Math.ceil(info.size / PrefixConditioningVLM.cachePartBytes));
  return Array.from({ length: parts }, (_, part) => cacheKey(info.sha256, part));
};

/**
 * Delete every cached bundle file (Cache Storage); the next load downloads them again.
 * @returns {Promise<boolean>} whether there was a cache to delete
 */
export async function clearCache() {
  return globalThis.caches ? globalThis.caches.delete(CACHE_NAME) : false;
}

async function sha256Hex(bytes) {
  const digest = new Uint8Array(await globalThis.crypto.subtle.digest('SHA-256', bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Read a response body in chunks into one buffer, reporting bytes as they arrive; with a
 * Content-Length the buffer is allocated once, so a large graph is not held twice. */
async function readBody(response, onBytes) {
  if (!response.body || !response.body.getReader) {
    const bytes = new Uint8Array(await response.arrayBuffer());
    onBytes(bytes.length);
    return bytes;
  }
  const declared = Number(response.headers.get('Content-Length'));
  let bytes = new Uint8Array(declared > 0 ? declared : 1 << 16);
  let received = 0;
  const reader = response.body.getReader();
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (received + value.length > bytes.length) {
      const grown = new Uint8Array(Math.max(2 * bytes.length, received + value.length));
      grown.set(bytes.subarray(0, received));
      bytes = grown;
    }
    bytes.set(value, received);
    received += value.length;
    onBytes(value.length);
  }
  return received === bytes.length ? bytes : bytes.slice(0, received);
}

function floatTensor(data, dims) {
  return new ort.Tensor('float32', data instanceof Float32Array ? data : Float32Array.from(data), dims);
}

function int64Tensor(values, dims) {
  return new ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims);
}

/** Rows `rows` of a tensor along axis 0 (the beam reordering of a KV cache). */
function gatherRows(tensor, rows) {
  const [batch, ...rest] = tensor.dims;
  const size = tensor.data.length / batch;
  const data = new tensor.data.constructor(rows.length * size);
  rows.forEach((row, i) => data.set(tensor.data.subarray(row * size, (row + 1) * size), i * size));
  return new ort.Tensor(tensor.type, data, [rows.length, ...rest]);
}

/** Logits at the last position of each row: [rows, positions, vocab] → Float32Array(rows * vocab). */
function lastLogits(tensor) {
  const [rows, positions, vocab] = tensor.dims;
  const values = tensor.data;
  const out = new Float32Array(rows * vocab);
  for (let r = 0; r < rows; r++) {
    const start = (r * positions + positions - 1) * vocab;
    out.set(values.subarray(start, start + vocab), r * vocab);
  }
  return out;
}

export class PrefixConditioningVLM {
  // Cache Storage part size: Chromium refuses one entry of a full-size fp32 decoder ("Unexpected
  // internal error" putting 538 MB; the same bytes in 128 MB parts store fine, measured).
  static cachePartBytes = 128 * 1024 * 1024;

  constructor() {
    this.manifest = null;
    this.variant = null;
    this.sessions = {};
    this.tokenizer = null;
    this.preprocessor = null;
    this.generationConfig = {};
    this.loadTimings = {};
    this.lastTimings = {};
    this.loadStats = null;
    this.notes = [];
    this.threads = null;
    this.device = null;
  }

  /**
   * Download (or take from the cache), verify and start every graph of one variant, plus the
   * tokenizer and preprocessing.
   * @param {string} baseUrl folder URL of the bundle
   * @param {object} [options]
   * @param {string} [options.variant='fp32'] a key of the manifest's `variants` (fp32, int8, ...)
   * @param {(message: string, percent: number, detail: object) => void} [options.onProgress]
   *   detail: {file, loaded, total, fromCache} — bytes so far of the files this variant needs
   * @param {typeof fetch} [options.fetch] how to fetch files (default: global fetch)
   * @param {boolean} [options.verify=true] check sizes and sha256 against the manifest
   * @param {number} [options.numThreads] WebAssembly threads (default: see chooseThreads); fixed
   *   by the first load of a page, as onnxruntime-web starts its WebAssembly once
   * @param {boolean} [options.cache=true] keep files in Cache Storage under their sha256
   * @param {'wasm'|'webgpu'} [options.device='wasm'] webgpu falls back to wasm, with a note, where
   *   the browser has no WebGPU adapter
   * @param {object} [options.manifest] the bundle's manifest when already read (readManifest), to fetch it once
   * @returns {Promise<PrefixConditioningVLM>} this
   */
  async loadModel(baseUrl, { variant = 'fp32', onProgress = () => {}, fetch: fetchFn = globalThis.fetch, verify = true, numThreads, cache = true, device = 'wasm', manifest: known = null } = {}) {
    const started = now();
    this.loadTimings = {};
    this.notes = [];
    this.device = await this.#useDevice(device);
    this.#useThreads(numThreads);
    const manifest = known ?? (await readManifest(baseUrl, fetchFn));
    if (!manifest.variants[variant]) {
      throw new Error(`variant "${variant}" is not in this bundle (it has ${Object.keys(manifest.variants).join(', ')}): pick one of those or run vlmexport quantize`);
    }
    // Smallest graph first: its session, which also starts the WebAssembly runtime, is created
    // while the large graphs are still arriving.
    const size = ([, rel]) => (manifest.files[rel]?.size ?? 0) + (manifest.files[`${rel}_data`]?.size ?? 0);
    const graphs = Object.entries(manifest.variants[variant]).sort((a, b) => size(a) - size(b));
    const missing = LAYOUTS[manifest.layout].filter((component) => !manifest.variants[variant][component]);
    if (missing.length) throw new Error(`variant ${variant} lacks ${missing.join(', ')}: re-export the bundle`);
    const external = graphs.map(([, rel]) => `${rel}_data`).filter((rel) => rel in manifest.files);
    const optional = OPTIONAL_FILES.filter((rel) => rel in manifest.files);
    // Each graph followed by its external data: the order sessions are created in.
    const wanted = [...SIDE_FILES, ...optional, ...graphs.flatMap(([, rel]) => (external.includes(`${rel}_data`) ? [rel, `${rel}_data`] : [rel]))];
    const total = wanted.reduce((sum, rel) => sum + (manifest.files[rel]?.size ?? 0), 0);
    const stats = { downloadedBytes: 0, cachedBytes: 0, downloaded: [], fromCache: [] };
    let loaded = 0;
    const report = (message, file, fromCache = false) => onProgress(message, total ? Math.min(100, (100 * loaded) / total) : 100, { file, loaded, total, fromCache });

    const store = await openCache(cache);
    let stopped = false;
    const obtain = async (rel) => {
      if (stopped) throw new Error('loading stopped');
      const fileStarted = now();
      const info = manifest.files[rel];
      const cached = store && info ? await this.#fromCache(store, info) : null;
      let bytes = cached;
      if (cached) {
        loaded += cached.length;
        stats.cachedBytes += cached.length;
        stats.fromCache.push(rel);
        report(`${rel} from cache`, rel, true);
      } else {
        const response = await fetchOk(fetchFn, joinUrl(baseUrl, rel));
        bytes = await readBody(response, (count) => {
          loaded += count;
          report(`downloading ${rel}`, rel);
        });
        if (verify && info) await this.#verify(rel, bytes, info);
        stats.downloadedBytes += bytes.length;
        stats.downloaded.push(rel);
        if (store && info) await this.#toCache(store, info, bytes);
      }
      this.loadTimings[`${cached ? 'cache' : 'download'} ${rel}`] = now() - fileStarted;
      return bytes;
    };
    // Files come one after another (one download at a time keeps the order predictable), while the
    // sessions of those already here are created: session creation is synchronous WebAssembly on
    // this thread, and the browser's network and cache reads go on meanwhile, so a load costs about
    // max(transfer, session creation) rather than their sum.
    const files = {};
    let chain = Promise.resolve();
    for (const rel of wanted) {
      files[rel] = chain = chain.then(() => obtain(rel));
      files[rel].catch(() => {}); // awaited below; a failure is thrown there, not reported as unhandled
    }
    const text = async (rel) => JSON.parse(new TextDecoder().decode(await files[rel]));
    let wasmOnly, preprocessor, tokenizer, generationConfig;
    try {
      preprocessor = readPreprocessorConfig(await text('preprocessor_config.json'));
      tokenizer = new Tokenizer(await text('tokenizer.json'), await text('tokenizer_config.json'));
      generationConfig = optional.includes('generation_config.json') ? await text('generation_config.json') : {};
      // A model already loaded keeps running until every new file is here and verified (a failed
      // download leaves it usable); only a first load starts sessions while files still arrive.
      if (Object.keys(this.sessions).length) await chain;
      await this.dispose(); // the previous variant's sessions, before this one's take the memory
      wasmOnly = await this.#startSessions(graphs, files, external, report);
      await chain;
    } catch (error) {
      stopped = true;
      throw error;
    }
    this.preprocessor = preprocessor;
    this.tokenizer = tokenizer;
    this.generationConfig = generationConfig;
    if (store) await PrefixConditioningVLM.#prune(store, manifest);
    this.loadStats = stats;
    if (wasmOnly.length === graphs.length) this.device = 'wasm'; // nothing of this variant runs on WebGPU
    this.manifest = manifest;
    this.variant = variant;
    this.loadTimings.total = now() - started;
    report('ready', null);
    return this;
  }

  /** Create each graph's session as soon as its bytes (and external data) are here; the components that fell back to WebAssembly. */
  async #startSessions(graphs, files, external, report) {
    const executionProviders = this.device === 'webgpu' ? ['webgpu', 'wasm'] : ['wasm'];
    const wasmOnly = [];
    for (const [component, rel] of graphs) {
      const hasData = external.includes(`${rel}_data`);
      const [bytes, data] = await Promise.all([files[rel], hasData ? files[`${rel}_data`] : null]);
      report(`starting ${component}`, rel);
      const sessionStarted = now();
      const externalData = hasData ? [{ path: `${rel.split('/').pop()}_data`, data }] : undefined;
      const options = { executionProviders, graphOptimizationLevel: 'all', externalData };
      try {
        this.sessions[component] = await ort.InferenceSession.create(bytes, options);
      } catch (error) {
        if (this.device !== 'webgpu') throw new Error(`ONNX Runtime Web cannot load ${rel} (${error.message}): check the variant runs in the browser (vlmexport check)`);
        // A WebGPU kernel may claim a node and then refuse it (8-bit MatMulNBits): this graph runs on WebAssembly.
        const reason = String(error.message).split('\n')[0].split('ERROR_MESSAGE: ').pop().replace(/^\S+:\d+ \S+\(.*?\) /, '');
        this.#note(`${rel} cannot run on WebGPU (${reason}): it runs on WebAssembly; vlmexport inspect --target webgpu lists why`);
        wasmOnly.push(component);
        this.sessions[component] = await ort.InferenceSession.create(bytes, { ...options, executionProviders: ['wasm'] }).catch((again) => {
          throw new Error(`ONNX Runtime Web cannot load ${rel} (${again.message}): check the variant runs in the browser (vlmexport check)`);
        });
      }
      this.loadTimings[`start ${component}`] = now() - sessionStarted;
    }
    return wasmOnly;
  }

  /** 'webgpu' where the browser gives an adapter (and imports the WebGPU build), else 'wasm'. */
  async #useDevice(device) {
    if (device !== 'wasm' && device !== 'webgpu') throw new Error(`device "${device}" is not one this class runs: use 'wasm' or 'webgpu'`);
    if (device === 'wasm') return 'wasm';
    let adapter = null;
    try {
      adapter = globalThis.navigator?.gpu ? await globalThis.navigator.gpu.requestAdapter() : null;
    } catch {
      adapter = null;
    }
    if (!adapter) {
      this.#note('WebGPU is not available here (no navigator.gpu adapter): running on WebAssembly instead');
      return 'wasm';
    }
    if (ort === wasmRuntime) {
      if (PrefixConditioningVLM.#started.has(wasmRuntime)) this.#note('WebGPU after a WebAssembly model: the page now holds two ONNX Runtime builds; reload to free the first');
      ort = await import('onnxruntime-web/all');
    }
    return 'webgpu';
  }

  /** Sets onnxruntime-web's thread count before its WebAssembly starts (later changes are ignored by it). */
  #useThreads(requested) {
    const { threads, note } = chooseThreads(requested);
    if (note) this.#note(note);
    if (PrefixConditioningVLM.#started.has(ort) && ort.env.wasm.numThreads !== threads) {
      this.#note(`this page's WebAssembly already runs ${ort.env.wasm.numThreads} thread(s); reload the page to use ${threads}`);
    } else {
      ort.env.wasm.numThreads = threads;
    }
    PrefixConditioningVLM.#started.add(ort);
    this.threads = ort.env.wasm.numThreads;
  }

  static #started = new Set();

  #note(message) {
    this.notes.push(message);
    console.info(`prefix_vlm: ${message}`);
  }

  /** The cached bytes of a file when all its parts are there and add up to the manifest's size (they were verified when stored), else null. */
  async #fromCache(store, info) {
    try {
      const hits = [];
      for (const key of cacheKeys(info)) {
        const hit = await store.match(key);
        if (!hit) return null; // before allocating: on a cold load nothing is cached
        hits.push(hit);
      }
      const bytes = new Uint8Array(info.size);
      let filled = 0;
      for (const hit of hits) {
        const part = new Uint8Array(await hit.arrayBuffer());
        if (filled + part.length > info.size) return null;
        bytes.set(part, filled);
        filled += part.length;
      }
      return filled === info.size ? bytes : null;
    } catch {
      return null;
    }
  }

  async #toCache(store, info, bytes) {
    try {
      const size = PrefixConditioningVLM.cachePartBytes;
      for (const [part, key] of cacheKeys(info).entries()) {
        const slice = bytes.subarray(part * size, (part + 1) * size);
        await store.put(key, new Response(slice, { headers: { 'Content-Type': 'application/octet-stream', 'Content-Length': String(slice.length) } }));
      }
    } catch (error) {
      // A full quota only costs the next visit a download (a file with a part missing is not read); the model still loads.
      this.#note(`could not cache a file (${error.message}): the next visit downloads it again`);
    }
  }

  /** Drop cached files this bundle no longer lists (older exports), so the cache does not grow with every re-export. */
  static async #prune(store, manifest) {
    const current = new Set(Object.values(manifest.files).flatMap((info) => cacheKeys(info)));
    for (const request of await store.keys()) {
      if (!current.has(request.url)) await store.delete(request);
    }
  }

  async #verify(rel, bytes, info) {
    if (bytes.length !== info.size) throw new Error(`${rel} has ${bytes.length} bytes, the manifest says ${info.size}: the bundle is incomplete or changed, re-export or re-copy it`);
    // crypto.subtle exists only in secure contexts (https, localhost) and Node.
    if (globalThis.crypto?.subtle && (await sha256Hex(bytes)) !== info.sha256) {
      throw new Error(`${rel} does not match its manifest sha256: the bundle changed, re-export or re-copy it`);
    }
  }

  #requireLoaded() {
    if (!this.manifest) throw new Error('no model loaded: await loadModel(baseUrl) first');
  }

  get #layers() {
    return Number(this.manifest.model.num_layers);
  }

  #emptyPast(rows) {
    const { kv_heads: heads, head_dim: dim } = this.manifest.model;
    const feeds = {};
    for (let i = 0; i < this.#layers; i++) {
      for (const kind of ['key', 'value']) {
        const name = `past_key_values.${i}.${kind}`;
        feeds[name] = floatTensor(new Float32Array(0), [rows, heads, 0, dim]);
      }
    }
    return feeds;
  }

  static #past(outputs) {
    const past = {};
    for (const [name, tensor] of Object.entries(outputs)) {
      if (name.startsWith('present.')) past[name.replace('present.', 'past_key_values.')] = tensor;
    }
    return past;
  }

  /** Prefix embeddings (a tensor [1, P, D]) for one image's pixel values. */
  async #prefix(pixels, dims, timings) {
    let t = now();
    const vision = this.sessions.vision_encoder;
    const hidden = (await vision.run({ pixel_values: floatTensor(pixels, dims) })).last_hidden_state;
    timings.vision += now() - t;
    t = now();
    const prefix = (await this.sessions.projection.run({ vision_hidden_states: hidden })).projected_prefix;
    timings.projection += now() - t;
    return prefix;
  }

  /** The two calls decoding.js drives, over this bundle's layout, with the KV cache as state. */
  #decoder(prefix, timings) {
    const compact = this.manifest.layout === 'compact';
    const embed = Number(this.manifest.model.embed_dim);
    const run = async (component, feeds, key) => {
      const t = now();
      const outputs = await this.sessions[component].run(feeds);
      timings[key] += now() - t;
      if (key === 'steps') timings.stepCount += 1;
      return { logits: lastLogits(outputs.logits), state: { past: PrefixConditioningVLM.#past(outputs), length: outputs['present.0.key'].dims[2] } };
    };
    return {
      firstPass: () => {
        const length = prefix.dims[1];
        if (!compact) return run('prefix_init', { prefix_embeddings: prefix, input_ids: int64Tensor([], [1, 0]) }, 'firstPass');
        return run(
          'decoder',
          {
            prefix_embeddings: prefix,
            input_ids: int64Tensor([], [1, 0]),
            attention_mask: int64Tensor(new Array(length).fill(1), [1, length]),
            position_ids: int64Tensor(Array.from({ length }, (_, i) => i), [1, length]),
            ...this.#emptyPast(1),
          },
          'firstPass',
        );
      },
      step: (tokens, state, rows) => {
        const count = tokens.length;
        const past = {};
        for (const [name, tensor] of Object.entries(state.past)) past[name] = rows ? gatherRows(tensor, rows) : tensor;
        const feeds = {
          input_ids: int64Tensor(tokens, [count, 1]),
          attention_mask: int64Tensor(new Array(count * (state.length + 1)).fill(1), [count, state.length + 1]),
          position_ids: int64Tensor(new Array(count).fill(state.length), [count, 1]),
          ...past,
        };
        if (!compact) return run('language_model', feeds, 'steps');
        feeds.prefix_embeddings = floatTensor(new Float32Array(0), [count, 0, embed]);
        return run('decoder', feeds, 'steps');
      },
    };
  }

  #options(options) {
    const maxLength = options.maxLength ?? this.generationConfig.max_new_tokens ?? Number(this.manifest.model.max_length);
    return decodeOptions({ ...options, maxLength });
  }

  /**
   * Token ids per image (EOS excluded), from pixel values [batch, 3, H, W].
   * @param {{data: Float32Array, dims: number[]}|ort.Tensor} pixelValues
   * @param {object} [options] maxLength, numBeams, doSample, temperature, topK, topP, seed,
   *   lengthPenalty, earlyStopping, noRepeatNgramSize — transformers' `generate` meanings
   * @returns {Promise<number[][]>}
   */
  async generateTokens(pixelValues, options = {}) {
    this.#requireLoaded();
    const settings = this.#options(options);
    const [batch, ...image] = pixelValues.dims;
    const data = pixelValues.data instanceof Float32Array ? pixelValues.data : Float32Array.from(pixelValues.data);
    const size = data.length / batch;
    const timings = { vision: 0, projection: 0, firstPass: 0, steps: 0, stepCount: 0 };
    const rng = makeRng(settings.seed);
    const eos = this.manifest.model.eos_token_id ?? null;
    const tokens = [];
    // One image at a time: every image gets exactly the tokens it would get alone, and beam
    // search uses the batch axis for its beams.
    for (let b = 0; b < batch; b++) {
      const prefix = await this.#prefix(data.subarray(b * size, (b + 1) * size), [1, ...image], timings);
      const model = this.#decoder(prefix, timings);
      tokens.push(await (settings.numBeams > 1 ? beamSearch(model, settings, eos, rng) : sample(model, settings, eos, rng)));
    }
    this.lastTimings = { ...timings, decode: timings.firstPass + timings.steps };
    return tokens;
  }

  /** Text of token ids, special tokens skipped (as the Python side decodes). */
  decode(tokens) {
    return this.tokenizer.decode(tokens, { skip_special_tokens: true }).trim();
  }

  /**
   * One caption per image of pixel values [batch, 3, H, W].
   * @returns {Promise<string[]>}
   */
  async generate(pixelValues, options = {}) {
    const tokens = await this.generateTokens(pixelValues, options);
    const t = now();
    const captions = tokens.map((row) => this.decode(row));
    this.lastTimings.tokenizer = now() - t;
    return captions;
  }

  /**
   * Pixel values [1, 3, H, W] of an image: a File/Blob, ImageBitmap, <img>, canvas, ImageData,
   * a URL, or raw pixels {data, width, height, channels: 3|4}.
   */
  async preprocess(image) {
    this.#requireLoaded();
    const raw = image && image.data && image.width && image.height ? image : await imageToRGBA(image);
    const { height, width } = this.preprocessor;
    return { data: pixelValues(toRGB(raw), raw.width, raw.height, this.preprocessor), dims: [1, 3, height, width] };
  }

  /** Caption, tokens and per-stage milliseconds for one image. */
  async captionWithDetails(image, options = {}) {
    const started = now();
    const pixels = await this.preprocess(image);
    const preprocess = now() - started;
    const [tokens] = await this.generateTokens(pixels, options);
    const t = now();
    const caption = this.decode(tokens);
    this.lastTimings = { preprocess, ...this.lastTimings, tokenizer: now() - t, total: now() - started };
    return { caption, tokens, timings: this.lastTimings };
  }

  /** The caption of one image (see `preprocess` for what an image may be). */
  async caption(image, options = {}) {
    return (await this.captionWithDetails(image, options)).caption;
  }

  /** Delete every cached bundle file (see the module's clearCache); the loaded model keeps running. */
  async clearCache() {
    return clearCache();
  }

  /** Release every ONNX Runtime session. */
  async dispose() {
    for (const session of Object.values(this.sessions)) await session.release();
    this.sessions = {};
    this.manifest = null;
  }
}
