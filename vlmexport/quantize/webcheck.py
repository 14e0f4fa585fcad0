"""Run a graph in ONNX Runtime Web (WebAssembly, the browser engine) under Node, when Node is here.

The browser is where bundles are used most, and its engine is a separate build with its own
operator set; listing ops proves little, running them proves it. `bench/ort_web_run.mjs`
does the running; this module feeds it and reads back the outputs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmexport.errors import BundleError

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "bench" / "ort_web_run.mjs"
DTYPES = {"float32": np.float32, "int64": np.int64, "float16": np.float16, "int32": np.int32}


def ort_web_dir() -> Path:
    return Path(os.environ.get("ORT_WEB_DIR", REPO / "web" / "node_modules" / "onnxruntime-web"))


def web_runtime_available() -> bool:
    """Node, the runner script and an installed onnxruntime-web package are all present."""
    return shutil.which("node") is not None and RUNNER.is_file() and (ort_web_dir() / "dist" / "ort.node.min.mjs").is_file()


def _encode(array: np.ndarray) -> dict:
    array = np.ascontiguousarray(array)
    return {"type": str(array.dtype), "dims": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def _decode(spec: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(spec["data"]), DTYPES[spec["type"]]).reshape(spec["dims"])


def run_in_ort_web(jobs: list[tuple[Path, dict[str, np.ndarray]]], timeout: float = 900) -> list[dict[str, np.ndarray]]:
    """Outputs of each (graph, feeds) run by onnxruntime-web's WebAssembly backend, in one Node process.

    Raises:
        BundleError: Node or onnxruntime-web is missing, or a graph fails to load or run there.
    """
    if not web_runtime_available():
        raise BundleError("Node with onnxruntime-web is not available", "run `npm ci` in web/ (or set ORT_WEB_DIR)")
    with tempfile.TemporaryDirectory(prefix="vlmexport-web-") as tmp:
        listed = []
        for i, (model, feeds) in enumerate(jobs):
            feeds_path, out_path = Path(tmp) / f"feeds{i}.json", Path(tmp) / f"out{i}.json"
            feeds_path.write_text(json.dumps({name: _encode(value) for name, value in feeds.items()}))
            listed.append({"model": str(model), "feeds": str(feeds_path), "out": str(out_path)})
        (Path(tmp) / "jobs.json").write_text(json.dumps(listed))
        done = subprocess.run(["node", str(RUNNER), str(Path(tmp) / "jobs.json")], capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise BundleError(f"does not run in the browser engine: {done.stderr.strip()[:300]}", "see the ops listed in the manifest")
        return [{name: _decode(spec) for name, spec in json.loads(Path(job["out"]).read_text()).items()} for job in listed]


@dataclass(frozen=True)
class WebAgreement:
    """One output of one variant in onnxruntime-web, against native onnxruntime and against fp32."""

    variant: str
    output: str
    web_vs_native: float  # max |web − onnxruntime|
    scale: float  # max |onnxruntime|
    web_vs_fp32: float  # rel_max(fp32, web): what the variant's profile bounds
    native_vs_fp32: float  # rel_max(fp32, onnxruntime)


def web_agreement(onnx_dir: Path, variants: list[str], pixels: np.ndarray) -> list[WebAgreement]:
    """The vision encoder and the decoder's first pass of each variant of a compact bundle, run in
    one Node process, against native onnxruntime and against the bundle's fp32 graphs (native).

    The two runtimes need not agree bit for bit: onnxruntime-web computes MatMulNBits in float32
    where native x86 kernels quantize activations per block (accuracy level 4). What must hold is
    that the browser's outputs are as close to fp32 as the variant's profile demands.

    Raises:
        BundleError: see run_in_ort_web; or the bundle is not compact.
    """
    from vlmexport.bundle.names import past_names
    from vlmexport.runtime.bundle import open_bundle
    from vlmexport.validate.metrics import rel_max

    fp32 = open_bundle(onnx_dir, "fp32")
    if fp32.manifest.layout != "compact":
        raise BundleError("the browser-engine comparison runs compact bundles", "export with --layout compact")
    reference = {"last_hidden_state": fp32.vision(pixels), "logits": fp32.first_pass(fp32.prefix(pixels))[0]}
    jobs, expected = [], []
    for variant in variants:
        bundle = open_bundle(onnx_dir, variant)
        hidden = bundle.vision(pixels)
        prefix = bundle.project(hidden)
        length = prefix.shape[1]
        feeds = {
            "prefix_embeddings": prefix,
            "input_ids": np.zeros((prefix.shape[0], 0), np.int64),
            "attention_mask": np.ones((prefix.shape[0], length), np.int64),
            "position_ids": np.broadcast_to(np.arange(length, dtype=np.int64), (prefix.shape[0], length)).copy(),
            **dict(zip(past_names(bundle.num_layers), bundle.empty_past(prefix.shape[0]))),
        }
        files = bundle.manifest.variants[variant]
        jobs += [(onnx_dir / files["vision_encoder"], {"pixel_values": pixels}), (onnx_dir / files["decoder"], feeds)]
        expected += [(variant, "last_hidden_state", hidden), (variant, "logits", bundle.first_pass(prefix)[0])]
    results = run_in_ort_web(jobs)
    return [
        WebAgreement(v, name, float(np.abs(web[name] - native).max()), float(np.abs(native).max()), rel_max(reference[name], web[name]), rel_max(reference[name], native))
        for (v, name, native), web in zip(expected, results)
    ]
