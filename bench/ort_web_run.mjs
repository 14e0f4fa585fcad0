// Run one ONNX graph in ONNX Runtime Web (the WebAssembly CPU backend, as in a browser) under Node.
//
//   node bench/ort_web_run.mjs JOBS.json
//
// JOBS.json: [{model: "x.onnx", feeds: "feeds.json", out: "out.json"}, ...], run in order in one process
// (WebAssembly starts once). feeds / out files: {name: {type: "float32" | "int64", dims: [...],
// data: base64 of the little-endian bytes}}.
// onnxruntime-web is taken from $ORT_WEB_DIR, else from web/node_modules (the version web/package.json pins).
// Used by vlmexport.quantize.webcheck (tests, bench) to prove a variant runs in the browser engine and to compare
// its outputs with onnxruntime's.
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const ortDir = process.env.ORT_WEB_DIR || join(here, "..", "web", "node_modules", "onnxruntime-web");
const ort = await import(pathToFileURL(join(ortDir, "dist", "ort.node.min.mjs")).href);

const ARRAYS = { float32: Float32Array, int64: BigInt64Array, float16: Uint16Array, int32: Int32Array };

function decode(spec) {
  const bytes = Buffer.from(spec.data, "base64");
  const Array = ARRAYS[spec.type];
  const copy = new Uint8Array(bytes.length);
  copy.set(bytes);
  return new ort.Tensor(spec.type, new Array(copy.buffer), spec.dims);
}

function encode(tensor) {
  const data = tensor.data;
  return { type: tensor.type, dims: tensor.dims, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength).toString("base64") };
}

ort.env.wasm.numThreads = 1;
ort.env.logLevel = "error";
let current = "";
try {
  for (const job of JSON.parse(readFileSync(process.argv[2], "utf8"))) {
    current = job.model;
    const session = await ort.InferenceSession.create(readFileSync(job.model), { executionProviders: ["wasm"] });
    const feeds = Object.fromEntries(Object.entries(JSON.parse(readFileSync(job.feeds, "utf8"))).map(([k, v]) => [k, decode(v)]));
    const results = await session.run(feeds);
    writeFileSync(job.out, JSON.stringify(Object.fromEntries(Object.entries(results).map(([k, v]) => [k, encode(v)]))));
    await session.release();
  }
} catch (error) {
  // One line the caller can show: which graph and what ONNX Runtime Web said.
  console.error(`${current}: onnxruntime-web: ${String(error?.message ?? error).split("\n")[0]}`);
  process.exit(1);
}
