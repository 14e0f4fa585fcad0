"""What `pip install vlmexport` costs before and after the torch-free runtime: install size,
cold start and peak RSS of `vlmexport caption --onnx-dir` (one image, a fresh process each run).

Each configuration is a Python interpreter and, optionally, a source tree put first on its path
(e.g. a checkout from before the change, run with the full venv):

    python bench/runtime_footprint.py --onnx-dir out/shapes-onnx \\
        --config "before=/work/main/.venv/bin/python:/path/to/old/checkout" \\
        --config "runtime-only=/tmp/rt/bin/python"

Install size: the files (per each distribution's RECORD) of vlmexport's installed dependency
closure in that interpreter — what `pip install vlmexport` put there. Cold start: median wall
time of `--runs` runs. Peak RSS: the child's own ru_maxrss (os.wait4). Times on a shared machine
are noisy: compare the configurations of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run inside the measured interpreter: the dependency closure of vlmexport (no extras) and its size.
CLOSURE = r"""
import json, re
from importlib import metadata
seen, todo, size = set(), ["vlmexport"], 0
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen:
        continue
    seen.add(name)
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue  # a requirement for another platform
    size += sum(f.locate().stat().st_size for f in dist.files or [] if f.locate().is_file())
    for requirement in dist.requires or []:
        if "extra ==" not in requirement:
            todo.append(re.match(r"[A-Za-z0-9._-]+", requirement).group(0))
heavy = sorted(n for n in ("torch", "transformers", "peft", "onnx") if n in seen)
print(json.dumps({"bytes": size, "distributions": len(seen), "heavy": heavy}))
"""


# Children run outside any checkout: `python -c`/`-m` put the working folder first on sys.path, and a
# checkout's vlmexport (and its egg-info) would shadow the configuration's own.
NEUTRAL = tempfile.gettempdir()


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of one run of `command`, which must succeed."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, cwd=NEUTRAL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {child.stderr.read().decode()[-500:] if child.stderr else ''}")
    return seconds, usage.ru_maxrss / 1024  # KiB on Linux


def measure(name: str, python: str, source: str | None, onnx_dir: Path, image: Path, runs: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": source or ""}
    closure = json.loads(subprocess.run([python, "-c", CLOSURE], env=env, cwd=NEUTRAL, capture_output=True, text=True, check=True).stdout)
    command = [python, "-m", "vlmexport", "caption", "--onnx-dir", str(onnx_dir.resolve()), str(image.resolve())]
    run_once(command, env)  # warm the page cache: every run then reads the same files from memory
    samples = [run_once(command, env) for _ in range(runs)]
    return {
        "config": name,
        "install_mb": closure["bytes"] / 1e6,
        "distributions": closure["distributions"],
        "heavy": closure["heavy"],
        "cold_start_s": statistics.median(s for s, _ in samples),
        "peak_rss_mb": statistics.median(r for _, r in samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--image", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "shapes" / "images" / "000.png")
    parser.add_argument("--config", action="append", default=[], help="NAME=PYTHON[:SOURCE_TREE] (repeatable)")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    configs = args.config or [f"this=" f"{sys.executable}:{Path(__file__).resolve().parents[1]}"]
    rows = []
    for config in configs:
        name, _, spec = config.partition("=")
        python, _, source = spec.partition(":")
        rows.append(measure(name, python, source or None, args.onnx_dir, args.image, args.runs))
    print(f"{'config':14} {'install MB':>10} {'dists':>6} {'cold start s':>13} {'peak RSS MB':>12}  heavy packages installed")
    for r in rows:
        print(f"{r['config']:14} {r['install_mb']:10.0f} {r['distributions']:6d} {r['cold_start_s']:13.2f} {r['peak_rss_mb']:12.0f}  {', '.join(r['heavy']) or '-'}")  # type: ignore[arg-type]
    print(f"cpu: {os.cpu_count()} cores, load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}; {args.runs} runs each (median)")


if __name__ == "__main__":
    main()
