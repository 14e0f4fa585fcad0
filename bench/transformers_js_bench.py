"""Caption time of a `--layout transformers.js` folder: transformers.js under Node (its
AutoProcessor + AutoModelForImageTextToText + generate, onnxruntime-node) against vlmexport's
Python runtime on the same files, greedy, one image at a time, and whether their tokens agree.

    python bench/transformers_js_bench.py --folder DIR [--variant int8] [--images N] [--tokens 20]

The folder is one `vlmexport export --layout transformers.js` wrote (e.g. from
`vlmexport synth --preset smollm-135m-siglip-base`). Timings on a shared machine are noisy:
read the ratio between the two, taken in the same run, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from vlmexport.bundle.manifest import read_manifest
from vlmexport.bundle.preprocess import open_image
from vlmexport.checkpoint.generate import DecodeOptions
from vlmexport.runtime.bundle import open_bundle
from vlmexport.runtime.caption import bundle_preprocessor, caption_tokens
from vlmexport.samples import sample_images

WEB = Path(__file__).resolve().parents[1] / "web"
# transformers.js' dtype names of vlmexport's variants (the file suffixes are the same).
DTYPES = {"fp32": "fp32", "int8": "int8", "uint8": "uint8", "fp16": "fp16", "q4": "q4"}

NODE_SIDE = """
import { AutoModelForImageTextToText, AutoProcessor, RawImage, env } from '@huggingface/transformers';
import path from 'node:path';
const [folder, dtype, tokens, ...images] = process.argv.slice(1);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(folder) + path.sep;
const id = path.basename(folder);
let started = performance.now();
const processor = await AutoProcessor.from_pretrained(id);
const model = await AutoModelForImageTextToText.from_pretrained(id, { dtype, device: 'cpu' });
const load = performance.now() - started;
const out = { load_ms: load, caption_ms: [], tokens: [] };
for (const file of images) {
  started = performance.now();
  const inputs = await processor(await RawImage.read(file), '<image>', { add_special_tokens: false });
  const ids = await model.generate({ ...inputs, do_sample: false, max_new_tokens: Number(tokens) });
  out.caption_ms.push(performance.now() - started);
  out.tokens.push(ids.tolist()[0].slice(inputs.input_ids.dims[1]).map(Number));
}
console.log(JSON.stringify(out));
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--variant", default="fp32")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=20)
    args = parser.parse_args()
    folder = args.folder.resolve()
    manifest = read_manifest(folder)
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, image in enumerate(sample_images(args.images, manifest.model["image_size"] * 2, seed=5)):
            files.append(Path(tmp) / f"{i}.png")
            image.save(files[-1])
        command = ["node", "--input-type=module", "-e", NODE_SIDE, str(folder), DTYPES[args.variant], str(args.tokens), *map(str, files)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=WEB, check=True)
        node = json.loads(done.stdout.strip().splitlines()[-1])
        started = time.perf_counter()
        bundle = open_bundle(folder, args.variant)
        load_ms = 1000 * (time.perf_counter() - started)
        python_ms, python_tokens = [], []
        preprocess = bundle_preprocessor(folder)
        for file in files:
            started = time.perf_counter()
            pixels = preprocess([open_image(file)])
            python_tokens += caption_tokens(bundle, pixels, DecodeOptions(max_new_tokens=args.tokens), batch_size=1)
            python_ms.append(1000 * (time.perf_counter() - started))
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    print(f"{folder.name} {args.variant}, {args.images} images, greedy, {args.tokens} new tokens")
    print(f"  load:    transformers.js {node['load_ms']:.0f} ms, python runtime {load_ms:.0f} ms")
    print(f"  caption: transformers.js median {median(node['caption_ms']):.0f} ms, python runtime median {median(python_ms):.0f} ms "
          f"(ratio {median(node['caption_ms']) / median(python_ms):.2f})")  # fmt: skip
    eos = manifest.model["eos_token_id"]
    same = [(a[: a.index(eos)] if eos in a else a) == b for a, b in zip(node["tokens"], python_tokens)]
    print(f"  tokens: identical for {sum(same)} of {len(same)} images (each side resizes with its own library)")


if __name__ == "__main__":
    main()
