"""`inspect --target webgpu`: per variant and graph, the ops the pinned onnxruntime-web runs on the
CPU (WebAssembly) because its WebGPU backend has no kernel for them.

The answer comes from onnxruntime-web itself: web/tools/webgpu_placement.mjs starts each graph with
the WebGPU execution provider in headless Chromium (SwiftShader's software adapter) and collects the
nodes the runtime's kernel registry refuses. A hand-written list of op names would be wrong: the
registry is keyed by domain, opset version and type (measured: RotaryEmbedding, Attention, Conv,
Reshape and Transpose at ONNX opset 23 have no WebGPU kernel, although kernels of those names exist
for other opsets or the com.microsoft domain).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vlmexport.bundle.manifest import read_manifest, verify_files
from vlmexport.errors import BundleError, UsageError
from vlmexport.resources import web_dir

TOOL = "tools/webgpu_placement.mjs"


@dataclass(frozen=True)
class WebGpuRow:
    variant: str
    component: str
    path: str
    fallbacks: dict[str, int]  # op type → nodes of that type without a WebGPU kernel
    error: str | None  # why the WebGPU backend cannot start this graph at all (prefix_vlm.js then runs it on WebAssembly)


@dataclass(frozen=True)
class WebGpuReport:
    runtime: str  # "onnxruntime-web 1.30.0"
    adapter: str
    rows: list[WebGpuRow]


def webgpu_fallbacks(bundle_dir: Path, timeout: float = 900) -> WebGpuReport:
    """Every graph of every variant placed by onnxruntime-web's WebGPU backend (each file once).

    Raises:
        BundleError: no manifest, or a file changed; or onnxruntime-web cannot load a graph.
        UsageError: Node, Chromium or web/node_modules missing, or Chromium has no WebGPU adapter.
    """
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    web = web_dir()
    package = web / "node_modules" / "onnxruntime-web" / "package.json"
    if shutil.which("node") is None or not package.is_file() or not (web / TOOL).is_file():
        raise UsageError("--target webgpu needs Node.js, web/node_modules and a source checkout of vlmexport", "run web/install-deps.sh in a vlmexport checkout")
    graphs = sorted({path for components in manifest.variants.values() for path in components.values()})
    try:
        done = subprocess.run(["node", TOOL, str(bundle_dir.resolve()), *graphs], cwd=web, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise UsageError(f"WebGPU placement took over {timeout:.0f} s", "try again on a less loaded machine") from exc
    if done.returncode:
        message = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if "no WebGPU adapter" in message or "Executable doesn't exist" in message:
            raise UsageError(message, "install Chromium (web/install-deps.sh) or set CHROMIUM to one with WebGPU")
        raise BundleError(message, "check the variant loads in onnxruntime-web (vlmexport check)")
    placed = json.loads(done.stdout)
    rows = [
        WebGpuRow(variant, component, path, placed[path]["fallbacks"], _reason(placed[path]["error"]))
        for variant, components in manifest.variants.items()
        for component, path in components.items()
    ]
    version = json.loads(package.read_text())["version"]
    adapter = next(iter(placed.values()))["adapter"] if placed else "none"
    return WebGpuReport(f"onnxruntime-web {version}", adapter, rows)


def _reason(error: str | None) -> str | None:
    """onnxruntime's message without its source path and C++ signature (`/…/matmul_nbits.h:21 onnxruntime::…(…) `)."""
    return None if error is None else re.sub(r"^\S+:\d+ \S+\(.*?\) ", "", error).strip()
