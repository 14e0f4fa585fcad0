"""Where a variant's speed comes from on this CPU: every weight matmul of a bundle, per variant, at
the prefix's rows and at one row.

    .venv/bin/python bench/matmul_rows.py --onnx-dir BUNDLE [--variants fp32,int8,q4] [--rows 196,1]
        [--components vision_encoder,decoder] [--threads 2] [--runs 30]

A caption is the vision encoder and the decoder's first pass over the image prefix (196 rows
through every weight matrix) and then one decode step per token (one row). Integer kernels
differ by ISA far more than float32's sgemm does, so a variant that is faster than fp32 on one
CPU kind can be slower on another; this script says which kernel, at which row count, is why.
For each component it times a graph of only that component's weight matmuls (bench/decode_floor.py's
`weight_matmuls`: the variant's own weights and ops, kept-float nodes included), and, beside the
bundle's variants, `dynamic`: the fp32 matmuls through onnxruntime's quantize_dynamic with 7-bit
weights (what `quantize --recipe dynamic` ships: MatMulInteger, one activation scale per
tensor). Variants alternate in one process so that the machine's drift hits all alike; each
line gives the median and the ratio to fp32's (above 1: slower than fp32). The CPU kind is
printed first: no number here holds for another kind.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_floor import session, weight_matmuls  # noqa: E402


def dynamic(matmuls: onnx.ModelProto) -> onnx.ModelProto:
    """The fp32 matmuls as `--recipe dynamic` writes them: int8 weights with reduce_range
    (7 bits, so x86 without VNNI cannot saturate), uint8 activations per tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from vlmexport.quantize.integer import quiet_root_logger

    with tempfile.TemporaryDirectory() as folder, quiet_root_logger():
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "dynamic.onnx"
        onnx.save(matmuls, str(source))
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, reduce_range=True)
        return onnx.load(str(target))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-dir", type=Path, required=True)
    parser.add_argument("--variants", default="fp32,int8,q4")
    parser.add_argument("--rows", default="196,1", help="activation rows: the prefix's (first pass, vision encoder) and a decode step's")
    parser.add_argument("--components", default="vision_encoder,decoder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per graph and row count, in rounds of 5")
    args = parser.parse_args()

    from vlmexport.bundle.manifest import read_manifest
    from vlmexport.validate.portable import host_line

    manifest = read_manifest(args.onnx_dir)
    variants = [v for v in args.variants.split(",") if v]
    missing = [v for v in variants if v not in manifest.variants]
    if missing:
        print(f"error: {args.onnx_dir} has no variant {', '.join(missing)}: run `vlmexport quantize --onnx-dir {args.onnx_dir} --mode {missing[0]}`", file=sys.stderr)
        return 2
    print(f"{host_line()}; {args.threads} threads")
    rng = np.random.default_rng(0)
    rows = [int(r) for r in args.rows.split(",")]
    for component in args.components.split(","):
        graphs = {v: weight_matmuls(onnx.load(str(args.onnx_dir / manifest.component_file(component, v)))) for v in variants}
        if "fp32" in graphs:
            graphs["dynamic"] = dynamic(graphs["fp32"])
        sessions = {name: session(graph, args.threads) for name, graph in graphs.items()}
        widths = sorted({int(i.name[1:]) for graph in graphs.values() for i in graph.graph.input})
        count = sum(n.op_type in ("MatMul", "MatMulNBits", "MatMulInteger") for n in graphs[variants[0]].graph.node)
        for m in rows:
            feeds = {f"x{w}": rng.standard_normal((m, w)).astype(np.float32) for w in widths}
            times: dict[str, list[float]] = {name: [] for name in sessions}
            for run in sessions.values():
                run.run(None, {i.name: feeds[i.name] for i in run.get_inputs()})  # warm-up: weight packing
            for _ in range(max(args.runs // 5, 1)):
                for name, run in sessions.items():
                    inputs = {i.name: feeds[i.name] for i in run.get_inputs()}
                    for _ in range(5):
                        started = time.perf_counter()
                        run.run(None, inputs)
                        times[name].append(time.perf_counter() - started)
            medians = {name: statistics.median(values) * 1e3 for name, values in times.items()}
            base = medians.get("fp32")
            print(f"{component}: {count} weight matmuls, {m} row{'s' if m > 1 else ''}")
            for name, ms in medians.items():
                ratio = f"{ms / base:5.2f} × fp32" if base else ""
                print(f"  {name:8s} {ms:9.2f} ms  {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
