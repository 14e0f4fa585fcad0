"""Write a static site: the demo page, prefix_vlm.js, the vendored onnxruntime-web and tokenizer
builds, the bundle, `_headers` (COOP/COEP for hosts that read it) and the service worker that
isolates the page where the host sends no headers.

    site/
      index.html              web/demo.html (relative paths: works in a sub-folder too)
      coi-serviceworker.js    COOP/COEP added by a service worker (GitHub Pages, http.server)
      _headers                COOP/COEP for Netlify / Cloudflare Pages
      .nojekyll               GitHub Pages: serve every file as it is
      web/*.js                prefix_vlm.js and its modules
      vendor/onnxruntime-web/ the WebAssembly build (+ the WebGPU build unless --no-webgpu)
      vendor/tokenizers/      @huggingface/tokenizers
      bundle/                 vlmexport.json and the files it lists (every sha256 verified)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from vlmexport.bundle.manifest import MANIFEST_NAME, read_manifest, verify_files
from vlmexport.errors import BundleError, UsageError
from vlmexport.fsutil import atomic_output_dir
from vlmexport.resources import vendor_dirs, web_dir

PAGE_FILES = ("prefix_vlm.js", "decoding.js", "preprocess.js")
# What demo.html's import map loads, per vendor folder. The bundle builds inline their loader, so
# each needs only its .wasm beside it (the .mjs glue is for builds that fetch it; kept small).
VENDOR_FILES = {
    "vendor/onnxruntime-web": ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"),
    "vendor/tokenizers": ("tokenizers.min.mjs",),
}
# The build with the WebGPU backend (JSEP), imported by prefix_vlm.js only for device 'webgpu'.
WEBGPU_FILES = ("ort.all.bundle.min.mjs", "ort-wasm-simd-threaded.jsep.wasm", "ort-wasm-simd-threaded.jsep.mjs")
HEADERS = """/*
  Cross-Origin-Opener-Policy: same-origin
  Cross-Origin-Embedder-Policy: require-corp
  Cross-Origin-Resource-Policy: same-origin
  X-Content-Type-Options: nosniff
"""


PAGE_LAYOUTS = ("distilvit", "compact")  # web/prefix_vlm.js' LAYOUTS


@dataclass(frozen=True)
class SiteResult:
    path: Path
    files: int
    bytes: int
    bundle_bytes: int
    variants: list[str]


def build_site(onnx_dir: Path, output_dir: Path, force: bool = False, webgpu: bool = True) -> SiteResult:
    """Copy the demo page, its scripts, the vendored runtime and the verified bundle into `output_dir`.

    Raises:
        BundleError: no bundle in `onnx_dir`, or a file that does not match the manifest.
        UsageError: `output_dir` is not empty (without force) or not writable; web/ or its
            node_modules missing (the page's files come from a source checkout).
    """
    onnx_dir, output_dir = Path(onnx_dir), Path(output_dir)
    manifest = read_manifest(onnx_dir)
    # A site must never publish a bundle its own page would reject: prefix_vlm.js reads these layouts.
    if manifest.layout not in PAGE_LAYOUTS:
        raise UsageError(
            f"the page runs the {' and '.join(PAGE_LAYOUTS)} layouts, not {manifest.layout} (@huggingface/transformers loads that one itself)",
            f"export with --layout {PAGE_LAYOUTS[0]} for a site",
        )
    verify_files(onnx_dir, manifest)
    sources = _page_sources(webgpu)
    with atomic_output_dir(output_dir, force) as tmp:
        for relative, source in sources.items():
            _copy(source, tmp / relative)
        for relative in [MANIFEST_NAME, *manifest.files]:
            _copy(onnx_dir / relative, tmp / "bundle" / relative)
        (tmp / "_headers").write_text(HEADERS)
        (tmp / ".nojekyll").write_text("")
        files = [p for p in tmp.rglob("*") if p.is_file()]
        total = sum(p.stat().st_size for p in files)
        bundle_bytes = sum(p.stat().st_size for p in (tmp / "bundle").rglob("*") if p.is_file())
    return SiteResult(output_dir, len(files), total, bundle_bytes, list(manifest.variants))


def _page_sources(webgpu: bool) -> dict[str, Path]:
    """Site path → source file for the page, its scripts and the vendored packages.

    Raises:
        UsageError: a file is missing (no source checkout, or npm packages not installed).
    """
    web = web_dir()
    sources = {"index.html": web / "demo.html", "coi-serviceworker.js": web / "coi-serviceworker.js"}
    sources |= {f"web/{name}": web / name for name in PAGE_FILES}
    vendor = vendor_dirs()
    for folder, names in VENDOR_FILES.items():
        wanted = names + (WEBGPU_FILES if webgpu and folder == "vendor/onnxruntime-web" else ())
        sources |= {f"{folder}/{name}": vendor[folder] / name for name in wanted}
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        fix = "run web/install-deps.sh (or `npm ci` in web/)" if "node_modules" in missing[0] else "run vlmexport site from a source checkout of vlmexport"
        raise UsageError(f"{len(missing)} page file(s) missing, first {missing[0]}", fix)
    return sources


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        raise BundleError(f"cannot copy {source} ({exc.strerror})", "check the bundle is readable and the output's disk has room") from exc
