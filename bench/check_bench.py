"""check benchmark: wall time of `vlmexport check` (PyTorch reference, fp32 profile) and the worst
error per component, on the shapes example and the full-size synthetic model, both layouts.

    .venv/bin/python bench/check_bench.py [--workdir DIR] [--keep] [--skip-shapes] [--skip-full]

Targets (2 cores): the shapes example checks in < 30 s, the full-size synthetic bundle
(SigLIP-base + SmolLM-135M) in < 90 s per layout. Each check runs as the CLI does, in its
own process, so the time includes start-up. Bundles are exported into the work folder
(~1 GB per full-size layout) and deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "vlmexport"]
SHAPES = ROOT / "examples" / "shapes" / "model"
LAYOUTS = ("distilvit", "compact")
TARGETS = {"shapes": 30.0, "full-synth": 90.0}


def run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one CLI run. CPU time is printed too because on a shared
    machine wall time measures the neighbours: on 2 idle cores, wall ≈ CPU / 2 at best."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        sys.exit(f"`vlmexport {' '.join(args)}` failed ({done.returncode}): {done.stderr.strip()}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def worst_per_output(report: dict) -> dict[str, dict[str, float]]:
    """"component output" (steps merged) → metric → worst value over batches and steps."""
    worst: dict[str, dict[str, float]] = {}
    for m in report["measurements"]:
        component = m["component"].split(" step ")[0] + (" steps" if " step " in m["component"] else "")
        key = f"{component} {m['output']}"
        value = m["value"] if m["value"] is not None else float("inf")
        seen = worst.setdefault(key, {}).get(m["metric"])
        pick = min if m["bound"] == "min" else max
        worst[key][m["metric"]] = value if seen is None else pick(seen, value)
    return worst


def bench(name: str, model_dir: Path, work: Path) -> None:
    for layout in LAYOUTS:
        bundle = work / f"{name}-{layout}"
        if not (bundle / "vlmexport.json").is_file():
            export_seconds, _ = run(["export", "--model-dir", str(model_dir), "--output-dir", str(bundle), "--layout", layout, "--force"])
            print(f"{name} {layout}: exported in {export_seconds:.1f} s")
        report_path = work / f"{name}-{layout}.json"
        seconds, cpu = run(["check", "--onnx-dir", str(bundle), "--model-dir", str(model_dir), "--json", str(report_path)])
        report = json.loads(report_path.read_text())
        target = TARGETS[name]
        verdict = "within" if seconds < target else "OVER"
        print(
            f"{name} {layout}: check {seconds:.1f} s wall, {cpu:.1f} s CPU ({report['seconds']:.1f} s in check_bundle; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores), {verdict} the {target:.0f} s target; passed={report['passed']}"
        )
        for output, metrics in worst_per_output(report).items():
            shown = "  ".join(f"{metric} {value:.3g}" if value < 0.99 else f"{metric} {value:.7f}" for metric, value in metrics.items())
            print(f"    {output:40s} {shown}")
        matched = sum(c["match"] for c in report["captions"])
        print(f"    captions identical: {matched}/{len(report['captions'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the exported bundles")
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument("--preset", default="smollm-135m-siglip-base")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="check-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_shapes:
            if SHAPES.is_dir():
                bench("shapes", SHAPES, work)
            else:
                print(f"shapes: skipped, {SHAPES} does not exist (train it first)")
        if not args.skip_full:
            synth = work / "full-synth-checkpoint"
            if not (synth / "config.json").is_file():
                run(["synth", "--preset", args.preset, "--output-dir", str(synth), "--force"])
            bench("full-synth", synth, work)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
