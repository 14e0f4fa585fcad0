"""Portable by proof: a variant computes the same on every CPU onnxruntime runs it on.

Parity measured on one machine says nothing about another whose kernels differ. The one known
way onnxruntime's CPU kernels give *different numbers* on different x86 machines is int16
saturation: without VNNI (AVX2 machines, many CI runners), MLAS multiplies uint8 activations by
int8 weights with VPMADDUBSW, which adds two u8×s8 products into a saturating int16 before
widening — full-range int8 weights overflow it (255·127·2 = 64770 > 32767) and the result is
silently wrong (observed under `qemu-x86_64 -cpu Haswell`: 1048544 instead of 2072640). VNNI,
ARM and WebAssembly accumulate in int32 and are exact. So `check` proves, from the stored
weights, that no kernel of the variant can saturate on any machine, whichever machine runs it:

| op (u8 activations × s8 weights)                                          | worst int16 pair, over any uint8 activation |
|---------------------------------------------------------------------------|---------------------------------------------|
| MatMulInteger, DynamicQuantizeMatMul, MatMulIntegerToFloat, QLinearMatMul | 255 · (w[2i]⁺ + w[2i+1]⁺), likewise for w⁻, over adjacent rows of K |
| ConvInteger, QLinearConv                                                  | 255 · the two largest same-signed weights of an output channel (any pairing) |
| MatMulNBits, accuracy level 4 (8 or 4 bits)                               | constant: 8-bit codes are masked so one term of each pair is 0 (255·128 = 32640); 4-bit codes ≤ 15 (2·15·127 = 3810) |

Pairs: MLAS packs B so each VPMADDUBSW pair is rows (2i, 2i+1) of K (K padded with zeros).
The activation range is the full uint8 range, not the one seen: a proof over calibration data
would hold only for images like those. Unsigned weights (U8U8) widen to int16 before
multiplying and cannot saturate; MatMulNBits' kernels read from onnxruntime 1.32's MLAS
(sqnbitgemm_kernel_avx2_int8_blklen32.h, sqnbitgemm_kernel_avx2_int8_blklen64.h) and tested
adversarially under qemu's Haswell model (tests/test_portable.py).

What this proves is that every integer kernel computes the exact sum on every CPU, given the same
inputs. It does not make a quantized variant's outputs bit-identical across CPUs: the float
kernels around those kernels differ by ulps between ISAs, and MatMulNBits' activation roundings
amplify ulps into another draw of the quantization noise (measured: quantize.fidelity.nudged,
bench/ulp_sensitivity.py). The same error, not the same numbers — the profiles bound its size.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from vlmexport.bundle.manifest import Manifest
from vlmexport.validate.metrics import Measurement

INT16_MAX = 32767
UINT8_MAX = 255
# Ops whose x86 kernel multiplies u8 activations by s8 weights pairwise into int16; value: the
# input index of the weights.
U8S8_WEIGHT_INPUT = {
    "MatMulInteger": 1,
    "DynamicQuantizeMatMul": 1,
    "MatMulIntegerToFloat": 1,
    "ConvInteger": 1,
    "QLinearMatMul": 3,
    "QLinearConv": 3,
}
INTEGER_OPS = frozenset({*U8S8_WEIGHT_INPUT, "MatMulNBits"})
# MatMulNBits: bits → worst int16 pair in its int8 (accuracy level 4) kernels; see the docstring.
NBITS_WORST = {8: UINT8_MAX * 128, 4: 2 * 15 * 127}
FIX = "re-quantize: `vlmexport quantize --mode int8 --force` (blockwise MatMulNBits), or --recipe dynamic (7-bit int8 weights)"


@dataclass(frozen=True)
class KernelProof:
    """One integer node: its worst int16 pair sum over the stored weights and any uint8 activation."""

    file: str
    node: str
    op_type: str
    worst: int
    limit: int = INT16_MAX

    @property
    def passed(self) -> bool:
        return self.worst <= self.limit


def prove_graph(path: Path, relative: str | None = None) -> list[KernelProof]:
    """Every integer node of the graph at `path` that could saturate on some x86 machine, with its bound."""
    model = onnx.load(str(path))
    return prove_model(model, relative or Path(path).name)


def prove_model(model: onnx.ModelProto, name: str) -> list[KernelProof]:
    inits = {i.name: i for i in model.graph.initializer}
    constants = {n.output[0]: n for n in model.graph.node if n.op_type in ("Constant", "Transpose")}
    proofs = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), 4)
            level = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "accuracy_level"), 0)
            if level == 4:  # levels 0-3 compute in float: nothing to saturate
                worst = NBITS_WORST.get(int(bits))
                proofs.append(KernelProof(name, node.name, node.op_type, worst if worst is not None else INT16_MAX + 1))
            continue
        index = U8S8_WEIGHT_INPUT.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        weights = _constant(node.input[index], inits, constants)
        if weights is None:
            # Weights computed at run time: no proof is possible, so no pass either.
            proofs.append(KernelProof(name, node.name, node.op_type, INT16_MAX + 1))
            continue
        if weights.dtype != np.int8:
            continue  # u8 weights: U8U8 kernels widen first
        proofs.append(KernelProof(name, node.name, node.op_type, pair_worst(weights, conv=node.op_type.endswith("Conv") or node.op_type == "ConvInteger")))
    return proofs


def _constant(name: str, inits: dict, constants: dict) -> np.ndarray | None:
    """The value of a weight input: an initializer, a Constant, or a Transpose of either (how a
    tied head reads its table, stored once)."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = constants.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        return numpy_helper.to_array(node.attribute[0].t)
    source = _constant(node.input[0], inits, constants)
    perm = next((list(helper.get_attribute_value(a)) for a in node.attribute if a.name == "perm"), None)
    return None if source is None else np.transpose(source, perm)


def pair_worst(weights: np.ndarray, conv: bool = False) -> int:
    """max over output columns and adjacent K pairs of 255·|sum of same-signed weights|.

    MatMul weights are [K, N] (or [..., K, N]). Conv weights [M, C, kh, kw]: how MLAS orders the
    (C, kh, kw) axis into pairs is not pinned down here, so any two weights of an output channel
    may share a pair — the two largest of each sign (a bound no pairing can exceed).
    """
    w = weights.astype(np.int64)
    if conv:
        per_channel = np.sort(w.reshape(w.shape[0], -1), axis=1)
        positive = np.clip(per_channel[:, -2:], 0, None).sum(axis=1)
        negative = -np.clip(per_channel[:, :2], None, 0).sum(axis=1)
        return int(UINT8_MAX * max(positive.max(initial=0), negative.max(initial=0)))
    k_major = w.reshape(-1, w.shape[-2], w.shape[-1]).transpose(1, 0, 2).reshape(w.shape[-2], -1)
    if k_major.shape[0] % 2:
        k_major = np.concatenate([k_major, np.zeros((1, k_major.shape[1]), np.int64)])
    pairs = k_major.reshape(-1, 2, k_major.shape[1])
    positive = np.clip(pairs, 0, None).sum(axis=1)
    negative = -np.clip(pairs, None, 0).sum(axis=1)
    # Negative sums may reach -32768; the bound is stated against 32767 for both (one count of slack).
    return int(UINT8_MAX * max(positive.max(initial=0), negative.max(initial=0)))


@dataclass(frozen=True)
class GraphProof:
    """The portability proof of one graph: its worst integer kernel."""

    file: str
    kernels: int
    worst: KernelProof

    @property
    def measurement(self) -> Measurement:
        return Measurement("portability", f"{self.file} {self.worst.node}", "int16 pair", float(self.worst.worst), float(self.worst.limit))

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file, "integer_kernels": self.kernels, "worst_node": self.worst.node, "op_type": self.worst.op_type,
            "worst_int16_pair": self.worst.worst, "limit": self.worst.limit, "passed": self.worst.passed,
        }  # fmt: skip


def portability(onnx_dir: Path, manifest: Manifest, variant: str) -> list[GraphProof]:
    """The int16 proof of every graph of `variant` that has integer kernels (check's portability rows)."""
    out = []
    fp32 = set(manifest.variants.get("fp32", {}).values())  # exported float graphs: no integer kernel to prove
    for relative in sorted(set(manifest.variants[variant].values()) - fp32):
        ops = manifest.files.get(relative, {}).get("ops")
        if ops is not None and not any(op.split(".")[-1] in INTEGER_OPS for op in ops):
            continue  # the manifest (verified by check first) lists the graph's ops: nothing to prove
        proofs = prove_graph(onnx_dir / relative, relative)
        if proofs:
            out.append(GraphProof(relative, len(proofs), max(proofs, key=lambda p: p.worst)))
    return out


def host_cpu() -> dict[str, object]:
    """The ISA features that decide which integer kernels onnxruntime picks here, and its version."""
    import onnxruntime

    flags: set[str] = set()
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
            if key.strip() == "model name" and not model:
                model = value.strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "asimd", "asimddp", "i8mm")
    return {
        "machine": platform.machine(),
        "cpu": model,
        "isa": [f for f in wanted if f in flags],
        "onnxruntime": onnxruntime.__version__,
    }


def host_line() -> str:
    """`host_cpu()` in one line, for the benchmarks: every speed number names the CPU kind."""
    host = host_cpu()
    features = host["isa"]
    isa = ", ".join(map(str, features)) if isinstance(features, list) and features else "no listed ISA features"
    return f"CPU: {host['cpu']} ({host['machine']}; {isa}); onnxruntime {host['onnxruntime']}"
