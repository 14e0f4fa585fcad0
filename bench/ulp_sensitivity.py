"""How far one ulp moves each variant — and how far another CPU kind does.

    .venv/bin/python bench/ulp_sensitivity.py --onnx-dir BUNDLE [--variants fp32,int8,q4]
        [--emulate EPYC-Rome] [--stages vision,prefix,logits]

For each variant, on one sample image: the vision encoder's output, the image prefix (after the
projection) and the decoder's next-token logits after the prefix, each as
‖variant − fp32‖ / ‖fp32‖ ("vs fp32") and as the change when every pixel moves by one float32 ulp
("one ulp"). A variant whose MatMulNBits quantize activations (accuracy level 4: the int8,
uint8 and q4 recipes) rounds some of each MatMul's ~10^5 activations at a boundary; one ulp flips
them and the flips cascade layer by layer, so its "one ulp" column is about its "vs fp32" one,
where fp32's and fp16's are 10^-7 and 10^-5.

`--emulate CPU` also runs every variant under `qemu-x86_64 -cpu CPU` (user mode, same Python,
same wheels; CPU a qemu model: EPYC-Rome has AVX2 without AVX512 or VNNI, Haswell AVX2 alone)
and gives ‖emulated − here‖ / ‖here‖ on the same pixels ("that CPU"). onnxruntime picks its MLAS
kernels by CPUID, which qemu answers for the model; its integer kernels compute the same given the
same inputs (validate/portable.py), its float kernels differ by ulps, and the cascade does the
rest. qemu runs about 200× slower than native: the vision stage alone takes a minute or two per
variant, a first pass a few more. One thread everywhere, so that thread count is not a difference.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGES = ("vision", "prefix", "logits")


def outputs(onnx_dir: Path, variant: str, pixels: np.ndarray, stages: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The stages' outputs of one variant on `pixels` (one image), one thread."""
    from vlmexport.runtime.bundle import open_bundle

    bundle = open_bundle(onnx_dir, variant, threads=1)
    found = {"vision": bundle.vision(pixels)}
    if "prefix" in stages or "logits" in stages:
        found["prefix"] = bundle.project(found["vision"])
    if "logits" in stages:
        found["logits"] = bundle.first_pass(found["prefix"])[0][0, -1]
    return {stage: found[stage] for stage in stages}


def relative(got: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm((got - reference).astype(np.float64)) / np.linalg.norm(reference.astype(np.float64)))


def sample_pixels(onnx_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """One sample image as the bundle preprocesses it, and the same with every value one ulp up."""
    from vlmexport.bundle.preprocess import bundle_preprocessor
    from vlmexport.samples import sample_images

    preprocessor = bundle_preprocessor(onnx_dir)
    pixels = preprocessor(sample_images(1, preprocessor.height))
    return pixels, np.nextafter(pixels, np.float32(np.inf)).astype(np.float32)


def emulated(onnx_dir: Path, variants: list[str], stages: tuple[str, ...], cpu: str, workdir: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every variant's outputs computed under `qemu-x86_64 -cpu cpu` (this script, --dump)."""
    found = {}
    for variant in variants:
        path = workdir / f"{variant}.npz"
        command = ["qemu-x86_64", "-cpu", cpu, sys.executable, __file__, "--onnx-dir", str(onnx_dir), "--variants", variant, "--stages", ",".join(stages), "--dump", str(path)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if "TCG doesn't support" not in line]
            raise RuntimeError(f"qemu-x86_64 -cpu {cpu} failed on {variant}: {' '.join(lines[-3:])} (its models: qemu-x86_64 -cpu help)")
        with np.load(path) as data:
            found[variant] = {stage: data[stage] for stage in stages}
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--variants", default=None, help="comma-separated (default: every variant of the bundle)")
    parser.add_argument("--stages", default="vision,prefix,logits")
    parser.add_argument("--emulate", default=None, metavar="CPU", help="also run under qemu-x86_64 -cpu CPU (e.g. EPYC-Rome: AVX2, no AVX512/VNNI)")
    parser.add_argument("--dump", type=Path, default=None, help=argparse.SUPPRESS)  # the emulated run's outputs
    args = parser.parse_args()

    from vlmexport.bundle.manifest import read_manifest
    from vlmexport.validate.portable import host_line

    stages = tuple(s for s in args.stages.split(",") if s)
    if not stages or set(stages) - set(STAGES):
        parser.error(f"--stages: some of {', '.join(STAGES)}")
    variants = args.variants.split(",") if args.variants else list(read_manifest(args.onnx_dir).variants)
    pixels, nudged = sample_pixels(args.onnx_dir)
    if args.dump:
        np.savez(args.dump, **outputs(args.onnx_dir, variants[0], pixels, stages))
        return 0
    if args.emulate and shutil.which("qemu-x86_64") is None:
        parser.error("--emulate needs qemu-x86_64 (Debian: apt install qemu-user)")
    print(host_line())
    reference = outputs(args.onnx_dir, "fp32", pixels, stages)
    here = {v: outputs(args.onnx_dir, v, pixels, stages) for v in variants}
    moved = {v: outputs(args.onnx_dir, v, nudged, stages) for v in variants}
    with tempfile.TemporaryDirectory() as workdir:
        try:
            there = emulated(args.onnx_dir, variants, stages, args.emulate, Path(workdir)) if args.emulate else {}
        except RuntimeError as exc:
            parser.error(str(exc))
    columns = ["vs fp32", "one ulp"] + ([f"that CPU ({args.emulate})"] if there else [])
    print(f"\nrelative change, one image, 1 thread: {' | '.join(columns)}")
    print("| variant | stage | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for v in variants:
        for stage in stages:
            cells = [relative(here[v][stage], reference[stage]), relative(moved[v][stage], here[v][stage])]
            cells += [relative(there[v][stage], here[v][stage])] if there else []
            print(f"| {v} | {stage} | " + " | ".join(f"{c:.2g}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
