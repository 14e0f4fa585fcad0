"""Export benchmark: a full-size synthetic checkpoint → both layouts; time, peak RSS, bytes vs parameters.

    .venv/bin/python bench/export_bench.py [--preset smollm-135m-siglip-base] [--workdir DIR] [--keep]

Each export runs in its own process so its peak RSS is its own. Targets (2 cores):
compact bundle ≤ 1.02 × fp32 parameter bytes, export ≤ 120 s, peak RSS ≤ 3 × parameter bytes,
and no decoder graph stores the tied head twice.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = ("distilvit", "compact")


def child(model_dir: Path, out: Path, layout: str) -> None:
    """Run one export and print its numbers as JSON (peak RSS of this process only)."""
    from vlmexport.exporter.export import export_bundle

    result = export_bundle(model_dir, out, layout=layout)
    print(
        json.dumps(
            {
                "layout": layout,
                "seconds": result.seconds,
                "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "files": result.files,
                "bundle_bytes": result.bundle_bytes,
                "parameter_bytes": result.parameter_bytes,
                "parameters": result.parameters,
                "worst_smoke": max((m.value / m.tolerance for m in result.smoke), default=0.0),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm-135m-siglip-base")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles")
    parser.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "OUT", "LAYOUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.child[2])
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vlmexport-bench-"))
    checkpoint = work / "checkpoint"
    try:
        if not checkpoint.exists():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vlmexport", "synth", "--preset", args.preset, "--output-dir", str(checkpoint)], check=True, stdout=subprocess.DEVNULL)
            print(f"synth {args.preset}: {time.perf_counter() - started:.1f} s")
        rows = []
        for layout in LAYOUTS:
            out = work / f"onnx-{layout}"
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--child", str(checkpoint), str(out), layout], check=True, capture_output=True, text=True)
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            row["wall"] = time.perf_counter() - started
            rows.append(row)
        params = rows[0]["parameter_bytes"]
        print(f"parameters: {json.dumps(rows[0]['parameters'])} → {params / 1e6:.1f} MB at fp32")
        print(f"{'layout':<10} {'export s':>9} {'wall s':>7} {'peak RSS MB':>12} {'RSS/params':>10} {'bundle MB':>10} {'bundle/params':>13} {'worst smoke err/tol':>20}")
        for r in rows:
            print(
                f"{r['layout']:<10} {r['seconds']:>9.1f} {r['wall']:>7.1f} {r['peak_rss'] / 1e6:>12.0f} {r['peak_rss'] / params:>10.2f} "
                f"{r['bundle_bytes'] / 1e6:>10.1f} {r['bundle_bytes'] / params:>13.3f} {r['worst_smoke']:>20.3f}"
            )
            for name, size in r["files"].items():
                print(f"    {name:<32} {size / 1e6:>9.1f} MB")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
