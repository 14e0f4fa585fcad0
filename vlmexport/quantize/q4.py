"""q4: 4-bit weight-only MatMulNBits (block 32, symmetric, accuracy level 4) via onnxruntime's
MatMulNBitsQuantizer.

The tied table: the head's MatMulNBits stores E (vocab × embed) as 4-bit blocks of 32 along
the embedding axis, row by row, with an implicit zero point of 8 — exactly the layout
GatherBlockQuantized reads as uint8 data with `bits=4` (its default zero point for uint8 is
2^(bits-1) = 8). So the embedding Gather becomes a GatherBlockQuantized over a Reshape of the
head's own weights and scales: one 4-bit table for both reads. Excluding the head
(`--exclude-nodes '*lm_head*'`, the "lm_head optional" choice) keeps the table float32, still stored once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from vlmexport.quantize import shared
from vlmexport.quantize.integer import quiet_root_logger

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 compute of the activations where the runtime has such kernels
BITS = 4


def quantize_q4(model: onnx.ModelProto, exclude: list[str]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """`model` with every constant-weight MatMul as MatMulNBits (4-bit), the tied table shared."""
    found = shared.shared_tables(model)
    tables = [t for t in found if not any(n in exclude for n in (*t.gather_nodes, *t.matmul_nodes))]
    if tables:
        shared.unshare(model)  # tables whose head is excluded are stored once again below
    quantizer = MatMulNBitsQuantizer(
        model, bits=BITS, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL,
        nodes_to_exclude=exclude, op_types_to_quantize=("MatMul",),
    )  # fmt: skip
    with quiet_root_logger():
        quantizer.process()
    quantized = quantizer.model.model
    shared_q4 = [_gather_from_head(quantized, table) for table in tables]
    shared.store_shared_weights_once(quantized)  # an excluded head's float table: once again
    record = {
        "method": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "weights": f"{BITS}-bit symmetric, blocks of {BLOCK_SIZE}, accuracy_level {ACCURACY_LEVEL}",
        "tied_table": _table_note(found, tables, shared_q4),
        "excluded_nodes": len(exclude),
    }
    return quantized, record


def _gather_from_head(model: onnx.ModelProto, table: shared.SharedTable) -> bool:
    """Point the table's Gathers at the head's 4-bit weights; False if they cannot share them."""
    graph = model.graph
    head = next((n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith(table.transposed)), None)
    if head is None:
        return False  # not quantized (excluded by the quantizer itself): the float table stays
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    vocab, embed = int(attrs["N"]), int(attrs["K"])
    if embed % BLOCK_SIZE:
        # The head's last block is padded, GatherBlockQuantized reads whole blocks: the Gather
        # keeps the float table (only tiny test models have such widths; real ones are multiples of 64).
        return False
    shapes = {
        "data": (head.input[1], [vocab, embed * BITS // 8]),
        "scales": (head.input[2], [vocab, -1]),
    }
    views = {}
    for key, (source, shape) in shapes.items():
        name = f"{source}_as_gather_{key}"
        shape_name = f"{name}_shape"
        graph.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), shape_name))
        graph.node.insert(0, helper.make_node("Reshape", [source, shape_name], [name], name=f"{name}_reshape"))
        views[key] = name
    for node in list(graph.node):
        if node.name in table.gather_nodes:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            replacement = helper.make_node(
                "GatherBlockQuantized", [views["data"], node.input[1], views["scales"]], list(node.output),
                name=f"{node.name}_Q4", domain="com.microsoft", bits=BITS, block_size=BLOCK_SIZE, gather_axis=axis, quantize_axis=1,
            )  # fmt: skip
            graph.node.insert(list(graph.node).index(node), replacement)
            graph.node.remove(node)
    if not any(table.source in n.input for n in graph.node):
        kept = [i for i in graph.initializer if i.name != table.source]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return True


def _table_note(found: list[shared.SharedTable], tables: list[shared.SharedTable], shared_q4: list[bool]) -> str:
    if not found:
        return "none"
    if not tables:
        return "fp32, stored once (head excluded)"
    if all(shared_q4):
        return "4-bit, one copy read by MatMulNBits and GatherBlockQuantized"
    return f"4-bit head, fp32 Gather table (embed width not a multiple of {BLOCK_SIZE})"
