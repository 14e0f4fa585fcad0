"""Keep a tied embedding / LM head table stored once through quantization.

The exported decoders store the embedding E once: the Gather reads E, and the head reads
`Transpose(E)` through a node named `*_from_shared` (see exporter.onnx_io). Quantizers only
quantize a MatMul whose weight is an initializer, so left alone they keep the head in fp32
(and the fp32 table with it) beside a quantized copy for the Gather — measured on the tiny
fixture: the table grows to 1.25× instead of shrinking to 0.25×. So the table is
materialised as an initializer for the quantizer (`unshare`), quantized identically for both
uses, and stored once again afterwards (`reshare`, the exporter's own dedupe pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from vlmexport.errors import BundleError
from vlmexport.exporter.onnx_io import SHARED_SUFFIX, store_shared_weights_once


@dataclass(frozen=True)
class SharedTable:
    """One table read twice: `source` (Gather data, [V, D]) and `transposed` ([D, V], the head's weight)."""

    source: str
    transposed: str
    gather_nodes: tuple[str, ...]
    matmul_nodes: tuple[str, ...]
    nbytes: int


def shared_tables(model: onnx.ModelProto) -> list[SharedTable]:
    """The tables the exporter stored once and reads through a `*_from_shared` Transpose."""
    inits = {i.name: i for i in model.graph.initializer}
    tables = []
    for node in model.graph.node:
        if node.op_type != "Transpose" or not node.name.endswith(SHARED_SUFFIX) or node.input[0] not in inits:
            continue
        source, transposed = node.input[0], node.output[0]
        gathers = tuple(n.name for n in model.graph.node if n.op_type == "Gather" and n.input[0] == source)
        matmuls = tuple(n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and transposed in n.input[1:2])
        size = numpy_helper.to_array(inits[source]).nbytes
        tables.append(SharedTable(source, transposed, gathers, matmuls, size))
    return tables


def unshare(model: onnx.ModelProto) -> list[SharedTable]:
    """Replace each `*_from_shared` Transpose by a transposed copy of the table (in place)."""
    tables = shared_tables(model)
    inits = {i.name: i for i in model.graph.initializer}
    for table in tables:
        array = numpy_helper.to_array(inits[table.source]).T.copy()
        model.graph.initializer.append(numpy_helper.from_array(array, table.transposed))
        node = next(n for n in model.graph.node if n.op_type == "Transpose" and n.output[0] == table.transposed)
        model.graph.node.remove(node)
    return tables


def reshare(model: onnx.ModelProto, tables: list[SharedTable], what: str) -> int:
    """Store tables that came out of the quantizer identical (or transposed) once again.

    Raises:
        BundleError: a table that was stored once before is now stored twice (a vlmexport bug).
    """
    saved = store_shared_weights_once(model, min_elements=min(t.nbytes // 4 for t in tables))  # tiny tables too
    # The quantized table is at least a quarter of the float one (4-bit is an eighth, plus scales).
    expected = sum(t.nbytes for t in tables) // 8
    if saved < expected:
        raise BundleError(f"{what}: the tied embedding table would be stored twice after quantization", "report this as a vlmexport bug")
    return saved


def private_weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Node name → weight, for each MatMul whose weight (second input) is an initializer that no
    other node reads (a shared table is not: rewriting it would change its other reader)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return {n.name: inits[n.input[1]] for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and readers[n.input[1]] == 1}
