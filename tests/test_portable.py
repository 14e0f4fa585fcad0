"""Portable by proof: the static int16 bound (validate/portable.py) against the kernels it models.

This machine may have VNNI, where nothing saturates: the proof is what protects an AVX2 one. To
show the proof models the real AVX2 kernels, the same graphs also run under qemu's Haswell CPU
model (AVX2, no AVX512/VNNI), where onnxruntime picks its non-VNNI kernels: a graph the proof
rejects does compute wrong numbers there, and the graphs it accepts compute exactly.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlmexport.validate.portable import INT16_MAX, host_cpu, pair_worst, prove_model

K, N = 64, 8


def matmul_integer(weights: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, ["M", N])],
        [numpy_helper.from_array(weights, "B")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def nbits_weights(bits: int) -> np.ndarray:
    """[K, N] weights of random signs whose magnitudes reach every block's extremes."""
    rng = np.random.default_rng(bits)
    return np.where(rng.random((K, N)) < 0.5, -1.0, 1.0).astype(np.float32) * rng.uniform(0.5, 1.0, (K, N)).astype(np.float32)


def matmul_nbits(bits: int) -> onnx.ModelProto:
    """An 8- or 4-bit MatMulNBits (accuracy level 4) from onnxruntime's own quantizer, weights at
    the extremes of their range (what the blockwise recipes ship)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    weights = nbits_weights(bits)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", N])],
        [numpy_helper.from_array(weights, "W")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    return quantizer.model.model


FULL = np.where(np.arange(K * N).reshape(K, N) % 3 == 0, -128, 127).astype(np.int8)
SEVEN_BIT = (FULL.astype(np.int16) // 2).astype(np.int8)  # [-64, 63]: what reduce_range stores


def test_full_range_int8_weights_are_rejected_with_the_worst_pair():
    [proof] = prove_model(matmul_integer(FULL), "g.onnx")
    assert proof.worst == 255 * 254 and not proof.passed
    assert proof.node == "mm" and proof.op_type == "MatMulInteger"


def test_seven_bit_and_unsigned_weights_pass():
    [proof] = prove_model(matmul_integer(SEVEN_BIT), "g.onnx")
    assert proof.worst == 255 * 126 <= INT16_MAX and proof.passed
    assert prove_model(matmul_integer(FULL.view(np.uint8)), "g.onnx") == []  # U8U8 widens first


def test_pairs_are_adjacent_rows_of_k():
    weights = np.zeros((4, 1), np.int8)
    weights[1, 0] = weights[2, 0] = 127  # rows 1 and 2 are in different pairs (0,1) and (2,3)
    assert pair_worst(weights) == 255 * 127 <= INT16_MAX
    weights[0, 0] = 127  # rows 0 and 1 now share a pair
    assert pair_worst(weights) == 255 * 254


@pytest.mark.parametrize("bits", [8, 4])
def test_matmulnbits_at_accuracy_level_4_is_proven_by_its_kernel_bound(bits):
    [proof] = prove_model(matmul_nbits(bits), "g.onnx")
    assert proof.op_type == "MatMulNBits" and proof.passed


def test_host_record_names_isa_and_onnxruntime_version():
    import onnxruntime

    host = host_cpu()
    assert host["onnxruntime"] == onnxruntime.__version__ and isinstance(host["isa"], list)


HASWELL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np, onnx, onnxruntime as ort
    out, K = {}, int(sys.argv[2])
    for name in sys.argv[3:]:
        model = onnx.load(f"{sys.argv[1]}/{name}.onnx")
        so = ort.SessionOptions(); so.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        kind = session.get_inputs()[0].type
        # Extremes: 255 for uint8 inputs; for float inputs ±1 with the signs of the first row of
        # weights (|a| quantizes to 127 in every block, each product at its most positive), then
        # the opposite signs.
        signs = np.sign(np.load(f"{sys.argv[1]}/{name}.signs.npy")) if "uint8" not in kind else None
        a = np.full((2, K), 255, np.uint8) if signs is None else np.stack([signs, -signs]).astype(np.float32)
        out[name] = session.run(None, {"A": a})[0].astype(np.float64).tolist()
    print(json.dumps(out))
    """
)


def _qemu() -> str | None:
    return shutil.which("qemu-x86_64") if platform.machine() == "x86_64" else None


@pytest.mark.skipif(platform.machine() != "x86_64", reason="qemu's Haswell model emulates x86 kernels on x86 hosts")
def test_proof_matches_what_avx2_kernels_compute_under_qemu_haswell(tmp_path):
    qemu = _qemu()
    assert qemu, "qemu-x86_64 missing: tests/install-deps.sh installs qemu-user (make test runs it)"
    graphs = {"full": matmul_integer(FULL), "seven": matmul_integer(SEVEN_BIT), "nbits8": matmul_nbits(8), "nbits4": matmul_nbits(4)}
    for name, model in graphs.items():
        onnx.save(model, str(tmp_path / f"{name}.onnx"))
    for bits in (8, 4):
        np.save(tmp_path / f"nbits{bits}.signs.npy", nbits_weights(bits)[:, 0])
    script = tmp_path / "run.py"
    script.write_text(HASWELL_SCRIPT)
    python = str(Path(sys.executable))
    args = [str(script), str(tmp_path), str(K), *graphs]
    native = subprocess.run([python, *args], capture_output=True, text=True, check=True)
    emulated = subprocess.run([qemu, "-cpu", "Haswell", python, *args], capture_output=True, text=True, timeout=300)
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    here, haswell = json.loads(native.stdout), json.loads(emulated.stdout)
    exact = {
        "full": np.full((2, 1), 255.0) * FULL.astype(np.float64).sum(0),
        "seven": np.full((2, 1), 255.0) * SEVEN_BIT.astype(np.float64).sum(0),
    }
    isa = host_cpu()["isa"]
    if "avx2" in isa and not {"avx512_vnni", "avx_vnni"} & set(isa):
        # This host is the kind qemu models (seen on AMD EPYC): its own kernels saturate where
        # the proof fails, and are exact where it passes.
        assert not np.array_equal(np.array(here["full"]), exact["full"]) and np.array_equal(np.array(here["seven"]), exact["seven"])
    for name, model in graphs.items():
        proven = all(p.passed for p in prove_model(model, name))
        got, reference = np.array(haswell[name]), np.array(here[name])
        if name in exact:
            assert np.array_equal(got, exact[name]) == proven, f"{name}: Haswell result {'differs' if proven else 'is exact'} against the proof"
        else:
            # Float outputs: Haswell's non-VNNI kernels agree with this machine's to float rounding.
            assert proven and np.allclose(got, reference, rtol=1e-5, atol=1e-5), name


def test_conv_weights_are_bounded_whatever_the_pairing():
    weights = np.zeros((2, 3, 2, 2), np.int8)
    weights[0, 0, 0, 0] = weights[0, 2, 1, 1] = 127  # far apart in (C, kh, kw), still one channel
    assert pair_worst(weights, conv=True) == 255 * 254
    weights[0, 2, 1, 1] = 0
    weights[1, 1, 0, 1] = -64
    assert pair_worst(weights, conv=True) == 255 * 127
