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
 * preprocessing mirrors vlmexport/checkpoint/preprocess.py (see preprocess.js); text comes from
 * the bundle's tokenizer.json through @huggingface/tokenizers.
 *
 * Bare imports ('onnxruntime-web', '@huggingface/tokenizers') resolve from node_modules in Node
 * and through the import map of demo.html in a browser.
 */
import * as ort from 'onnxruntime-web';
import { Tokenizer } from '@huggingface/tokenizers';

import { beamSearch, decodeOptions, makeRng, sample } from './decoding.js';
import { imageToRGBA, pixelValues, readPreprocessorConfig, toRGB } from './preprocess.js';

export const MANIFEST = 'vlmexport.json';
const LAYOUTS = {
  distilvit: ['vision_encoder', 'projection', 'prefix_init', 'language_model'],
  compact: ['vision_encoder', 'projection', 'decoder'],
};
const SIDE_FILES = ['preprocessor_config.json', 'tokenizer.json', 'tokenizer_config.json'];

const now = () => globalThis.performance.now();

function joinUrl(base, relative) {
  return base.endsWith('/') ? base + relative : `${base}/${relative}`;
}

async function fetchOk(fetchFn, url) {
  const response = await fetchFn(url);
  if (!response.ok) throw new Error(`cannot fetch ${url}: HTTP ${response.status}`);
  return response;
}

/**
 * The bundle's manifest, checked to be one this class can run.
 * @param {string} baseUrl folder URL of the bundle (relative URLs work in a browser)
 * @param {typeof fetch} [fetchFn]
 */
export async function readManifest(baseUrl, fetchFn = globalThis.fetch) {
  const manifest = await (await fetchOk(fetchFn, joinUrl(baseUrl, MANIFEST))).json();
  if (manifest.schema_version !== 1 || !(manifest.layout in LAYOUTS)) {
    throw new Error(`${joinUrl(baseUrl, MANIFEST)} is not a vlmexport manifest this page can run (schema ${manifest.schema_version}, layout ${manifest.layout}): re-export with vlmexport export`);
  }
  return manifest;
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
  constructor() {
    this.manifest = null;
    this.variant = null;
    this.sessions = {};
    this.tokenizer = null;
    this.preprocessor = null;
    this.generationConfig = {};
    this.loadTimings = {};
    this.lastTimings = {};
  }

  /**
   * Download, verify and start every graph of one variant, plus the tokenizer and preprocessing.
   * @param {string} baseUrl folder URL of the bundle
   * @param {object} [options]
   * @param {string} [options.variant='fp32'] a key of the manifest's `variants` (fp32, int8, ...)
   * @param {(message: string, percent: number, detail: object) => void} [options.onProgress]
   * @param {typeof fetch} [options.fetch] how to fetch files (default: global fetch)
   * @param {boolean} [options.verify=true] check sizes and sha256 against the manifest
   * @param {number} [options.numThreads=1] WebAssembly threads (more need a cross-origin isolated page)
   * @returns {Promise<PrefixConditioningVLM>} this
   */
  async loadModel(baseUrl, { variant = 'fp32', onProgress = () => {}, fetch: fetchFn = globalThis.fetch, verify = true, numThreads = 1 } = {}) {
    const started = now();
    this.loadTimings = {};
    ort.env.wasm.numThreads = numThreads;
    const manifest = await readManifest(baseUrl, fetchFn);
    if (!manifest.variants[variant]) {
      throw new Error(`variant "${variant}" is not in this bundle (it has ${Object.keys(manifest.variants).join(', ')}): pick one of those or run vlmexport quantize`);
    }
    const graphs = Object.entries(manifest.variants[variant]);
    const missing = LAYOUTS[manifest.layout].filter((component) => !manifest.variants[variant][component]);
    if (missing.length) throw new Error(`variant ${variant} lacks ${missing.join(', ')}: re-export the bundle`);
    const external = graphs.map(([, rel]) => `${rel}_data`).filter((rel) => rel in manifest.files);
    const wanted = [...SIDE_FILES, ...graphs.map(([, rel]) => rel), ...external];
    const total = wanted.reduce((sum, rel) => sum + (manifest.files[rel]?.size ?? 0), 0);
    let loaded = 0;
    const report = (message, file) => onProgress(message, total ? Math.min(100, (100 * loaded) / total) : 100, { file, loaded, total });

    const files = {};
    for (const rel of wanted) {
      const fileStarted = now();
      const info = manifest.files[rel];
      const response = await fetchOk(fetchFn, joinUrl(baseUrl, rel));
      files[rel] = await readBody(response, (count) => {
        loaded += count;
        report(`downloading ${rel}`, rel);
      });
      if (verify && info) await this.#verify(rel, files[rel], info);
      this.loadTimings[`download ${rel}`] = now() - fileStarted;
    }

    const text = (rel) => JSON.parse(new TextDecoder().decode(files[rel]));
    this.preprocessor = readPreprocessorConfig(text('preprocessor_config.json'));
    this.tokenizer = new Tokenizer(text('tokenizer.json'), text('tokenizer_config.json'));
    this.generationConfig = await fetchFn(joinUrl(baseUrl, 'generation_config.json')).then((r) => (r.ok ? r.json() : {}), () => ({}));

    await this.dispose(); // the previous variant's sessions, before this one's take the memory
    for (const [component, rel] of graphs) {
      report(`starting ${component}`, rel);
      const sessionStarted = now();
      const externalData = external.includes(`${rel}_data`) ? [{ path: `${rel.split('/').pop()}_data`, data: files[`${rel}_data`] }] : undefined;
      try {
        this.sessions[component] = await ort.InferenceSession.create(files[rel], { executionProviders: ['wasm'], graphOptimizationLevel: 'all', externalData });
      } catch (error) {
        throw new Error(`ONNX Runtime Web cannot load ${rel} (${error.message}): check the variant runs in the browser (vlmexport check)`);
      }
      this.loadTimings[`start ${component}`] = now() - sessionStarted;
    }
    this.manifest = manifest;
    this.variant = variant;
    this.loadTimings.total = now() - started;
    report('ready', null);
    return this;
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

  /** Release every ONNX Runtime session. */
  async dispose() {
    for (const session of Object.values(this.sessions)) await session.release();
    this.sessions = {};
    this.manifest = null;
  }
}
