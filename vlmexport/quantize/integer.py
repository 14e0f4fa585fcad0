"""The `dynamic` recipe of int8 and uint8 (`quantize --recipe dynamic`): ONNX Runtime dynamic quantization (weights int8/uint8, activations uint8 at run time).

Choices, measured on the full-size synthetic model and the shapes example (bench/quantize_bench.py).
On the real-weights model this recipe loses the model (per-tensor activation scales cannot hold a
pretrained LM's outlier channels: mean KL 0.88 nats), so it is no longer int8's default and
its variants fail the int8 profile there; it stays for runtimes without MatMulNBits.

- Weights: int8 mode = signed, symmetric (U8S8 kernels, the fastest on x86 with VNNI, ARM and
  WebAssembly); uint8 mode = unsigned, asymmetric (U8U8, what transformers.js ships as
  `model_quantized.onnx`, for runtimes without signed kernels). Activations are always uint8:
  ONNX Runtime's dynamic quantization supports nothing else.
- reduce_range is on for int8 weights: x86 without VNNI (AVX2, many CI runners) multiplies u8
  activations by s8 weights with VPMADDUBSW, which adds two products into a saturating int16
  (255·127·2 > 32767): full-range int8 weights give results off by up to 2× there (observed under
  `qemu-x86_64 -cpu Haswell`), while VNNI, ARM and WebAssembly are exact — a bundle would say
  different things on different machines. 7-bit weights (255·64·2 < 32767) cannot saturate;
  validate/portable.py proves it from the stored weights. uint8 weights (U8U8 kernels widen to
  int16 before multiplying) need no such reduction.
- Per component: which MatMuls are per-channel and whether the patch-embedding Conv becomes
  ConvInteger is in `COMPONENT_CHOICES`; `--per-channel/--no-per-channel` overrides it.
- The tied embedding / LM head table is quantized per tensor, identically for its Gather and its
  MatMul, and stored once (see shared.py): a per-row scale cannot follow a Gather through
  DequantizeLinear, and two differently quantized copies would undo most of the saving.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from vlmexport.quantize import shared


@dataclass(frozen=True)
class ComponentChoice:
    """What dynamic quantization does to one component (defaults chosen by measurement)."""

    per_channel: bool
    conv: bool  # quantize Conv as ConvInteger


COMPONENT_CHOICES: dict[str, ComponentChoice] = {
    "vision_encoder": ComponentChoice(per_channel=True, conv=False),
    "projection": ComponentChoice(per_channel=True, conv=False),
    "decoder": ComponentChoice(per_channel=True, conv=False),
    "prefix_init": ComponentChoice(per_channel=True, conv=False),
    "language_model": ComponentChoice(per_channel=True, conv=False),
}
WEIGHT_TYPES = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}


def exclude_any(table: shared.SharedTable, exclude: list[str]) -> bool:
    return any(name in exclude for name in (*table.gather_nodes, *table.matmul_nodes))


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """onnxruntime's quantization tools log through the root logger (e.g. a "please pre-process"
    warning on every call: pre-processing would bake x86-specific fusions into a file meant for
    the browser too, so it is skipped on purpose); silence them for the duration only."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def quantize_integer(
    model: onnx.ModelProto, mode: str, component: str, per_channel: bool | None, exclude: list[str], conv: bool | None = None,
    reduce_range: bool | None = None,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The int8/uint8 dynamically quantized `model`, and a record of the settings used.

    `exclude` holds node names already matched from the user's patterns. `reduce_range`
    overrides the portable default (tests build a full-range graph with it, to see it refused).
    """
    choice = COMPONENT_CHOICES[component]
    per_channel = choice.per_channel if per_channel is None else per_channel
    conv = choice.conv if conv is None else conv
    weight_type = WEIGHT_TYPES[mode]
    if reduce_range is None:
        reduce_range = weight_type == QuantType.QInt8  # see the module docstring
    op_types = ["MatMul", "Gather"] + (["Conv"] if conv else [])
    tables = shared.unshare(model)
    # A table is quantized for both of its reads or for neither: excluding one read keeps it fp32.
    table_nodes = [n for t in tables if not exclude_any(t, exclude) for n in (*t.gather_nodes, *t.matmul_nodes)]
    exclude = exclude + [n for t in tables if exclude_any(t, exclude) for n in (*t.gather_nodes, *t.matmul_nodes)]
    with tempfile.TemporaryDirectory(prefix="vlmexport-quantize-") as tmp, quiet_root_logger():
        current: onnx.ModelProto | Path = model
        if table_nodes:
            # Pass 1: the shared table alone, per tensor, the same settings for both of its reads
            # (the Gather side would otherwise use the activation type: uint8, asymmetric).
            same = {"quant_type": weight_type, "symmetric": weight_type == QuantType.QInt8, "reduce_range": reduce_range}
            overrides = {name: [dict(same)] for t in tables for name in (t.source, t.transposed)}
            current = Path(tmp) / "tables.onnx"
            quantize_dynamic(
                model, current, op_types_to_quantize=["MatMul", "Gather"], per_channel=False, reduce_range=reduce_range,
                weight_type=weight_type, nodes_to_quantize=table_nodes, extra_options={"TensorQuantOverrides": overrides},
            )  # fmt: skip
        out = Path(tmp) / "quantized.onnx"
        quantize_dynamic(
            current, out, op_types_to_quantize=op_types, per_channel=per_channel, reduce_range=reduce_range,
            weight_type=weight_type, nodes_to_exclude=exclude + table_nodes,
        )  # fmt: skip
        quantized = onnx.load(str(out))
    if tables:
        shared.reshare(quantized, tables, component)
    record = {
        "method": "onnxruntime.quantization.quantize_dynamic",
        "weights": f"{'int8 symmetric' if weight_type == QuantType.QInt8 else 'uint8 asymmetric'}, "
        f"{'per-channel' if per_channel else 'per-tensor'}, reduce_range {reduce_range}",
        "activations": "uint8, dynamic per tensor",
        "conv": "ConvInteger" if conv else "fp32",
        "tied_table": "per-tensor, stored once" if table_nodes else ("fp32, stored once" if tables else "none"),
        "excluded_nodes": len(exclude),
    }
    return quantized, record

