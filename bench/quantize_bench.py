"""Quantization benchmark: sizes, speed and parity of every variant against fp32, in one run.

    .venv/bin/python bench/quantize_bench.py [--modes int8,uint8,fp16,q4] [--tokens 30] [--workdir DIR] [--keep]

1. Full-size synthetic model (SigLIP-base + SmolLM-135M shapes, random weights, real LoRA):
   synth → export compact → quantize each mode → bytes and ratio vs fp32; 30-token caption
   latency of fp32 and every variant (vlmexport.runtime.bench, each in its own process, the
   same run); parity of each variant vs fp32 (vlmexport check's measurements).
2. The shapes example (trained, so captions mean something), if it is there: export compact →
   quantize each mode → greedy caption agreement with fp32 on the held-out images and
   teacher-forced top-1, from `check --images examples/shapes/images`.

Targets (issue 5): int8 compact bundle ≤ 0.27 × fp32 bytes; int8 caption ≥ 1.8× faster than
fp32; shapes int8 captions equal fp32 on ≥ 95 % of images, teacher-forced top-1 ≥ 0.95.
The machine may be shared: compare ratios from one run, not absolute times across runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "examples" / "shapes"
TARGETS = {"int8_bytes": 0.27, "int8_speedup": 1.8, "shapes_captions": 0.95, "shapes_teacher_forced": 0.95}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="int8,uint8,fp16,q4")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint and bundles, ~3 GB)")
    parser.add_argument("--skip-full", action="store_true", help="only the shapes example")
    parser.add_argument("--shapes-dir", type=Path, default=SHAPES, help="the shapes example: model/ and images/ (default examples/shapes)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlmexport-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"workdir {work}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; {os.cpu_count()} cores", flush=True)
    try:
        summary: dict[str, float] = {}
        if not args.skip_full:
            summary |= full_size(work, modes, args.tokens, args.repeats)
        if (args.shapes_dir / "model").is_dir():
            summary |= shapes(work, modes, args.shapes_dir)
        else:
            print(f"\nshapes example: {args.shapes_dir / 'model'} is not there (train it first); skipped")
        print("\ntargets")
        checks = [
            ("int8 bytes / fp32", "int8_bytes", "≤"),
            ("int8 caption speed-up vs fp32", "int8_speedup", "≥"),
            ("shapes int8 captions equal to fp32", "shapes_captions", "≥"),
            ("shapes int8 teacher-forced top-1", "shapes_teacher_forced", "≥"),
        ]
        for label, key, sign in checks:
            if key in summary:
                value, target = summary[key], TARGETS[key]
                met = value <= target if sign == "≤" else value >= target
                print(f"  {label:38s} {value:8.3f}  target {sign} {target}  {'met' if met else 'NOT MET'}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def full_size(work: Path, modes: list[str], tokens: int, repeats: int) -> dict[str, float]:
    from vlmexport.checkpoint.synth import synth_checkpoint
    from vlmexport.exporter.export import export_bundle
    from vlmexport.runtime.bench import run_bench

    ckpt, onnx_dir = work / "synth", work / "full"
    if not ckpt.is_dir():
        started = time.perf_counter()
        synth_checkpoint("smollm-135m-siglip-base", ckpt)
        print(f"synth: {time.perf_counter() - started:.0f} s", flush=True)
    if not onnx_dir.is_dir():
        started = time.perf_counter()
        export_bundle(ckpt, onnx_dir, layout="compact", verify=False)
        print(f"export compact: {time.perf_counter() - started:.0f} s", flush=True)
    print("\nfull-size synthetic model (SigLIP-base + SmolLM-135M), compact layout")
    summary = quantize_all(onnx_dir, modes, None)
    report = run_bench(onnx_dir, ckpt, ["fp32", *modes], tokens, repeats)
    fp32 = next(r for r in report.rows if r.backend == "onnx fp32")
    print(f"\n{tokens}-token caption, batch 1, {report.threads} threads (each backend in its own process, this run)")
    print(f"  {'backend':12s} {'caption ms':>10s} {'ms/token':>9s} {'vision ms':>9s} {'vs fp32':>8s} {'peak RSS MB':>11s}")
    for r in report.rows:
        print(f"  {r.backend:12s} {r.caption_ms:10.0f} {r.decode_ms:9.2f} {r.vision_ms:9.1f} {fp32.caption_ms / r.caption_ms:7.2f}× {r.peak_rss_mb:11.0f}")
        if r.backend == "onnx int8":
            summary["int8_speedup"] = fp32.caption_ms / r.caption_ms
    print(f"  load average after: {', '.join(f'{x:.1f}' for x in report.load_average)}")
    web(onnx_dir, ["fp32", *modes])
    return summary


def web(onnx_dir: Path, variants: list[str]) -> None:
    """Each variant's vision encoder and decoder first pass in onnxruntime-web (WebAssembly, Node)."""
    from vlmexport.bundle.preprocess import bundle_preprocessor
    from vlmexport.quantize.webcheck import web_agreement, web_runtime_available
    from vlmexport.samples import sample_images

    if not web_runtime_available():
        print("\nonnxruntime-web: Node or web/node_modules missing (npm ci in web/); skipped")
        return
    preprocessor = bundle_preprocessor(onnx_dir)
    pixels = preprocessor(sample_images(1, preprocessor.height))
    started = time.perf_counter()
    rows = web_agreement(onnx_dir, variants, pixels)
    print(f"\nonnxruntime-web (WebAssembly under Node) vs onnxruntime, one image ({time.perf_counter() - started:.0f} s)")
    for r in rows:
        print(
            f"  {r.variant:6s} {r.output:18s} max |web − native| {r.web_vs_native:.3g} (max |native| {r.scale:.3g}); "
            f"rel_max vs fp32: web {r.web_vs_fp32:.3g}, native {r.native_vs_fp32:.3g}"
        )


def shapes(work: Path, modes: list[str], example: Path) -> dict[str, float]:
    from vlmexport.exporter.export import export_bundle

    onnx_dir = work / "shapes-onnx"
    if not onnx_dir.is_dir():
        export_bundle(example / "model", onnx_dir, layout="compact")
    print(f"\nshapes example ({example}), compact layout, {len(list((example / 'images').glob('*.png')))} held-out images")
    return quantize_all(onnx_dir, modes, example / "images", prefix="shapes_")


def quantize_all(onnx_dir: Path, modes: list[str], images: Path | None, prefix: str = "") -> dict[str, float]:
    """Quantize each mode (no verify), print sizes; then check each against fp32 and print the numbers."""
    from vlmexport.errors import UsageError
    from vlmexport.quantize.quantize import quantize_bundle
    from vlmexport.validate.check import check_bundle
    from vlmexport.validate.profiles import profile_named
    from vlmexport.validate.report import table_rows

    summary: dict[str, float] = {}
    print(f"  {'file':34s} {'fp32 MB':>9s} {'variant MB':>10s} {'ratio':>6s}")
    for mode in modes:
        started = time.perf_counter()
        report = quantize_bundle(onnx_dir, mode, force=True, verify=False)
        for row in report.rows:
            print(f"  {row.variant_path:34s} {row.fp32_bytes / 1e6:9.2f} {row.variant_bytes / 1e6:10.2f} {row.ratio:6.3f}")
        print(f"  {mode + ' total':34s} {report.fp32_bytes / 1e6:9.2f} {report.variant_bytes / 1e6:10.2f} {report.ratio:6.3f}   ({time.perf_counter() - started:.0f} s)", flush=True)
        if mode == "int8":
            summary[f"{prefix}int8_bytes"] = report.ratio
        hot = [r for r in report.activation_ranges if not r.masking][:3]
        for r in hot:
            print(f"    fp16 range: {r.component} {r.tensor} ({r.op_type}) peak {r.peak:.4g} = {r.fp16_fraction:.1%} of 65504{' → fp32' if r.hot else ''}")
    print(f"\n  parity vs fp32 (worst over batch 1 and 3 and the decode steps){'; images ' + str(images) if images else ''}")
    for mode in modes:
        try:
            profile = profile_named(mode)
        except UsageError:
            profile = profile_named("fp32")  # numbers are what matters here; the verdict follows that profile
        check = check_bundle(onnx_dir, None, mode, profile, images)
        print(f"  {mode}: {'PASS' if check.passed else 'FAIL'} under profile {profile.name} — {check.summary()}")
        for r in table_rows(check):
            if not r.component.startswith("merge"):
                print(f"    {r.component:20s} {r.output:24s} {r.metric:20s} {r.value:.4g}")
        if mode == "int8" and prefix:
            end_to_end = {m.metric: m.value for m in check.measurements if m.component == "end_to_end"}
            summary[f"{prefix}captions"] = end_to_end["match"]
            summary[f"{prefix}teacher_forced"] = end_to_end["top1"]
    return summary


if __name__ == "__main__":
    sys.exit(main())
