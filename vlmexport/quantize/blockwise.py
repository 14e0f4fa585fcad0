"""Blockwise weight quantization: MatMulNBits (8 or 4 bits, blocks of 32 along the input axis)
via onnxruntime's MatMulNBitsQuantizer — the recipe of the int8, uint8 and q4 variants.

Why this and not `quantize_dynamic` (MatMulInteger), measured on the real-weights model
(`vlmexport synth --preset smollm2-135m-real`; numbers in the module docstring of
vlmexport.quantize):

- Activations: MatMulNBits at accuracy level 4 quantizes each activation row per block of 32
  channels, where dynamic quantization uses one scale for the whole tensor — a pretrained LM's
  outlier channels (10³× the median at some down_proj inputs) leave the rest of a per-tensor
  range no resolution. With the outliers also migrated into the weights (smooth.py), 8-bit
  blocks reach mean KL 0.006 where dynamic int8 gives 0.88.
- Portability: its x86 AVX2 kernels (no VNNI) multiply u8 activations' |a| ≤ 127 by weights
  whose pair sums cannot reach int16's limit (4-bit codes ≤ 15; 8-bit codes masked so each
  VPMADDUBSW pair has one zero term: 255·128 < 32767), then widen to int32 — proven in
  validate/portable.py, and observed under `qemu-x86_64 -cpu Haswell` in the tests. U8S8
  MatMulInteger with full-range int8 weights saturates there (results off by up to 2×).
- onnxruntime-web runs MatMulNBits (8 and 4 bits) and GatherBlockQuantized; it computes them
  in float32 (it ignores accuracy level 4), so web outputs sit ~1 % (relative) closer to fp32
  than native ones — the web comparison allows for that.

The tied table: the head's MatMulNBits stores E (vocab × embed) as `bits`-bit blocks of
`block_size` along the embedding axis, row by row — exactly the layout GatherBlockQuantized
reads (uint8 data, `bits`, zero point 2^(bits-1) when symmetric). So the embedding Gather becomes
a GatherBlockQuantized over a Reshape of the head's own weights and scales: one quantized table
for both reads. Excluding the head keeps the table float32, still stored once.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from vlmexport.quantize import shared
from vlmexport.quantize.integer import quiet_root_logger


@dataclass(frozen=True)
class BlockwiseRecipe:
    """What MatMulNBits does to one variant (values chosen by measurement, see the module docstring)."""

    bits: int
    symmetric: bool  # False: uint8/uint4 codes with a zero point per block
    block_size: int = 32
    accuracy_level: int = 4  # int8 compute of the activations where the runtime has such kernels
    # fnmatch patterns of MatMul nodes given 8 bits in a 4-bit recipe (mixed precision).
    high_bits: tuple[str, ...] = field(default_factory=tuple)
    # "rtn" rounds each block to its nearest codes; "hqq" (onnxruntime's HQQ config: zero points
    # and scales optimised per block, half-quadratic, no calibration data; needs torch) for bits < 8.
    algorithm: str = "rtn"
    smooth_alpha: float | None = 0.4  # outlier migration in decoder graphs (smooth.py); None: none

    def describe(self) -> str:
        if self.algorithm == "hqq":
            return f"{self.bits}-bit HQQ (zero points), blocks of {self.block_size}, float compute; 8-bit: {', '.join(self.high_bits) or 'none'}"
        kind = "symmetric" if self.symmetric else "asymmetric (zero points)"
        return f"{self.bits}-bit {kind}, blocks of {self.block_size}, accuracy_level {self.accuracy_level}"


def quantize_blockwise(
    model: onnx.ModelProto, recipe: BlockwiseRecipe, exclude: list[str], high_nodes: list[str] | None = None
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """`model` with every constant-weight MatMul as MatMulNBits, the tied table shared.

    `exclude` are node names kept float32; `high_nodes` (plus the recipe's `high_bits`
    patterns) get 8 bits where the recipe has fewer.
    """
    found = shared.shared_tables(model)
    tables = [t for t in found if not any(n in exclude for n in (*t.gather_nodes, *t.matmul_nodes))]
    if tables:
        shared.unshare(model)  # tables whose head is excluded are stored once again below
    matmuls = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in exclude]
    high = sorted({n for n in matmuls if n in (high_nodes or []) or any(fnmatch.fnmatchcase(n, p) for p in recipe.high_bits)})
    if recipe.bits >= 8:
        high = []
    if high:
        model = _nbits(model, BlockwiseRecipe(8, True, recipe.block_size, recipe.accuracy_level), 8, exclude, include=high)
    model = _nbits(model, recipe, recipe.bits, exclude, include=None)
    shared_ok = [_gather_from_head(model, table) for table in tables]
    shared.store_shared_weights_once(model)  # an excluded head's float table: once again
    record = {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "weights": recipe.describe(),
        "activations": "float32 in and out; int8 per block inside the kernel (accuracy_level 4)",
        "tied_table": _table_note(found, tables, shared_ok, recipe),
        "excluded_nodes": len(exclude),
        "excluded": sorted(exclude),
        "eight_bit_nodes": high,
    }
    return model, record


def _nbits(model: onnx.ModelProto, recipe: BlockwiseRecipe, bits: int, exclude: list[str], include: list[str] | None) -> onnx.ModelProto:
    if include is not None:
        # The quantizer's nodes_to_include adds to op_types_to_quantize rather than restricting
        # it: restrict by excluding every other MatMul.
        exclude = list(exclude) + [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in include]
    if recipe.algorithm == "hqq":
        from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig

        config = HQQWeightOnlyQuantConfig(block_size=recipe.block_size, bits=bits, op_types_to_quantize=("MatMul",))
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=config)
    else:
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=recipe.block_size, is_symmetric=recipe.symmetric, accuracy_level=recipe.accuracy_level,
            nodes_to_exclude=list(exclude), op_types_to_quantize=("MatMul",),
        )  # fmt: skip
    with quiet_root_logger():
        quantizer.process()
    return quantizer.model.model


def _gather_from_head(model: onnx.ModelProto, table: shared.SharedTable) -> bool:
    """Point the table's Gathers at the head's quantized weights; False if they cannot share them."""
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(table.transposed)), None)
    if head is None:
        return False  # not quantized (excluded by the quantizer itself): the float table stays
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, embed, bits, block = int(attrs["N"]), int(attrs["K"]), int(attrs["bits"]), int(attrs["block_size"])
    if embed % block:
        # The head's last block is padded, GatherBlockQuantized reads whole blocks: the Gather
        # keeps the float table (only tiny test models have such widths; real ones are multiples of 64).
        return False
    shapes = {"data": (head.input[1], [vocab, embed * bits // 8]), "scales": (head.input[2], [vocab, -1])}
    if len(head.input) > 3 and head.input[3]:
        # Zero points: packed per row like the data (4-bit: two per byte; 8-bit: one).
        shapes["zero_points"] = (head.input[3], [vocab, -1])
    views = {}
    for key, (source, shape) in shapes.items():
        name = f"{source}_as_gather_{key}"
        shape_name = f"{name}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
        graph.node.insert(0, helper.make_node("Reshape", [source, shape_name], [name], name=f"{name}_reshape"))
        views[key] = name
    rest = [views["scales"]] + ([views["zero_points"]] if "zero_points" in views else [])  # after the data and the indices
    for node in list(graph.node):
        if node.name in table.gather_nodes:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            replacement = helper.make_node(
                "GatherBlockQuantized", [views["data"], node.input[1], *rest], list(node.output),
                name=f"{node.name}_Q{bits}", domain="com.microsoft", bits=bits, block_size=block, gather_axis=axis, quantize_axis=1,
            )  # fmt: skip
            graph.node.insert(list(graph.node).index(node), replacement)
            graph.node.remove(node)
    if not any(table.source in n.input for n in graph.node):
        kept = [i for i in graph.initializer if i.name != table.source]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return True


def _table_note(found: list[shared.SharedTable], tables: list[shared.SharedTable], shared_ok: list[bool], recipe: BlockwiseRecipe) -> str:
    if not found:
        return "none"
    if not tables:
        return "fp32, stored once (head excluded)"
    if all(shared_ok):
        return "quantized like the head, one copy read by MatMulNBits and GatherBlockQuantized"
    return f"quantized head, fp32 Gather table (embed width not a multiple of {recipe.block_size})"
